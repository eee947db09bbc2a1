"""INT8 kernels for CUDA targets: uint8 activations x int8 constant weights -> int32 with ``dp4a``.

The quantization scheme is ``cpu_int8``'s: activations uint8 with a zero point, weights int8
symmetric per output channel, int32 sums, the requantization an elementwise epilogue that
FuseOps fuses into these kernels. ``dp4a`` (sm_61+) adds the four products of 4 uint8 x 4 int8
bytes, each operand one 32-bit register, to an int32 in one instruction (``dp4a.u32.s32``).

Both kernels are one GEMM ``gemm[s, b, o, p] = sum_k4 A[b, k4, p, :] . W[k4, o, :]`` over
groups ``k4`` of 4 reduction elements (one ``dp4a`` each):

* conv (``legalize_map``: NCHW uint8 data, OIHW constant weight, one group): ``p`` is the
  output pixel, ``k4 = (ry * KW + rx) * C4 + c // 4`` (4 input channels at one tap, ``C``
  padded to ``C4 * 4`` by zero weights); ``A`` is an im2col of the NCHW input, computed inside
  the kernel (``int8_data``), zero in the padding (``relax.nn.conv2d`` pads with zeros: a
  graph that pads with the zero point passes ``relax.nn.pad(pad_value=zp)`` + an unpadded conv);
* dense (``relax.matmul`` of uint8 ``[M, K]`` by a constant int8 ``[K, N]``): ``p`` is the
  row, ``k4 = k // 4``.

The weight is packed when the module is built (``pack_conv_weight`` / ``pack_dense_weight``):
``(K4', O', 4)`` int8, ``K4'`` a multiple of ``GemmTile.k4_multiple`` and ``O'`` of the block's
channels, by zero weights; the pixels are padded to whole blocks with zero data. ``s`` is the
slice of a split reduction (``GemmTile.splits``, 1: none); ``int8_out`` sums the slices and
drops the padding.

The CUDA schedule (``int8_rule``, first in the backend's rules): a thread block computes
``tp`` pixels x ``to`` channels, each thread ``vp x vo`` int32 sums in registers. Per step of
``step`` groups both operand tiles go through shared memory (the im2col computed straight into
it from the NCHW input: the layout change costs no global pass), each thread loads its
``vp`` / ``vo`` operand words into registers (one 16-byte load each) and issues ``vp * vo``
``dp4a`` (the tensorized ``DP4A``). Unsplit, the sums go to the output through the inlined
epilogue; split, to a partial-sum buffer, and a second launch (one thread per output) adds the
slices and runs the epilogue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..analysis import static_shape
from .common import attempt

log = logging.getLogger(__name__)

TILE_ATTR = "hwc.cuda_int8_tile"  # GemmTile.as_list() on the GEMM block
DP4A = "hwc_dp4a_u8s8s32_local"  # C[0] += dot(A[0:4], B[0:4]): uint8 x int8 -> int32, registers
DATA = "int8_data"  # name of the activation gather stage
OUT = "int8_out"  # the output: the GEMM's slices summed, seen as (N, O, OH, OW) / (M, N)

# Below this many thread blocks (an H100 has 132 SMs) a GEMM with a long reduction is split
# into _SPLITS slices (split-K); see choose_tile for the measurements.
_MIN_BLOCKS = 64
_SPLITS = 4


@dataclass(frozen=True)
class GemmTile:
    """The GEMM tiling: ``tp x to`` outputs per thread block, ``vp x vo`` per thread,
    ``step`` groups of 4 reduction elements per shared-memory step; the groups cut into
    ``splits`` slices computed by separate blocks (split-K) and summed by a second launch."""

    tp: int
    to: int
    vp: int
    vo: int
    step: int
    splits: int = 1

    def __post_init__(self):
        if self.tp % self.vp or self.to % self.vo or min(self.tp, self.to, self.vp, self.vo, self.step, self.splits) < 1:
            raise ValueError(f"{self}: a block tile must be whole thread tiles")
        if self.threads > 1024:
            raise ValueError(f"{self}: {self.threads} threads per block (at most 1024)")

    @property
    def threads(self) -> int:
        return (self.tp // self.vp) * (self.to // self.vo)

    @property
    def k4_multiple(self) -> int:
        """The packed weight's groups are a multiple of this (whole steps in every slice)."""
        return self.step * self.splits

    def as_list(self) -> list[int]:
        return [self.tp, self.to, self.vp, self.vo, self.step, self.splits]


