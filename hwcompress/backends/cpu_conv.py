"""Direct NHWC convolutions for CPUs: weights packed at compile time, register-tiled kernels.

TOPI's NHWC ``conv2d`` reads its ``OHWI`` weight with a stride of one whole filter between
adjacent output channels, and the generic tiled schedule reaches ~35-45% of the FP32 peak on
it. The CPU backend legalizes each eligible ``relax.nn.conv2d`` (NHWC data, OHWI constant
weight, one group, float32) to this module's kernel instead:

* the weight is repacked once, when the module is built, to ``(O/ob, KH, KW, I, ob)``: the
  ``ob`` output channels that one register tile computes are contiguous for every reduction
  step, so the kernel streams its weight panel sequentially;
* the kernel is ``data_pad`` (zero padding, and extra columns when the output width is
  rounded up to whole tiles) -> ``conv2d_nhwc_packed`` (the reduction) -> ``conv2d_nhwc_crop``
  (only when the width was rounded up); the reduction block carries its register tile in the
  ``hwc.conv_tile`` annotation, by which the default schedule (``schedule_packed_conv``)
  finds it;
* the schedule keeps a ``ty x tx`` block of output pixels times ``nvec`` vectors of output
  channels in registers (12 of AVX2's 16 vector registers at most, plus the ``nvec`` weight
  vectors and one broadcast), loops over the reduction (KH, KW, I) outside that tile, and
  writes the tile back through the fused epilogue (bias, residual add, activation).

Depthwise convs (one filter per channel) get the same treatment with the weight as
``(KH, KW, C)`` and a ``tx`` pixels x ``nvec`` channel-vector tile (``depthwise_nhwc_packed``):
MobileNetV2's 17 depthwise layers took 1.87 ms on one core against 2.38 ms with TOPI's
compute and the generic schedule (ONNX Runtime: 1.56 ms). A depthwise conv reads its input in
place, the padding as bounds checks: the padded copy cost more than the conv at stride 2
(whole MobileNetV2 FP32: 1.10x faster than with the copy).

Measured on one core of the 2-core Zen 3 host: ResNet-18's 3x3 stride-1 layers 92-94 GFLOP/s
(the core's FP32 peak is ~97 at the clock it runs), the 7x7 stem 90, the 512-channel 7x7 layer
~75 (BENCHMARKS.md has the whole-model figures, ``tools/bench.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import attempt
from .cpu_nest import _extent
from .cpu_prefetch import annotate_prefetch

# The reduction block's annotation: the register tile the default schedule uses. (No
# ``schedule_rule`` annotation: MetaSchedule would look for a rule of that name, and skip
# blocks marked "None", where its generic rules should tune these kernels like any other.)
TILE_ATTR = "hwc.conv_tile"

# Widest pixel row of a tile. The accumulator count itself is capped by ``acc_regs`` (12 of
# AVX2's 16 vector registers): 7 and 8 pixels x 2 vectors spilled, 41 and 36 GFLOP/s against 92.
_MAX_ROWS = 12

# A flat tile (``choose_flat_tile``) replaces the row tile only where it scores this much higher,
# and only on outputs at most this wide: float 1x1 / 3x3 convs to 7x7 measured 1.09-1.23x
# faster flat, a 1x1 at 14x14x576 0.92x (one core, interleaved).
_FLAT_GAIN = 1.02
_FLAT_MAX_WIDTH = 7
FLAT_ATTR = "hwc.conv_flat"  # the conv's output pixels as one row-major axis


@dataclass(frozen=True)
class ConvTile:
    """Register tile of the packed conv: ``ty x tx`` output pixels x ``nvec`` channel vectors."""

    ty: int
    tx: int
    nvec: int
    lanes: int

    @property
    def block(self) -> int:
        """Output channels per packed weight block (``ob``)."""
        return self.nvec * self.lanes

    def padded_width(self, out_w: int) -> int:
        return _round_up(out_w, self.tx)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Score factor of a tile that rounds the output width up where that costs more than the extra
# columns: an unpadded conv then copies its input (one core, 1x1 16->96 at 112x112 + bias +
# ReLU6: tile 1x6x2, 114 columns and a copy, 0.85 ms; 1x4x3, none, 0.66 ms; the model scored
# them 1.10 / 1.06), a depthwise conv, which reads in place, crops and checks more bounds.
_ROUNDING_COPY = 0.9


def _efficiency(ty: int, tx: int, nvec: int) -> float:
    """Modelled fraction of FMA peak of a ``ty x tx x nvec`` register tile.

    FMAs per reduction step: ``acc = ty*tx*nvec`` (two pipes, 4-cycle latency: 8 independent
    accumulators keep them busy); loads: one broadcast per pixel plus ``nvec`` weight vectors
    (two per cycle). Factors from measurement on Zen 3: 4 channel vectors ran ~10% slower than
    2 (more weight traffic per pixel), 1 vector ~15%.
    """
    acc = ty * tx * nvec
    eff = min(1.0, acc / 8) * min(1.0, acc / (ty * tx + nvec))
    eff *= {1: 0.85, 2: 1.0, 3: 0.95, 4: 0.9}.get(nvec, 0.8)
    return eff * (1.0 + 0.01 * acc)  # larger tiles amortize init and write-back a little


def choose_tile(out_h: int, out_w: int, out_c: int, lanes: int, acc_regs: int, unpadded: bool = False) -> ConvTile | None:
    """The register tile for an ``out_h x out_w x out_c`` output, None when ``out_c`` has no
    whole vector of ``lanes`` channels.

    Candidates: ``ty`` divides ``out_h`` (no predicated rows), ``tx`` any width (the output
    width is rounded up to whole tiles, the extra columns computed and dropped), ``nvec``
    divides ``out_c / lanes``; at most ``acc_regs`` accumulators. The score is the modelled
    efficiency times the useful fraction of the padded width; ``unpadded`` (a conv without
    spatial padding, which reads its input in place): a width rounded up also costs a padded
    copy of the input (``_ROUNDING_COPY``).
    """
    if out_c % lanes:
        return None
    best, best_score = None, 0.0
    for nvec in (n for n in (1, 2, 3, 4) if (out_c // lanes) % n == 0):
        for ty in (t for t in range(1, 5) if out_h % t == 0):
            for tx in range(1, min(_MAX_ROWS, acc_regs) + 1):
                if ty * tx * nvec > acc_regs:
                    break
                score = tile_score(ConvTile(ty, tx, nvec, lanes), out_w)
                if unpadded and out_w % tx:
                    score *= _ROUNDING_COPY
                if score > best_score + 1e-9:
                    best, best_score = ConvTile(ty, tx, nvec, lanes), score
    return best


def choose_flat_tile(out_h: int, out_w: int, out_c: int, lanes: int, acc_regs: int, rows: ConvTile | None) -> ConvTile | None:
    """A register tile over the ``out_h * out_w`` output pixels taken as one row-major axis,
    where it wastes less than the row tile ``rows`` (``choose_tile``'s; None elsewhere).

    A row tile rounds every row up to whole tiles: 7 pixels wide, 4-pixel tiles compute 8
    (ResNet-18's int8 512-channel 7x7 layers: 68 against 89 GMAC/s at 14x14); 49 flattened
    pixels in 5-pixel tiles compute 50. The pixel of a flat index is ``(p // out_w, p %
    out_w)``, an address computed once per tile pixel outside the reduction.
    """
    if out_w > _FLAT_MAX_WIDTH:
        return None
    pixels = out_h * out_w
    flat = choose_tile(1, pixels, out_c, lanes, acc_regs)
    if rows is None or flat is None or tile_score(flat, pixels) <= tile_score(rows, out_w) * _FLAT_GAIN:
        return None
    return flat


def tile_score(tile: ConvTile, out_w: int) -> float:
    """``choose_tile``'s score of ``tile`` on an output ``out_w`` wide: the modelled
    efficiency times the useful fraction of the width rounded up to whole tiles."""
    return _efficiency(tile.ty, tile.tx, tile.nvec) * out_w / tile.padded_width(out_w)


def pack_weight(weight_ohwi: np.ndarray, block: int) -> np.ndarray:
    """``(O, KH, KW, I)`` -> ``(O/block, KH, KW, I, block)``."""
    o, kh, kw, i = weight_ohwi.shape
    return np.ascontiguousarray(weight_ohwi.reshape(o // block, block, kh, kw, i).transpose(0, 2, 3, 4, 1))


def conv2d_nhwc_packed(data, weight, strides, padding, dilation, tile: ConvTile, flat: bool = False, target_lanes: int | None = None):
    """TE compute of an NHWC conv with a packed weight ``(O/ob, KH, KW, I, ob)``.

    ``padding`` is ``(top, left, bottom, right)``; ``flat``: ``tile`` is a
    ``choose_flat_tile`` tile (the conv computes ``(N, pixels, O)``, the crop reshapes it);
    ``target_lanes``: the target's vector lanes (``tile_attr``; None: the tile's own).
    Returns the ``(N, OH, OW, O)`` output.
    """
    from tvm import te
    from tvm.topi.utils import get_const_tuple

    ci = int(data.shape[3])
    n_ob, kh, kw, ci_w, ob = get_const_tuple(weight.shape)
    if ci_w != ci or ob != tile.block:
        raise ValueError(f"packed weight {weight.shape} does not fit data {data.shape} / tile {tile}")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rc = te.reduce_axis((0, ci), "rc")
    if flat:
        src, (n, out_h, pixels, out_w), (sh, sw), (dh, dw) = _padded_source(data, (kh, kw), strides, padding, dilation, tile, flat=True)
        conv = te.compute(
            (n, pixels, n_ob * ob),
            lambda b, p, o: te.sum(
                src[b, p // out_w * sh + ry * dh, p % out_w * sw + rx * dw, rc] * weight[o // ob, ry, rx, rc, o % ob],
                axis=[ry, rx, rc],
            ),
            name="conv2d_nhwc_packed",
            attrs={TILE_ATTR: tile_attr(tile, target_lanes), FLAT_ATTR: 1},
        )
        return te.compute((n, out_h, out_w, n_ob * ob), lambda b, y, x, o: conv[b, y * out_w + x, o], name="conv2d_nhwc_crop")
    src, (n, out_h, out_wp, out_w), (sh, sw), (dh, dw) = _padded_source(data, (kh, kw), strides, padding, dilation, tile)
    conv = te.compute(
        (n, out_h, out_wp, n_ob * ob),
        lambda b, y, x, o: te.sum(
            src[b, y * sh + ry * dh, x * sw + rx * dw, rc] * weight[o // ob, ry, rx, rc, o % ob], axis=[ry, rx, rc]
        ),
        name="conv2d_nhwc_packed",
        attrs={TILE_ATTR: tile_attr(tile, target_lanes)},
    )
    return _cropped(conv, out_w)


def depthwise_nhwc_packed(data, weight, strides, padding, dilation, tile: ConvTile, target_lanes: int | None = None):
    """TE compute of an NHWC depthwise conv (one filter per channel) with the weight
    ``(KH, KW, C)``: the channels a tile computes contiguous for every filter tap."""
    from tvm import te
    from tvm.topi.utils import get_const_tuple

    kh, kw, c = get_const_tuple(weight.shape)
    if c != int(data.shape[3]) or c % tile.block:
        raise ValueError(f"depthwise weight {weight.shape} does not fit data {data.shape} / tile {tile}")
    src, (n, out_h, out_wp, out_w), (sh, sw), (dh, dw) = _padded_source(data, (kh, kw), strides, padding, dilation, tile)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    conv = te.compute(
        (n, out_h, out_wp, c),
        lambda b, y, x, o: te.sum(src[b, y * sh + ry * dh, x * sw + rx * dw, o] * weight[ry, rx, o], axis=[ry, rx]),
        name="depthwise_nhwc_packed",
        attrs={TILE_ATTR: tile_attr(tile, target_lanes)},
    )
    return _cropped(conv, out_w)


def conv_geometry(size, kernel, strides, padding, dilation, tile: ConvTile, flat: bool = False) -> tuple[int, int, int, int, int]:
    """``(out_h, out_w, out_wp, rows, cols)`` of a conv on an ``size = (h, w)`` input:
    the output size, its width rounded up to whole register tiles, and the input rows and
    columns (padding included) that the rounded-up output reads. ``flat`` (a
    ``choose_flat_tile`` tile): ``out_wp`` is the pixel count rounded up to whole tiles, whose
    extra pixels read rows past the last output row."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = size, kernel, strides, dilation
    pt, pl, pb, pr = padding
    out_h = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if flat:
        pixels = tile.padded_width(out_h * out_w)
        return out_h, out_w, pixels, (pixels - 1) // out_w * sh + dh * (kh - 1) + 1, (out_w - 1) * sw + dw * (kw - 1) + 1
    out_wp = tile.padded_width(out_w)
    return out_h, out_w, out_wp, (out_h - 1) * sh + dh * (kh - 1) + 1, (out_wp - 1) * sw + dw * (kw - 1) + 1


def _padded_source(data, kernel, strides, padding, dilation, tile: ConvTile, flat: bool = False):
    """The zero-padded input (extra columns when the width is rounded up to whole tiles; the
    input itself when no padding is needed), the output geometry (``conv_geometry``'s, with
    ``flat``), strides and dilation."""
    from tvm import te
    from tvm.topi.utils import get_const_tuple

    n, h, w, ci = get_const_tuple(data.shape)
    sh, sw = strides
    dh, dw = dilation
    pt, pl = padding[:2]
    out_h, out_w, out_wp, rows, cols = conv_geometry((h, w), kernel, strides, padding, dilation, tile, flat)
    dtype = str(data.dtype)
    if pt or pl or rows > h + pt or cols > w + pl:

        def padded(b, y, x, c):
            inside = te.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
            return te.if_then_else(inside, data[b, y - pt, x - pl, c], te.const(0, dtype))

        src = te.compute((n, rows, cols, ci), padded, name="data_pad")
    else:
        src = data
    return src, (n, out_h, out_wp, out_w), (sh, sw), (dh, dw)


def _cropped(conv, out_w: int):
    """``conv`` without the columns computed past ``out_w`` (a copy only when there are any)."""
    from tvm import te

    n, out_h, out_wp, c = (int(d) for d in conv.shape)
    if out_wp == out_w:
        return conv
    return te.compute((n, out_h, out_w, c), lambda b, y, x, o: conv[b, y, x, o], name="conv2d_nhwc_crop")


def choose_depthwise_tile(out_w: int, channels: int, lanes: int, acc_regs: int) -> ConvTile | None:
    """Register tile of the depthwise kernel: ``tx`` pixels x one channel vector.

    Every multiply-add loads its own input vector (no reuse across output channels) and the
    input is read in place with bounds checks, so the kernel is load- and branch-bound: 7-8
    accumulators with one weight vector per tap and a width that needs no rounding ran best.
    Measured (one core, 3x3 + bias + ReLU6, in place): 56x56x144 1x7x1 0.156 ms against
    1x4x3 (12 accumulators) 0.284, 1x8x1 0.177, 1x4x2 0.198; 112x112x32 1x7x1 0.113 against
    1x6x2 (width rounded to 114) 0.227; 7x7x960 0.020 against 0.046. The score: the fill of 7
    accumulators times the useful fraction of the rounded width, 0.9 more if it is rounded."""
    if channels % lanes:
        return None
    best, best_score = None, 0.0
    for tx in range(1, min(8, acc_regs) + 1):
        score = min(1.0, tx / 7) * out_w / _round_up(out_w, tx) * (1.0 if out_w % tx == 0 else _ROUNDING_COPY)
        if score > best_score + 1e-9:
            best, best_score = ConvTile(1, tx, 1, lanes), score
    return best


# ---------------------------------------------------------------------------- legalization


def legalize_conv2d(facts, winograd: bool = True):
    """A ``LegalizeOps`` function for ``relax.nn.conv2d`` on a CPU with ``facts``: eligible
    convs become the packed kernel, every other conv TVM's default legalization
    (``winograd``: int8 convs may run as ``cpu_int8_winograd``, see ``legalize_conv2d_int8``)."""
    import tvm
    from tvm import relax

    from .cpu_int8 import legalize_conv2d_int8

    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    int8 = legalize_conv2d_int8(facts, winograd)

    def legalize(bb, call):
        if int8.handles(call):  # uint8 x int8 -> int32: the integer kernels
            return int8(bb, call)
        kind, tile = _tile_for(call, facts)
        if tile is None:
            return default(bb, call)
        attrs = call.attrs
        weight = call.args[1].value.numpy()
        if kind == "depthwise":  # OHWI (C, KH, KW, 1) -> (KH, KW, C)
            packed, te_func = np.ascontiguousarray(weight[..., 0].transpose(1, 2, 0)), depthwise_nhwc_packed
        else:
            flat = kind == "flat"
            packed, te_func = pack_weight(weight, tile.block), lambda *a, **kw: conv2d_nhwc_packed(*a, flat=flat, **kw)
        padding = [int(p) for p in attrs.padding]
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        padding = padding * 2 if len(padding) == 2 else padding

        def compute(data, weight):  # call_te converts keyword arguments; the tile is no TVM object
            return te_func(data, weight, strides, padding, dilation, tile, target_lanes=facts.lanes(32))

        return bb.call_te(compute, call.args[0], relax.const(packed, "float32"), primfunc_name_hint="conv2d")

    # passes that would hide the constant weight (the ``fuse`` technique's groups) ask this
    legalize.handles = lambda call: int8.handles(call) or _tile_for(call, facts)[1] is not None
    return legalize


def _tile_for(call, facts) -> tuple[str, ConvTile | None]:
    """``("conv" | "flat" | "depthwise", tile)`` when ``call`` is a conv one of the packed
    kernels handles, else ``("", None)``."""
    import tvm

    attrs = call.attrs
    data, weight = call.args
    none = ("", None)
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return none
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    if layouts != ("NHWC", "OHWI", "NHWC"):
        return none
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
    if str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32" or out_dtype not in ("", "void", "float32"):
        return none
    try:
        _, out_h, out_w, out_c = (int(d) for d in call.ty.shape)
        in_c = int(data.ty.shape[3])
    except (TypeError, ValueError):  # symbolic shapes: the tile must be static
        return none
    groups = int(attrs.groups)
    if groups == 1:
        for lanes in tile_lanes(facts):
            rows = choose_tile(out_h, out_w, out_c, lanes, facts.acc_regs, unpadded=not any(int(p) for p in attrs.padding))
            if rows is not None:
                break
        flat = choose_flat_tile(out_h, out_w, out_c, lanes, facts.acc_regs, rows)
        return ("flat", flat) if flat is not None else ("conv", rows)
    if groups == in_c == out_c:  # depthwise, one filter per channel
        tiles = (choose_depthwise_tile(out_w, out_c, lanes, facts.acc_regs) for lanes in tile_lanes(facts))
        return "depthwise", next((t for t in tiles if t is not None), None)
    return none


def tile_lanes(facts) -> tuple[int, ...]:
    """Vector widths a packed conv's tile may take: the target's, then on AVX-512 half of it
    (ymm, still 32 registers) for channel counts that are multiples of 8 but not 16 (24, 40,
    48: MobileNetV2's and others'), which would otherwise fall back to TVM's default conv."""
    lanes = facts.lanes(32)
    return (lanes, lanes // 2) if lanes >= 16 else (lanes,)


def tile_attr(tile: ConvTile, target_lanes: int | None) -> list[int]:
    """``TILE_ATTR``'s value: ``[ty, tx, nvec]``, and the tile's lanes where they are not the
    target's vector width ``target_lanes`` (``tile_lanes``'s half width; left out otherwise,
    and for None, so that the workloads of shipped tuning databases keep their structure)."""
    own = target_lanes is not None and tile.lanes != target_lanes
    return [tile.ty, tile.tx, tile.nvec] + ([tile.lanes] if own else [])


# ---------------------------------------------------------------------------- default schedule


def schedule_packed_conv(sch, facts) -> bool:
    """Default schedule of a (fused) packed conv kernel; False if ``sch`` holds none.

    Output tiles ``(n, oc-block, row-block)`` in parallel (depthwise: ``(n, row)``), the
    reduction outside the register tile, the tile written back through the inlined epilogue;
    the padding copy a parallel, vectorized stage of its own.
    """
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = sch.get_child_blocks(get_root_block(sch))
    conv = next((b for b in blocks if TILE_ATTR in sch.get(b).annotations), None)
    if conv is None:
        return False
    ty, tx, nvec, *own = (int(v) for v in sch.get(conv).annotations[TILE_ATTR])
    lanes = own[0] if own else facts.lanes(32)  # tile_attr: a half-width tile says so
    names = {sch.get(b).name_hint: b for b in blocks}

    loops = sch.get_loops(conv)
    flat = FLAT_ATTR in sch.get(conv).annotations
    depthwise = not flat and len(loops) == 6  # b, y, x, c | ry, rx
    if not depthwise:  # conv: b, y, x, o | ry, rx, rc; flat: b, p, o | ry, rx, rc (no row axis)
        b, *y, x, o, ry, rx, rc = loops
        rows = list(sch.split(y[0], [None, ty])) if y else []  # [yo, yi]
        xo, xi = sch.split(x, [None, tx])
        oo, om, ol = sch.split(o, [None, nvec, lanes])
        sch.reorder(b, oo, *rows[:1], xo, ry, rx, rc, *rows[1:], xi, om, ol)
        one_tile = _extent(sch, xo) == 1 and (not rows or _extent(sch, rows[0]) == 1)
        # a stack array ("global"), not workspace ("local"): LLVM keeps it in registers
        # across the prefetch calls (see cpu_winograd)
        write_back = sch.cache_write(conv, 0, "global")
        sch.reverse_compute_at(write_back, xo, preserve_unit_loops=True)
        sch.parallel(sch.fuse(b, oo, *rows[:1]))
        if rows:
            sch.unroll(rows[1])
        depth = 2  # parallel, xo
    else:  # depthwise: b, y, x, c | ry, rx; each pixel's channels are contiguous
        b, y, x, o, ry, rx = loops
        xo, xi = sch.split(x, [None, tx])
        oo, om, ol = sch.split(o, [None, nvec, lanes])
        sch.reorder(b, y, xo, oo, ry, rx, xi, om, ol)
        write_back = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(write_back, oo, preserve_unit_loops=True)
        sch.parallel(sch.fuse(b, y))
        sch.unroll(ry)
        sch.unroll(rx)
        depth = 3  # parallel, xo, oo
        one_tile = False
    sch.unroll(xi)
    sch.unroll(om)
    sch.vectorize(ol)
    init = sch.decompose_reduction(conv, ry)
    _unroll_vectorize(sch, sch.get_loops(init)[depth:], lanes)
    if one_tile:
        # one pixel tile (a GEMV, a small feature map): each weight panel is read once, from
        # memory when the weights exceed the caches; prefetch it ahead of the reads
        weight = sch.get(conv).reads[-1].source
        annotate_prefetch(sch, sch.get_loops(conv)[depth + 2], conv, weight, nvec * lanes * weight.dtype.bits // 8, facts.prefetch_bytes)

    cropped = "conv2d_nhwc_crop" in names
    tail = write_back
    if cropped:
        tail = names["conv2d_nhwc_crop"]
        if not flat:  # a flat tile's pixels are no rectangle of the crop: its own stage
            sch.reverse_compute_at(tail, xo, preserve_unit_loops=True)
        _unroll_vectorize(sch, sch.get_loops(write_back)[depth:], lanes)
    while True:  # the elementwise epilogue, one consumer at a time
        consumers = sch.get_consumers(tail)
        if len(consumers) != 1 or not attempt(sch.reverse_compute_inline, consumers[0]):
            break
    if cropped and flat:
        tail_loops = sch.get_loops(tail)
        sch.parallel(sch.fuse(*tail_loops[:2]))
        _vectorize_tail(sch, tail_loops[-1], lanes)
    else:
        _unroll_vectorize(sch, sch.get_loops(tail)[2 if cropped else depth:], lanes)

    if "data_pad" in names and depthwise:
        # a depthwise conv reads each input 9 times (3x3) at most, 2.25 at stride 2: the padded
        # copy cost more than the bounds checks of reading the input in place (one core,
        # 3x3 + bias + ReLU6: 112x112x96 s2 2.0x, 56x56x144 s1 1.08x, 14x14x576 s1 1.45x)
        sch.compute_inline(names["data_pad"])
    elif "data_pad" in names:
        pad = names["data_pad"]
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        _vectorize_tail(sch, loops[-1], lanes)
    _schedule_rest(sch, get_root_block(sch), lanes)
    return True


def _schedule_rest(sch, root, lanes: int) -> None:
    """Blocks the epilogue could not inline into the tile (none in the usual fusions): a
    parallel outer loop and a vectorized channel loop each."""
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        if not loops or sch.get(loops[0]).kind != 0:  # 0: serial; scheduled blocks are parallel
            continue
        sch.parallel(sch.fuse(*loops[: max(len(loops) - 2, 1)]))
        _vectorize_tail(sch, loops[-1], lanes)


def _unroll_vectorize(sch, loops, lanes: int) -> None:
    """Unroll all but the innermost loop, vectorize that one (by ``lanes`` if it is longer)."""
    for loop in loops[:-1]:
        sch.unroll(loop)
    _vectorize_tail(sch, loops[-1], lanes)


def _vectorize_tail(sch, loop, lanes: int) -> None:
    """Vectorize an innermost elementwise loop by ``lanes`` when it divides evenly."""
    n = int(sch.get(loop).extent)
    if n == lanes:
        sch.vectorize(loop)
    elif n % lanes == 0:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


