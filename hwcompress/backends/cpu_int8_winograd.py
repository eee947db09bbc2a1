"""Exact INT8 Winograd F(2x2, 3x3) for CPUs whose integer dot is ``vpmaddwd`` (AVX2 without VNNI).

An int8 3x3 conv (uint8 NHWC data x constant int8 OHWI weight -> int32, stride 1) computed as
``Y = A^T [U * V] A`` with ``U = (2G) g (2G)^T`` and ``V = B^T d B``: every matrix of F(2,3) is
integer once G is doubled, so the result is ``4 * conv`` in integers and ``>> 2`` gives the
direct conv's int32 sums **bit for bit** (no rounding anywhere; the requantization epilogue
that follows is unchanged). Ranges: ``|V| <= 4 * 255`` and ``|U| <= 9 * 128`` fit int16, so the
batched GEMM is int16 x int16 -> int32 with ``vpmaddwd`` (two input channels per int32 lane),
exact while ``C * 1020 * 1152 < 2^31`` (``C <= _MAX_CHANNELS``). The output transform sums nine
GEMM results, which may pass int32 for adversarial inputs although the final ``4 * conv``
fits: it runs in uint32, whose wrapping is defined, and the result is reinterpreted as int32.

Why: on AVX2 without VNNI the direct int8 kernels multiply with ``vpmaddubsw`` + ``vpmaddwd``
(32 MACs per pair); ``vpmaddwd`` alone on int16 does 16 per instruction, measured on Zen 3 at
~0.8 of the pair's MAC rate (BENCHMARKS.md), so F(2,3)'s 16 products per 2x2 outputs (36
direct) are a ~1.8x cut of the multiply time, less the transforms: 1.2-1.3x on the layers
where it is used. With VNNI (64 MACs per instruction on zmm) the direct kernel stays.

Stages (block names as in ``passes.winograd_te``, whose transforms and schedule helpers this
reuses; the output block is ``conv2d_winograd_int8`` so the float rule leaves these alone):
``data_pad`` (uint8 -> int16, padded to whole tiles and an even channel count),
``data_pack_rows`` / ``data_pack`` (``B^T d B``), ``bgemm`` (tensorized ``vpmaddwd``),
``inverse_rows`` / ``inverse`` (``A^T M A``, uint32), ``conv2d_winograd_int8`` (gather, ``>> 2``).
"""

from __future__ import annotations

import numpy as np

from ..passes.winograd_te import STAGE_ATTR, _one_sided
from .common import attempt
from .cpu_conv import _round_up, _vectorize_tail
from .cpu_intrin import DotIntrin, Int8Dot, register
from .cpu_winograd import _gemm_rows, _schedule_transform

OUT_BLOCK = "conv2d_winograd_int8"
LANES = 8  # int32 lanes of an AVX2 vector
INTRIN = DotIntrin(Int8Dot.PMADDWD16, LANES)  # C[8] += A[2] (int16 pair, broadcast) x B[8, 2] (int16)
BLOCK = 2 * LANES  # output channels of a GEMM register tile
_ALPHA, _M = 4, 2
ROWS_ATTR = "hwc.winograd_rows"  # the GEMM register tile's rows (tiles), set by the compute
_MAX_CHANNELS = 1024  # C * 1020 * 1152 < 2^31: the GEMM's int32 sums cannot overflow
# Where it pays, measured on ResNet-18's layers (one Zen 3 core, interleaved with the direct
# int8 kernel, bit-identical outputs): 28x28x128 1.16-1.21x, 14x14x256 1.21-1.28x; but
# 56x56x64 0.82-0.84x (64 channels: the transforms' share of the work is 4x that at 256) and
# 7x7x512 0.79-0.82x (16 tiles: each int16 weight, 3.6x the int8 bytes, is used 16 times).
_MIN_CHANNELS = 128
_MIN_TILES = 49

# F(2,3) with G doubled: all integer (``winograd_math.winograd_matrices(2, 3)``, 2 * G)
_A = np.array([[1, 0], [1, -1], [1, 1], [0, 1]], dtype=np.int64)
_B = np.array([[1, 0, 0, 0], [0, -1, 1, -1], [-1, 1, 1, 0], [0, 0, 0, 1]], dtype=np.int64)
_G2 = np.array([[2, 0, 0], [1, -1, 1], [1, 1, 1], [0, 0, 2]], dtype=np.int64)