def choose_tile(batch: int, p: int, o: int, k4: int) -> GemmTile:
    """The tile of a ``batch x (p pixels x o channels)`` GEMM over ``k4`` groups of 4.

    Blocks of 32 pixels x 64 channels, 4 x 4 per thread (fewer channels / pixels: 32 / 16 of
    them), steps of 16 groups; ``_SPLITS`` slices of the reduction where that gives fewer than
    ``_MIN_BLOCKS`` blocks and every slice keeps two steps; a few rows (GEMV): one block row,
    64 channels, no split. Chosen from a sweep on an H100 (``tools/bench_gpu_int8.py
    --variants``: 10 tiles on 5 ResNet-18-like convs): 32 x 64 was the fastest on three convs
    and within 9% of the fastest on the other two; split-K by 4 made 256ch 14x14 (28 blocks)
    1.7x and 128ch 28x28 stride 2 (50 blocks) 1.4x faster, and gained nothing from 64 blocks
    on; steps of 8 groups were up to 1.8x slower (twice the barriers); a split GEMV (1x512 x
    512x1000) was 1.9x slower than one launch (the summing launch costs more than it gains).
    """
    step = 16 if k4 >= 32 else 8
    if p <= 4:
        return GemmTile(p, 64, p, 1, step)
    tp = 32 if p > 16 else 16
    to = 64 if o > 32 else 32 if o > 16 else 16
    blocks = batch * -(-p // tp) * -(-o // to)
    splits = _SPLITS if blocks < _MIN_BLOCKS and k4 >= 2 * step * _SPLITS else 1
    return GemmTile(tp, to, 4, 4, step, splits)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------- weight packing


def pack_conv_weight(weight_oihw: np.ndarray, k4_multiple: int, o_multiple: int = 1) -> np.ndarray:
    """``(O, I, KH, KW)`` int8 -> ``(K4', O', 4)``: ``[(ry * KW + rx) * I4 + i // 4, o, i % 4]``,
    ``I`` padded to ``I4 * 4``, ``K4 = KH * KW * I4`` to a multiple of ``k4_multiple`` and ``O``
    to one of ``o_multiple`` (``GemmTile.k4_multiple`` / ``.to``) by zeros."""
    o, i, kh, kw = weight_oihw.shape
    i4 = -(-i // 4)
    w = np.zeros((o, i4 * 4, kh, kw), dtype=weight_oihw.dtype)
    w[:, :i] = weight_oihw
    w = w.reshape(o, i4, 4, kh, kw).transpose(3, 4, 1, 0, 2).reshape(kh * kw * i4, o, 4)
    return _pad(w, k4_multiple, o_multiple)


def pack_dense_weight(weight_kn: np.ndarray, k4_multiple: int, n_multiple: int = 1) -> np.ndarray:
    """``(K, N)`` int8 (the right operand of ``matmul``) -> ``(K4', N', 4)``: ``[k // 4, n, k % 4]``."""
    k, n = weight_kn.shape
    w = np.zeros((_round_up(k, 4), n), dtype=weight_kn.dtype)
    w[:k] = weight_kn
    return _pad(w.reshape(-1, 4, n).transpose(0, 2, 1), k4_multiple, n_multiple)


def _pad(w: np.ndarray, k4_multiple: int, o_multiple: int) -> np.ndarray:
    k4, o, _ = w.shape
    out = np.zeros((_round_up(k4, k4_multiple), _round_up(o, o_multiple), 4), dtype=w.dtype)
    out[:k4, :o] = w
    return out


# ---------------------------------------------------------------------------- TE computes


def conv_out_size(size, kernel, strides, padding, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a conv; ``padding`` is ``(top, left, bottom, right)``."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = size, kernel, strides, dilation
    pt, pl, pb, pr = padding
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def conv2d_nchw_int8(data, weight, kernel, strides, padding, dilation, tile: GemmTile, out_c: int):
    """TE compute of an NCHW uint8 conv by ``pack_conv_weight``'s ``(K4', O', 4)`` int8 weight:
    the int32 ``(N, out_c, OH, OW)`` output. ``padding`` is ``(top, left, bottom, right)``, zeros.

    The GEMM covers whole block tiles: ``O'`` channels (zero weights past ``out_c``) and the
    pixels rounded up to ``tile.tp`` (zero data); the output stage reads the real ones."""
    from tvm import te, tirx
    from tvm.topi.utils import get_const_tuple

    n, c, h, w = get_const_tuple(data.shape)
    k4p, o_pad = get_const_tuple(weight.shape)[:2]
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    pt, pl, pb, pr = padding
    c4 = -(-c // 4)
    k4 = kh * kw * c4
    if k4p < k4 or k4p % tile.k4_multiple or o_pad < out_c or o_pad % tile.to:
        raise ValueError(f"packed weight {weight.shape} does not fit data {data.shape}, kernel {kernel}, {tile}")
    out_h, out_w = conv_out_size((h, w), kernel, strides, padding, dilation)
    pixels = out_h * out_w
    p_pad = _round_up(pixels, tile.tp)
    # a bottom/right pad only matters where the last window reaches past the image
    check_y = pt or (pb and (out_h - 1) * sh + (kh - 1) * dh - pt >= h)
    check_x = pl or (pr and (out_w - 1) * sw + (kw - 1) * dw - pl >= w)

    def gather(b, k, p, r):
        tap, ch = k // c4, k % c4 * 4 + r
        y = p // out_w * sh + tap // kw * dh - pt
        x = p % out_w * sw + tap % kw * dw - pl
        inside = [k < k4] if k4p > k4 else []
        inside += [p < pixels] if p_pad > pixels else []
        inside += [ch < c] if c % 4 else []
        inside += [y >= 0, y < h] if check_y else []
        inside += [x >= 0, x < w] if check_x else []
        value = data[b, ch, y, x]
        return tirx.if_then_else(tirx.all(*inside), value, tirx.const(0, "uint8")) if inside else value

    a = te.compute((n, k4p, p_pad, 4), gather, name=DATA)
    gemm = _gemm(a, weight, tile, "conv2d_nchw_int8")
    return te.compute((n, out_c, out_h, out_w), lambda b, oc, y, x: _sum_splits(gemm, b, oc, y * out_w + x), name=OUT)


def dense_int8(data, weight, tile: GemmTile, out_n: int):
    """TE compute of uint8 ``[M, K]`` data by ``pack_dense_weight``'s ``(K4', N', 4)`` int8
    weight: the int32 ``[M, out_n]`` product (rows and columns padded as in ``conv2d_nchw_int8``)."""
    from tvm import te, tirx
    from tvm.topi.utils import get_const_tuple

    m, k = get_const_tuple(data.shape)
    k4p, n_pad = get_const_tuple(weight.shape)[:2]
    if k4p * 4 < k or k4p % tile.k4_multiple or n_pad < out_n or n_pad % tile.to:
        raise ValueError(f"packed weight {weight.shape} does not fit data {data.shape}, {tile}")
    m_pad = _round_up(m, tile.tp)

    def gather(_, g, i, r):
        inside = ([g * 4 + r < k] if k4p * 4 > k else []) + ([i < m] if m_pad > m else [])
        value = data[i, g * 4 + r]
        return tirx.if_then_else(tirx.all(*inside), value, tirx.const(0, "uint8")) if inside else value

    a = te.compute((1, k4p, m_pad, 4), gather, name=DATA)
    gemm = _gemm(a, weight, tile, "dense_int8")
    return te.compute((m, out_n), lambda i, oc: _sum_splits(gemm, 0, oc, i), name=OUT)


def _gemm(a, weight, tile: GemmTile, name: str):
    """``gemm[s, b, o, p] = sum_k a[b, k, p, :] . weight[k, o, :]`` over the ``s``-th of
    ``tile.splits`` equal slices of the groups ``k`` (the block carries the tile)."""
    from tvm import te

    n, k4p, p, _ = (int(d) for d in a.shape)
    o = int(weight.shape[1])
    per_split = k4p // tile.splits
    rk = te.reduce_axis((0, per_split), "rk")
    rr = te.reduce_axis((0, 4), "rr")
    return te.compute(
        (tile.splits, n, o, p),
        lambda s, b, oc, q: te.sum(
            a[b, s * per_split + rk, q, rr].astype("int32") * weight[s * per_split + rk, oc, rr].astype("int32"),
            axis=[rk, rr],
        ),
        name=name,
        attrs={TILE_ATTR: tile.as_list()},
    )


def _sum_splits(gemm, b, oc, q):
    """The int32 sum of the split-K partial sums (an elementwise expression, so that the
    epilogue fuses into it)."""
    total = gemm[0, b, oc, q]
    for s in range(1, int(gemm.shape[0])):
        total = total + gemm[s, b, oc, q]
    return total


# ---------------------------------------------------------------------------- legalization


def legalize_map(target) -> dict:
    """The CUDA backend's ``LegalizeOps`` overrides: ``conv2d_nchw_int8`` for a
    ``relax.nn.conv2d`` of NCHW uint8 data by a constant OIHW int8 weight to int32 (one group,
    static shapes), ``dense_int8`` for a ``relax.matmul`` of uint8 ``[M, K]`` by a constant
    int8 ``[K, N]`` to int32, where the target has ``dp4a`` (sm_61+); TVM's legalization for
    everything else."""
    enabled = has_dp4a(target)
    return {"relax.nn.conv2d": _legalizer("relax.nn.conv2d", _conv_kernel, enabled),
            "relax.matmul": _legalizer("relax.matmul", _dense_kernel, enabled)}  # fmt: skip


def has_dp4a(target) -> bool:
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    digits = arch[3:].rstrip("af") if arch.startswith("sm_") else ""
    return digits.isdigit() and int(digits) >= 61


def _legalizer(op_name: str, kernel_for, enabled: bool):
    import tvm
    from tvm import relax

    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb, call):
        kernel = kernel_for(call) if enabled and _int8_operands(call) else None
        if kernel is None:
            return default(bb, call)
        compute, packed, name = kernel
        return bb.call_te(compute, call.args[0], relax.const(packed, "int8"), primfunc_name_hint=name)

    return legalize


def _conv_kernel(call):
    """(TE compute, packed weight, kernel name) of a conv this module computes, else None."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    data, out, weight = static_shape(call.args[0].ty), static_shape(call.ty), static_shape(call.args[1].ty)
    if layouts != ("NCHW", "OIHW", "NCHW") or int(attrs.groups) != 1 or None in (data, out, weight):
        return None
    padding = tuple(int(p) for p in attrs.padding)
    padding = padding * 2 if len(padding) == 2 else padding
    strides, dilation = tuple(int(v) for v in attrs.strides), tuple(int(v) for v in attrs.dilation)
    o, i, kh, kw = weight
    tile = choose_tile(out[0], out[2] * out[3], o, kh * kw * -(-i // 4))

    def compute(data, weight):  # call_te converts keyword arguments; the tile is no TVM object
        return conv2d_nchw_int8(data, weight, (kh, kw), strides, padding, dilation, tile, o)

    return compute, pack_conv_weight(call.args[1].value.numpy(), tile.k4_multiple, tile.to), "conv2d_int8"


def _dense_kernel(call):
    data, weight = static_shape(call.args[0].ty), static_shape(call.args[1].ty)
    if data is None or weight is None or len(data) != 2 or len(weight) != 2:
        return None
    tile = choose_tile(1, data[0], weight[1], -(-data[1] // 4))

    def compute(data, packed):
        return dense_int8(data, packed, tile, weight[1])

    return compute, pack_dense_weight(call.args[1].value.numpy(), tile.k4_multiple, tile.to), "dense_int8"


def _int8_operands(call) -> bool:
    """uint8 data by a constant int8 weight to int32."""
    import tvm

    data, weight = call.args[:2]
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return False
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    return (str(data.ty.dtype), str(weight.ty.dtype), out_dtype) == ("uint8", "int8", "int32")


# ---------------------------------------------------------------------------- schedule


def register_dp4a() -> str:
    """Register ``DP4A`` (once per process): TVM's ``dp4a_u8s8s32`` reads its operands from
    shared memory; this one from registers (the thread's copy of its operand words)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(DP4A, allow_missing=True) is not None:
        return DP4A

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="local"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="local"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(0, 4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="local"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="local"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("int32", "__dp4a", A.vload([0], "uint8x4"), B.vload([0], "int8x4"), C[0])

    TensorIntrin.register(DP4A, desc, impl)
    return DP4A


def int8_rule():
    """A dlight rule: schedules a (fused) kernel of this module, declines (None) anything else."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class CudaInt8(GPUScheduleRule):
        def apply(self, func, target, tunable):
            import tvm
            from tvm.s_tir.schedule import ScheduleError

            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = tvm.s_tir.Schedule(func)
            try:
                return sch if schedule_int8(sch) else None
            except ScheduleError as e:  # an unforeseen fused kernel: dlight's rules take it (slow, correct)
                log.warning("int8 kernel left to the generic GPU rules: %s", str(e).strip().splitlines()[-1])
                return None

        def __repr__(self):
            return "CudaInt8"

    return CudaInt8()


def schedule_int8(sch) -> bool:
    """Schedule the int8 GEMM of ``sch`` (see the module docstring); False if it holds none."""
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = sch.get_child_blocks(get_root_block(sch))
    gemm = next((b for b in blocks if TILE_ATTR in sch.get(b).annotations), None)
    names = {sch.get(b).name_hint: b for b in blocks}
    if gemm is None or DATA not in names or OUT not in names:
        return False
    tile = GemmTile(*(int(v) for v in sch.get(gemm).annotations[TILE_ATTR]))
    register_dp4a()
    gather = names[DATA]
    for producer in sch.get_producers(gather):  # an injective prologue fused into the kernel
        attempt(sch.compute_inline, producer)
    data_name = sch.get(gather).writes[0].source.name
    weight_name = next(r.source.name for r in sch.get(gemm).reads if r.source.name != data_name)

    s, b, o, p, rk, rr = sch.get_loops(gemm)
    n_p, n_o = tile.tp // tile.vp, tile.to // tile.vo
    pb, pt, pv = sch.split(p, [None, n_p, tile.vp])
    ob, ot, ov = sch.split(o, [None, n_o, tile.vo])
    ko, ki = sch.split(rk, [None, tile.step])
    sch.reorder(s, b, pb, ob, ot, pt, ko, ki, ov, pv, rr)
    sch.bind(sch.fuse(s, b, pb), "blockIdx.x")
    sch.bind(ob, "blockIdx.y")
    sch.bind(ot, "threadIdx.y")
    sch.bind(pt, "threadIdx.x")
    depth = 4  # blockIdx.x, blockIdx.y, threadIdx.y, threadIdx.x

    acc = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(acc, pt, preserve_unit_loops=True)
    for loop in sch.get_loops(acc)[depth:]:
        sch.unroll(loop)
    # the output (one split: straight from the accumulators; else a second launch summing
    # the slices) with the elementwise epilogue (requantization) inlined
    tail = acc if tile.splits == 1 else names[OUT]
    while len(consumers := sch.get_consumers(tail)) == 1 and attempt(sch.reverse_compute_inline, consumers[0]):
        pass
    if tile.splits > 1:
        _one_thread_per_output(sch, tail)

    # operand tiles: global -> shared once per step (the activation gathered on the way)
    sch.set_scope(gather, 0, "shared")
    sch.compute_at(gather, ko, preserve_unit_loops=True)
    w_shared = sch.cache_read(gemm, _read_index(sch, gemm, weight_name), "shared")
    sch.compute_at(w_shared, ko, preserve_unit_loops=True)
    for stage in (gather, w_shared):
        _spread(sch, stage, depth + 1, n_p, n_o)
    # shared -> registers: the thread's vp / vo operand words of a group
    for shared in (gather, w_shared):
        local = sch.cache_read(gemm, _read_index(sch, gemm, sch.get(shared).writes[0].source.name), "local")
        sch.compute_at(local, ki, preserve_unit_loops=True)
        fused = sch.fuse(*sch.get_loops(local)[depth + 2 :])
        if sch.get(fused).extent.value in (4, 8, 16):
            sch.vectorize(fused)
    sch.decompose_reduction(gemm, ko)
    sch.tensorize(rr, DP4A)
    for loop in (ki, ov, pv):
        sch.unroll(loop)
    for block in sch.get_child_blocks(get_root_block(sch)):  # a prologue that did not inline
        if not any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block)):
            _one_thread_per_output(sch, block)
    return True


_THREADS = 256  # threads per block of the split-K sum


def _one_thread_per_output(sch, block) -> None:
    bx, tx = sch.split(sch.fuse(*sch.get_loops(block)), [None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _read_index(sch, block, name: str) -> int:
    reads = sch.get(block).reads
    for i, region in enumerate(reads):
        if region.source.name == name:
            return i
    raise ValueError(f"{sch.get(block).name_hint} reads no {name}: {[r.source.name for r in reads]}")


def _spread(sch, block, depth: int, n_p: int, n_o: int) -> None:
    """A shared-memory fill stage's loops below ``depth``, all but the last 4 (the bytes of a
    group: one 32-bit word), over the block's threads."""
    loops = sch.get_loops(block)[depth:]
    outer, bytes_ = loops[:-1], loops[-1]
    fused = sch.fuse(*outer)
    _, ty, tx = sch.split(fused, [None, n_o, n_p])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(bytes_)
