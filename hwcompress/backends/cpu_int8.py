"""INT8 kernels for CPUs (x86, aarch64): uint8 activations x int8 constant weights -> int32.

The quantization scheme: activations uint8 with a zero point (asymmetric), weights int8
symmetric per output channel, int32 sums; requantization is a separate elementwise stage
that FuseOps fuses into these kernels as their epilogue. The CPU backend's conv2d
legalization (``cpu_conv.legalize_conv2d``) sends a ``relax.nn.conv2d`` with uint8 NHWC data,
a constant int8 OHWI weight, one group and ``out_dtype="int32"`` here; ``legalize_matmul_int8``
does the same for ``relax.matmul`` of uint8 ``[M, K]`` data by a constant int8 ``[K, N]``.

Layouts (``g`` = the intrinsic's group, ``ob`` = ``nvec`` x ``lanes`` output channels of one
register tile; ``cpu_intrin`` says which instruction and why: ``vpdpbusd``, ``vpmaddwd``,
``vpmaddubsw`` on x86, ``sdot`` on aarch64 with dotprod, ``smull`` + ``sadalp`` without):

* weight, packed once when the module is built: conv ``(O/ob, KH, KW, I/g, ob, g)``, dense
  ``(N/ob, K/g, ob, g)``, int8; ``I``/``K`` padded with zero weights to a multiple of ``g``
  and ``O``/``N`` to a multiple of ``ob``. With VNNI and ``nvec = 1`` this is
  ``(O/16, KH, KW, I/4, 16, 4)``: 4 consecutive reduction elements x 16 output channels.
* activation: ``data_pad`` copies it with the spatial padding (``pad_value``: the zero
  point, so that the zero-point correction of the epilogue is the same at every pixel), the
  extra columns/rows of a width rounded up to whole tiles and the reduction padding; for
  ``vpmaddwd`` it also widens to int16, for ``sdot`` / ``smull`` (signed x signed) it
  shifts to int8 ``x - 128`` (the padding value too). VNNI and ``vpmaddubsw`` read uint8
  data in place when nothing needs padding.
* the shift's correction (``sdot`` / ``smull`` only): ``sum (x - 128) w = sum x w - 128 sum w``,
  so the kernel adds ``128 * sum_k w[o, k]`` (``shift_correction``, an int32 constant per
  output channel computed when the weights are packed) in its write-back stage,
  ``int8_crop``. The kernel's result is ``sum x w`` as on x86; nothing outside it changes.
* which instruction: the CPU's (``CpuFacts.int8_dot``), except that on AVX2 without VNNI a
  layer whose weights all lie in ``[-64, 64]`` (7-bit, what the quantizer makes for
  ``[hardware].int8 = "avx2"``) gets ``vpmaddubsw``, twice the MACs per instruction and no
  int16 copy; chosen at legalization, where the weights are constants.
* the reduction block (``conv2d_nhwc_int8`` / ``dense_int8``) carries ``hwc.int8_tile``
  (``[ty, tx, nvec]``, the register tile as in ``cpu_conv.choose_tile``) and ``hwc.int8_dot``
  (the intrinsic's name); ``schedule_int8`` tiles it like the float packed conv and
  tensorizes each ``lanes x g`` dot; ``int8_crop`` drops what the padding added (and adds
  the shift's correction).

``relax.nn.conv2d`` pads with zeros: a graph that needs zero-point padding passes an input
padded by ``relax.nn.pad(pad_value=zero_point)`` and a conv without padding.
"""

from __future__ import annotations

import numpy as np

from ..analysis import static_shape

from .common import attempt
from .cpu_conv import ConvTile, _round_up, _schedule_rest, _unroll_vectorize, _vectorize_tail, choose_flat_tile, choose_tile, conv_geometry
from .cpu_intrin import DotIntrin, Int8Dot, dot_for_weights, intrin_named, register

TILE_ATTR = "hwc.int8_tile"
DOT_ATTR = "hwc.int8_dot"
FLAT_ATTR = "hwc.int8_flat"  # the conv's output pixels as one row-major axis (``flat_tile``)