def eligible(attrs, weight_shape, data_shape) -> bool:
    """Whether an int8 NHWC/OHWI conv runs as this kernel: 3x3, stride 1, dilation 1, one
    group, whole ``BLOCK``s of output channels, ``_MIN_CHANNELS <= C <= _MAX_CHANNELS`` input
    channels and at least ``_MIN_TILES`` output tiles (see there)."""
    o, kh, kw, i = weight_shape
    if (kh, kw) != (3, 3) or len(data_shape) != 4 or int(attrs.groups) != 1 or o % BLOCK:
        return False
    if any(int(s) != 1 for s in attrs.strides) or any(int(d) != 1 for d in attrs.dilation):
        return False
    pad = [int(p) for p in attrs.padding]
    pad = pad * 2 if len(pad) == 2 else pad
    out_h, out_w = data_shape[1] + pad[0] + pad[2] - 2, data_shape[2] + pad[1] + pad[3] - 2
    tiles = data_shape[0] * -(-out_h // _M) * -(-out_w // _M)
    return _MIN_CHANNELS <= i <= _MAX_CHANNELS and tiles >= _MIN_TILES


def transform_weight(weight_ohwi: np.ndarray) -> np.ndarray:
    """``(O, 3, 3, I)`` int8 -> ``U = (2G) g (2G)^T`` packed ``(4, 4, O/16, I'/2, 16, 2)`` int16
    (``I'`` = ``I`` rounded up to even, the extra channel zero)."""
    o, _, _, i = weight_ohwi.shape
    g = weight_ohwi.astype(np.int64)
    u = np.einsum("ak,okli,bl->abio", _G2, g, _G2)  # (4, 4, I, O)
    i2 = _round_up(i, 2)
    u = np.pad(u, ((0, 0), (0, 0), (0, i2 - i), (0, 0)))
    assert np.abs(u).max(initial=0) < 2**15
    u = u.reshape(_ALPHA, _ALPHA, i2 // 2, 2, o // BLOCK, BLOCK).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(u.astype(np.int16))


def winograd_int8_te(data, weight, padding, out_c: int):
    """TE compute: uint8 NHWC ``data`` (``padding`` = top, left, bottom, right, zeros) and the
    packed ``weight`` of ``transform_weight`` -> the int32 ``(N, OH, OW, out_c)`` conv sums."""
    from tvm import te, tirx
    from tvm.topi.utils import const_matrix, get_const_tuple

    n, h, w, ci = get_const_tuple(data.shape)
    _, _, n_ob, n_k2, ob, _ = get_const_tuple(weight.shape)
    pt, pl, pb, pr = padding
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    nh, nw = -(-out_h // _M), -(-out_w // _M)
    tiles = n * nh * nw
    # 5 or 4 rows x 2 accumulator vectors: vpmaddwd's temporary, two weight vectors and a
    # broadcast fit AVX2's 16 registers
    rows = _gemm_rows(tiles, sizes=(5, 4))
    p_tiles = _round_up(tiles, rows)  # whole GEMM row tiles (no predicate: the dot is tensorized)
    ci2 = 2 * n_k2

    def padded(b, y, x, c):
        inside = tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl, c < ci)
        return tirx.if_then_else(inside, data[b, y - pt, x - pl, c].astype("int16"), tirx.const(0, "int16"))

    data_pad = te.compute((n, nh * _M + 2, nw * _M + 2, ci2), padded, name="data_pad", attrs={STAGE_ATTR: "data_pad"})

    def tile_of(p):
        return p // (nh * nw), (p // nw) % nh * _M, p % nw * _M

    input_tile = te.compute(
        (_ALPHA, _ALPHA, p_tiles, ci2),
        lambda eps, nu, p, c: tirx.if_then_else(
            p < tiles, data_pad[tile_of(p)[0], tile_of(p)[1] + eps, tile_of(p)[2] + nu, c], tirx.const(0, "int16")
        ),
        name="input_tile",
    )
    B = const_matrix(_B.astype("int16"), "B")
    pack_rows = _one_sided(input_tile, B, _ALPHA, 0, "data_pack_rows")
    data_pack = _one_sided(pack_rows, B, _ALPHA, 1, "data_pack")
    k2 = te.reduce_axis((0, n_k2), "k2")
    kk = te.reduce_axis((0, 2), "kk")
    bgemm = te.compute(
        (_ALPHA, _ALPHA, p_tiles, n_ob * ob),
        lambda eps, nu, p, o: te.sum(
            data_pack[eps, nu, p, k2 * 2 + kk].astype("int32") * weight[eps, nu, o // ob, k2, o % ob, kk].astype("int32"),
            axis=[k2, kk],
        ),
        name="bgemm",
        attrs={STAGE_ATTR: "bgemm", ROWS_ATTR: rows},
    )
    wrapping = te.compute(bgemm.shape, lambda *i: bgemm[i].astype("uint32"), name="bgemm_u32")
    A = const_matrix(_A.astype("uint32"), "A")  # -1 is 2^32 - 1: exact mod 2^32
    inverse_rows = _one_sided(wrapping, A, _M, 0, "inverse_rows")
    inverse = _one_sided(inverse_rows, A, _M, 1, "inverse")

    def gather(b, y, x, o):
        four = tirx.reinterpret("int32", inverse[y % _M, x % _M, b * nh * nw + y // _M * nw + x // _M, o])
        return tirx.shift_right(four, tirx.const(2, "int32"))

    return te.compute((n, out_h, out_w, out_c), gather, name=OUT_BLOCK)


# ---------------------------------------------------------------------------- schedule


def schedule_int8_winograd(sch, facts) -> bool:
    """Default schedule of a (fused) int8 Winograd kernel; False if ``sch`` holds none.

    As ``cpu_winograd.schedule_winograd``: the transforms per (tile, channel vector),
    unrolled over the tile; the batched GEMM a ``u`` tiles x 2 vectors register tile with each
    ``8 x 2`` dot one ``vpmaddwd``; the gather with the requantization epilogue inlined.
    """
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(get_root_block(sch))}
    if OUT_BLOCK not in blocks:
        return False
    stages = {str(sch.get(b).annotations[STAGE_ATTR]): b for b in blocks.values() if STAGE_ATTR in sch.get(b).annotations}
    lanes = facts.lanes(32)
    for name in ("A", "B", "input_tile", "bgemm_u32"):
        sch.compute_inline(blocks[name])
    pad_loops = sch.get_loops(stages["data_pad"])
    sch.parallel(sch.fuse(*pad_loops[:2]))
    _vectorize_tail(sch, pad_loops[-1], 2 * lanes)
    _schedule_transform(sch, stages["data_pack"], stages["data_pack_rows"], 2 * lanes)
    _schedule_gemm(sch, stages["bgemm"])
    _schedule_transform(sch, stages["inverse"], stages["inverse_rows"], lanes)
    out = blocks[OUT_BLOCK]
    for consumer in list(sch.get_consumers(out)):
        attempt(sch.reverse_compute_inline, consumer)
    for block in sch.get_child_blocks(get_root_block(sch)):
        loops = sch.get_loops(block)
        if not loops or sch.get(loops[0]).kind != 0:  # scheduled stages start with a parallel loop
            continue
        sch.parallel(sch.fuse(*loops[: max(len(loops) - 2, 1)]))
        _vectorize_tail(sch, loops[-1], lanes)
    return True


def _schedule_gemm(sch, bgemm) -> None:
    """Batched GEMM (eps, nu, p, o | k2, kk): ``u x 2`` vectors of int32 accumulators, the
    input-channel pairs the reduction outside the tile, parallel over the 16 GEMMs and the
    output-channel blocks."""
    register(INTRIN)
    eps, nu, p, o, k2, kk = sch.get_loops(bgemm)
    u = int(sch.get(bgemm).annotations[ROWS_ATTR])
    p_o, p_i = sch.split(p, [None, u])
    o_o, o_m, o_l = sch.split(o, [None, BLOCK // LANES, LANES])
    sch.reorder(eps, nu, o_o, p_o, k2, p_i, o_m, o_l, kk)
    write_back = sch.cache_write(bgemm, 0, "local")
    sch.reverse_compute_at(write_back, p_o, preserve_unit_loops=True)
    sch.parallel(sch.fuse(eps, nu, o_o))
    sch.unroll(p_i)
    sch.unroll(o_m)
    init = sch.decompose_reduction(bgemm, k2)
    sch.tensorize(o_l, INTRIN.name)
    for block in (init, write_back):
        loops = sch.get_loops(block)[2:]  # under parallel, p_o
        for loop in loops[:-1]:
            sch.unroll(loop)
        sch.vectorize(loops[-1])