# Up to this many rows, a dense tile takes all rows and no padded ones (``dense_tile``).
_GEMV_ROWS = 2


# ---------------------------------------------------------------------------- weight packing


def pack_conv_weight(weight_ohwi: np.ndarray, block: int, group: int) -> np.ndarray:
    """``(O, KH, KW, I)`` int8 -> ``(O'/block, KH, KW, I'/group, block, group)``, with ``O'``
    and ``I'`` rounded up to multiples of ``block`` and ``group`` by zero weights."""
    o, kh, kw, i = weight_ohwi.shape
    o_pad, i_pad = _round_up(o, block), _round_up(i, group)
    w = np.zeros((o_pad, kh, kw, i_pad), dtype=weight_ohwi.dtype)
    w[:o, ..., :i] = weight_ohwi
    w = w.reshape(o_pad // block, block, kh, kw, i_pad // group, group)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 4, 1, 5))


def pack_dense_weight(weight_kn: np.ndarray, block: int, group: int) -> np.ndarray:
    """``(K, N)`` int8 (the right operand of ``matmul``) -> ``(N'/block, K'/group, block, group)``."""
    return pack_conv_weight(weight_kn.T[:, None, None, :], block, group)[:, 0, 0]


def shift_correction(packed: np.ndarray, shift: int) -> np.ndarray:
    """``shift * sum_k w[o, k]`` per output channel of a packed weight (``pack_conv_weight``'s
    or ``pack_dense_weight``'s, padded channels included), int32 ``(O',)``: what a kernel
    that multiplies ``x - shift`` instead of ``x`` adds back (``DotIntrin.data_shift``)."""
    reduce_axes = (*range(1, packed.ndim - 2), packed.ndim - 1)  # all but (O'/ob, ob)
    sums = packed.astype(np.int64).sum(axis=reduce_axes).reshape(-1)
    return (shift * sums).astype(np.int32)


def conv_tile(out_rows: int, out_cols: int, out_c: int, intrin: DotIntrin) -> ConvTile:
    """The register tile of a conv output ``out_rows x out_cols x out_c``: ``cpu_conv.choose_tile``
    on the channels rounded up to a whole vector, with the intrinsic's accumulator budget."""
    return choose_tile(out_rows, out_cols, _round_up(out_c, intrin.lanes), intrin.lanes, intrin.acc_regs)


def flat_tile(out_rows: int, out_cols: int, out_c: int, intrin: DotIntrin) -> ConvTile | None:
    """``cpu_conv.choose_flat_tile`` for the int8 kernels: a tile over the output pixels as one
    axis where ``conv_tile``'s rows would waste more (None elsewhere)."""
    rows = conv_tile(out_rows, out_cols, out_c, intrin)
    return choose_flat_tile(out_rows, out_cols, _round_up(out_c, intrin.lanes), intrin.lanes, intrin.acc_regs, rows)


def dense_tile(m: int, n: int, intrin: DotIntrin) -> ConvTile:
    """The register tile of an ``m x n`` dense output (``tx`` rows x ``nvec`` vectors).

    For a few rows (GEMV) ``choose_tile`` would round the rows up to fill its accumulators,
    computing rows that are thrown away; there each weight is used once and the tile is all
    rows x up to 4 vectors, ``n`` rounded up to whole tiles (1x512 x 512x1000 on AVX2: 4
    vectors, 1024 channels, 0.013 ms; 2 vectors, 1008, 0.016 ms). Otherwise ``n`` is rounded
    up to two vectors, so that ``nvec`` may be 2 where ``n / lanes`` is odd (1000 classes).
    """
    lanes = intrin.lanes
    if m <= _GEMV_ROWS:
        return ConvTile(1, m, min(4, -(-n // lanes), intrin.acc_regs // m), lanes)
    return choose_tile(1, m, _round_up(n, 2 * lanes), lanes, intrin.acc_regs)


# ---------------------------------------------------------------------------- TE computes


def conv2d_nhwc_int8(
    data, weight, strides, padding, dilation, tile: ConvTile, intrin: DotIntrin, out_c: int, pad_value: int = 0, correction=None,
    flat: bool = False,
):
    """TE compute of an NHWC uint8 conv with a packed int8 weight, int32 output.

    ``weight`` is ``pack_conv_weight``'s ``(O'/ob, KH, KW, I'/g, ob, g)``; ``padding`` is
    ``(top, left, bottom, right)``, filled with ``pad_value``; ``correction`` the int32
    ``(O',)`` ``shift_correction`` of the weight, needed (only) where ``intrin.data_shift``;
    ``flat``: ``tile`` is a ``flat_tile`` (the conv computes ``(N, pixels, O')``, then the
    crop reshapes it).
    Returns ``(N, OH, OW, out_c)``.
    """
    from tvm import te
    from tvm.topi.utils import get_const_tuple

    n, h, w, ci = get_const_tuple(data.shape)
    n_ob, kh, kw, n_rc, ob, group = get_const_tuple(weight.shape)
    if ob != tile.block or group != intrin.group or n_rc * group < ci or n_ob * ob < out_c:
        raise ValueError(f"packed weight {weight.shape} does not fit data {data.shape} / tile {tile} / {intrin.name}")
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl = padding[:2]
    out_h, out_w, out_wp, rows, cols = conv_geometry((h, w), (kh, kw), strides, padding, dilation, tile, flat)
    _check_correction(correction, intrin, n_ob * ob)
    src = _source(data, (pt, pl), (rows, cols), n_rc * group, intrin, pad_value)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rc = te.reduce_axis((0, n_rc), "rc")
    rk = te.reduce_axis((0, group), "rk")
    if flat:  # output pixels p = y * out_w + x, rounded up to whole tiles (out_wp of them)
        conv = te.compute(
            (n, out_wp, n_ob * ob),
            lambda b, p, o: te.sum(
                src[b, p // out_w * sh + ry * dh, p % out_w * sw + rx * dw, rc * group + rk].astype("int32")
                * weight[o // ob, ry, rx, rc, o % ob, rk].astype("int32"),
                axis=[ry, rx, rc, rk],
            ),
            name="conv2d_nhwc_int8",
            attrs={TILE_ATTR: [tile.ty, tile.tx, tile.nvec], DOT_ATTR: intrin.name, FLAT_ATTR: 1},
        )
        return _crop(conv, (n, out_h, out_w, out_c), correction, lambda b, y, x, o: (b, y * out_w + x, o))
    conv = te.compute(
        (n, out_h, out_wp, n_ob * ob),
        lambda b, y, x, o: te.sum(
            src[b, y * sh + ry * dh, x * sw + rx * dw, rc * group + rk].astype("int32")
            * weight[o // ob, ry, rx, rc, o % ob, rk].astype("int32"),
            axis=[ry, rx, rc, rk],
        ),
        name="conv2d_nhwc_int8",
        attrs={TILE_ATTR: [tile.ty, tile.tx, tile.nvec], DOT_ATTR: intrin.name},
    )
    return _crop(conv, (n, out_h, out_w, out_c), correction)


def dense_int8(data, weight, tile: ConvTile, intrin: DotIntrin, out_n: int, correction=None):
    """TE compute of uint8 ``[M, K]`` data times a packed int8 weight
    ``(N'/ob, K'/g, ob, g)`` (``pack_dense_weight``): the int32 ``[M, out_n]`` product.
    ``correction`` as for ``conv2d_nhwc_int8``."""
    from tvm import te
    from tvm.topi.utils import get_const_tuple

    m, k = get_const_tuple(data.shape)
    n_ob, n_rc, ob, group = get_const_tuple(weight.shape)
    if ob != tile.block or group != intrin.group or n_rc * group < k or n_ob * ob < out_n or tile.ty != 1:
        raise ValueError(f"packed weight {weight.shape} does not fit data {data.shape} / tile {tile} / {intrin.name}")
    m_pad = tile.padded_width(m)
    _check_correction(correction, intrin, n_ob * ob)
    src = _source(data, (0,), (m_pad,), n_rc * group, intrin, 0)
    rc = te.reduce_axis((0, n_rc), "rc")
    rk = te.reduce_axis((0, group), "rk")
    dense = te.compute(
        (m_pad, n_ob * ob),
        lambda i, o: te.sum(
            src[i, rc * group + rk].astype("int32") * weight[o // ob, rc, o % ob, rk].astype("int32"), axis=[rc, rk]
        ),
        name="dense_int8",
        attrs={TILE_ATTR: [1, tile.tx, tile.nvec], DOT_ATTR: intrin.name},
    )
    return _crop(dense, (m, out_n), correction)


def _winograd(call, facts, weight_shape) -> bool:
    """Whether an int8 conv runs as the exact int16 Winograd kernel (``cpu_int8_winograd``):
    on CPUs whose int8 dot is ``vpmaddwd``-rate (AVX2 without VNNI), for eligible 3x3 layers."""
    from . import cpu_int8_winograd as wino

    if facts.int8_dot is None or facts.int8_dot.kind is Int8Dot.VNNI or facts.int8_dot.lanes != wino.LANES:
        return False
    return wino.eligible(call.attrs, weight_shape, static_shape(call.args[0].ty))


def _check_correction(correction, intrin: DotIntrin, channels: int) -> None:
    from tvm.topi.utils import get_const_tuple

    if bool(intrin.data_shift) != (correction is not None):
        raise ValueError(f"{intrin.name}: a shift_correction is needed exactly where the data is shifted")
    if correction is not None and (get_const_tuple(correction.shape) != (channels,) or str(correction.dtype) != "int32"):
        raise ValueError(f"correction {correction.shape} {correction.dtype}: expected int32 ({channels},)")


def _source(data, before, extent, channels: int, intrin: DotIntrin, pad_value: int):
    """``data`` (``[batch,] *spatial, C``) padded by ``before`` leading and up to ``extent``
    spatial positions in all, ``channels`` channels, as ``intrin``'s data operand (cast to
    its dtype, less its ``data_shift``); ``data`` itself when nothing changes."""
    from tvm import te, tirx
    from tvm.topi.utils import get_const_tuple

    shape = get_const_tuple(data.shape)
    lead = len(shape) - 1 - len(extent)  # the batch axis of NHWC, none for [M, K]
    spatial, ci = shape[lead:-1], shape[-1]
    padded = any(before) or any(e > s + b for e, s, b in zip(extent, spatial, before)) or channels != ci
    dtype, shift = intrin.data_dtype, intrin.data_shift
    if not padded and dtype == str(data.dtype):
        return data
    fill = tirx.const(pad_value - shift, dtype)

    def value(*idx):
        pos, c = idx[lead:-1], idx[-1]
        inside = [tirx.all(p >= b, p < s + b) for p, b, s in zip(pos, before, spatial) if padded]
        if channels != ci:
            inside.append(c < ci)
        src = data[(*idx[:lead], *(p - b for p, b in zip(pos, before)), c)]
        src = (src.astype("int32") - shift).astype(dtype) if shift else src.astype(dtype)
        return tirx.if_then_else(tirx.all(*inside), src, fill) if inside else src

    return te.compute((*shape[:lead], *extent, channels), value, name="data_pad")


def _crop(out, shape, correction=None, index=None):
    """``out`` without the rows/columns/channels computed past ``shape``, plus the per-channel
    ``correction`` if any (a stage of its own only when there is something to do); ``index``
    maps an output index to ``out``'s (a flat conv's pixel axis), the identity by default."""
    from tvm import te

    if correction is None and index is None and tuple(int(d) for d in out.shape) == tuple(shape):
        return out
    index = index or (lambda *idx: idx)
    if correction is None:
        return te.compute(shape, lambda *idx: out[index(*idx)], name="int8_crop")
    return te.compute(shape, lambda *idx: out[index(*idx)] + correction[idx[-1]], name="int8_crop")


# ---------------------------------------------------------------------------- legalization


def legalize_conv2d_int8(facts, winograd: bool = True):
    """``LegalizeOps`` function for the int8 convs this module handles; ``handles(call)`` says
    which (``cpu_conv.legalize_conv2d`` asks it first). ``winograd``: eligible layers may run
    as the integer Winograd kernel (``_winograd``); False where the build's Winograd is off."""
    from tvm import relax

    def legalize(bb, call):
        tile, intrin, flat = _conv_plan(call, facts)
        register(intrin)  # a tuning database's traces tensorize with it before any default schedule runs
        attrs = call.attrs
        weight = call.args[1].value.numpy()
        padding = [int(p) for p in attrs.padding]
        padding = padding * 2 if len(padding) == 2 else padding
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        out_c = weight.shape[0]
        if winograd and _winograd(call, facts, weight.shape):
            from . import cpu_int8_winograd as wino

            register(wino.INTRIN)  # as above: a database's traces tensorize with it

            def winograd_conv(data, weight):
                return wino.winograd_int8_te(data, weight, padding, out_c)

            packed = relax.const(wino.transform_weight(weight), "int16")
            return bb.call_te(winograd_conv, call.args[0], packed, primfunc_name_hint="conv2d_int8_winograd")
        packed = pack_conv_weight(weight, tile.block, intrin.group)

        def compute(data, weight, *correction):  # call_te converts keyword arguments; tile/intrin are no TVM objects
            return conv2d_nhwc_int8(data, weight, strides, padding, dilation, tile, intrin, out_c, 0, *correction, flat=flat)

        return bb.call_te(compute, call.args[0], *_kernel_constants(packed, intrin), primfunc_name_hint="conv2d_int8")

    legalize.handles = lambda call: _conv_plan(call, facts) is not None
    return legalize


def legalize_matmul_int8(facts):
    """``LegalizeOps`` function for ``relax.matmul``: uint8 ``[M, K]`` x constant int8
    ``[K, N]`` -> int32 becomes ``dense_int8``, every other matmul TVM's legalization."""
    import tvm

    default = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")

    def legalize(bb, call):
        plan = _dense_plan(call, facts)
        if plan is None:
            return default(bb, call)
        tile, intrin = plan
        register(intrin)
        weight = call.args[1].value.numpy()
        out_n = weight.shape[1]
        packed = pack_dense_weight(weight, tile.block, intrin.group)

        def compute(data, weight, *correction):
            return dense_int8(data, weight, tile, intrin, out_n, *correction)

        return bb.call_te(compute, call.args[0], *_kernel_constants(packed, intrin), primfunc_name_hint="dense_int8")

    legalize.handles = lambda call: _dense_plan(call, facts) is not None
    return legalize


def _kernel_constants(packed: np.ndarray, intrin: DotIntrin) -> list:
    """The kernel's constant inputs: the packed weight, and its ``shift_correction`` where
    ``intrin`` shifts the data."""
    from tvm import relax

    consts = [relax.const(packed, "int8")]
    if intrin.data_shift:
        consts.append(relax.const(shift_correction(packed, intrin.data_shift), "int32"))
    return consts


def _int8_operands(call, facts) -> DotIntrin | None:
    """The intrinsic when ``call`` takes uint8 data and a constant int8 weight to int32 on a
    CPU with one, else None: the CPU's exact one, or ``vpmaddubsw`` where the weights are
    small enough for it (``cpu_intrin.dot_for_weights``)."""
    import tvm

    intrin = facts.int8_dot
    data, weight = call.args[:2]
    if intrin is None or not isinstance(weight, tvm.ir.expr.GenericConst):
        return None
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    if (str(data.ty.dtype), str(weight.ty.dtype), out_dtype) != ("uint8", "int8", "int32"):
        return None
    return dot_for_weights(intrin, _max_abs_weight(weight.value.numpy()))


def _max_abs_weight(weight: np.ndarray) -> int:
    """Largest ``|w|`` of an int8 weight (128 for -128, which int8 ``abs`` would wrap)."""
    return int(np.abs(weight.astype(np.int16)).max()) if weight.size else 0


def _conv_plan(call, facts) -> tuple[ConvTile, DotIntrin, bool] | None:
    """The register tile, the intrinsic and whether the tile is a ``flat_tile``."""
    intrin = _int8_operands(call, facts)
    if intrin is None:
        return None
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    out = static_shape(call.ty)
    if layouts != ("NHWC", "OHWI", "NHWC") or int(attrs.groups) != 1 or out is None or static_shape(call.args[0].ty) is None:
        return None
    _, out_h, out_w, out_c = out
    flat = flat_tile(out_h, out_w, out_c, intrin)
    return (flat, intrin, True) if flat is not None else (conv_tile(out_h, out_w, out_c, intrin), intrin, False)


def _dense_plan(call, facts) -> tuple[ConvTile, DotIntrin] | None:
    intrin = _int8_operands(call, facts)
    if intrin is None:
        return None
    data, weight = static_shape(call.args[0].ty), static_shape(call.args[1].ty)
    if data is None or weight is None or len(data) != 2 or len(weight) != 2:
        return None
    return dense_tile(data[0], weight[1], intrin), intrin


# ---------------------------------------------------------------------------- default schedule


def schedule_int8(sch, facts) -> bool:
    """Default schedule of a (fused) int8 kernel; False if ``sch`` holds none.

    As ``cpu_conv.schedule_packed_conv``: output tiles ``(n, oc-block, row-block)`` in
    parallel (dense: oc-blocks), the reduction outside the ``ty x tx x nvec`` register tile,
    each ``lanes x g`` dot of the tile one tensorized intrinsic, the tile written back through
    ``int8_crop`` (if any: the crop and the data shift's correction) and the inlined epilogue; the
    ``data_pad`` copy a parallel, vectorized stage of its own.
    """
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = sch.get_child_blocks(get_root_block(sch))
    block = next((b for b in blocks if TILE_ATTR in sch.get(b).annotations), None)
    if block is None:
        return False
    annotations = sch.get(block).annotations
    ty, tx, nvec = (int(v) for v in annotations[TILE_ATTR])
    intrin = intrin_named(str(annotations[DOT_ATTR]))
    names = {sch.get(b).name_hint: b for b in blocks}

    loops = sch.get_loops(block)
    n_spatial = sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 0)
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    xo, xi = sch.split(spatial[-2], [None, tx])
    oo, om, ol = sch.split(spatial[-1], [None, nvec, intrin.lanes])
    flat = FLAT_ATTR in annotations
    if n_spatial == 4:  # conv: b, y, x, o
        yo, yi = sch.split(spatial[1], [None, ty])
        outer, tile = [spatial[0], oo, yo], [yi, xi, om]
    elif flat:  # conv over flattened pixels: b, p, o
        outer, tile = [spatial[0], oo], [xi, om]
    else:  # dense: m, n
        outer, tile = [oo], [xi, om]
    sch.reorder(*outer, xo, *reduction[:-1], *tile, ol, reduction[-1])
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, xo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    for loop in tile:
        sch.unroll(loop)
    init = sch.decompose_reduction(block, reduction[0])
    sch.tensorize(ol, intrin.name)
    depth = 2  # parallel, xo
    _unroll_vectorize(sch, sch.get_loops(init)[depth:], intrin.lanes)

    cropped = "int8_crop" in names
    tail = write_back
    if cropped:
        tail = names["int8_crop"]
        if not flat:  # a flat tile's pixels are no rectangle of the crop: its own stage
            sch.reverse_compute_at(tail, xo, preserve_unit_loops=True)
        _unroll_vectorize(sch, sch.get_loops(write_back)[depth:], intrin.lanes)
    while True:  # the elementwise epilogue (requantization), one consumer at a time
        consumers = sch.get_consumers(tail)
        if len(consumers) != 1 or not attempt(sch.reverse_compute_inline, consumers[0]):
            break
    tail_loops = sch.get_loops(tail)
    if cropped and flat:
        sch.parallel(sch.fuse(*tail_loops[:2]))
        _vectorize_tail(sch, tail_loops[-1], intrin.lanes)
    else:
        _unroll_vectorize(sch, tail_loops[min(depth, len(tail_loops) - 1) :], intrin.lanes)

    if "data_pad" in names:
        pad = names["data_pad"]
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]) if len(loops) > 2 else loops[0])
        _vectorize_tail(sch, loops[-1], facts.lanes(32))
    _schedule_rest(sch, get_root_block(sch), facts.lanes(32))
    return True
