"""The CPU backend's INT8 kernels (uint8 x int8 -> int32): weight packing, tile budget,
bit-exact numerics against a numpy int64 reference on this host (``vpmaddwd``; ``vpmaddubsw``
for 7-bit weights, with its choice by the weights at legalization), the Relax dispatch with a
fused requantization epilogue, and the VNNI (``vpdpbusd``) cross-build."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, s_tir, te  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends.cpu_int8 import (  # noqa: E402
    DOT_ATTR,
    FLAT_ATTR,
    TILE_ATTR,
    conv2d_nhwc_int8,
    dense_int8,
    conv_tile,
    dense_tile,
    flat_tile,
    pack_conv_weight,
    pack_dense_weight,
    schedule_int8,
)
from hwcompress.backends.cpu_conv import choose_tile  # noqa: E402
from hwcompress.backends.cpu_schedule import CpuFacts  # noqa: E402
from hwcompress.backends.cpu_intrin import SATURATION_FREE_WEIGHT, DotIntrin, Int8Dot, dot_for_weights, dot_intrin_for  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

HOST = load_target("host")
HOST_FACTS = CpuFacts.from_target(HOST.tvm_target())
needs_x86 = pytest.mark.skipif(HOST_FACTS.int8_dot is None, reason="the int8 kernels are x86 only")
FAST = DotIntrin(Int8Dot.PMADDUBSW, 8)  # AVX2's vpmaddubsw, for 7-bit weights
needs_avx2 = pytest.mark.skipif(HOST_FACTS.int8_dot is None or HOST_FACTS.vector_bits < 256, reason="vpmaddubsw on ymm needs AVX2")
# what legalization picks for 7-bit weights on this host: vpmaddubsw on AVX2 without VNNI
HOST_FAST = dot_for_weights(HOST_FACTS.int8_dot, SATURATION_FREE_WEIGHT)
needs_avx2_no_vnni = pytest.mark.skipif(HOST_FAST != FAST, reason="legalization picks vpmaddubsw on AVX2 without VNNI only")
# what each x86 dot leaves in the scheduled TIR (its LLVM intrinsic) and in the assembly (on a
# VNNI host LLVM folds vpmaddwd and its add into vpdpwssd)
TIR_MARK = {Int8Dot.PMADDWD: "pmadd.wd", Int8Dot.PMADDUBSW: "pmadd.ub.sw", Int8Dot.VNNI: "vpdpbusd"}
ASM_MARKS = {Int8Dot.PMADDWD: ("pmaddwd", "vpdpwssd"), Int8Dot.PMADDUBSW: ("pmaddubsw",), Int8Dot.VNNI: ("vpdpbusd",)}


def _has_dot(asm: str, kind) -> bool:
    return any(mark in asm for mark in ASM_MARKS[kind])


# ---------------------------------------------------------------------------- numpy references


def conv_ref(data, w_ohwi, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), pad_value=0):
    """NHWC x OHWI conv in int64, the input padded with ``pad_value``."""
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    x = np.pad(data.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=pad_value)
    o, kh, kw, _ = w_ohwi.shape
    out_h = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], out_h, out_w, o), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, ky * dh : ky * dh + (out_h - 1) * sh + 1 : sh, kx * dw : kx * dw + (out_w - 1) * sw + 1 : sw]
            out += np.einsum("nhwc,oc->nhwo", patch, w_ohwi[:, ky, kx].astype(np.int64))
    return out


def _full_range(rng, shape, dtype, w_max=None):
    """Random ``dtype`` integers over the whole range (int8: ``[-w_max, w_max]`` if given)."""
    lo, hi = (0, 256) if dtype == np.uint8 else (-128, 128) if w_max is None else (-w_max, w_max + 1)
    return rng.integers(lo, hi, shape, dtype=dtype)


# ---------------------------------------------------------------------------- pure parts


def test_conv_weight_packing_groups_reduction_elements_per_output_channel():
    w = np.arange(20 * 3 * 3 * 5, dtype=np.int64).reshape(20, 3, 3, 5).astype(np.int8)  # OHWI
    packed = pack_conv_weight(w, block=16, group=4)
    assert packed.shape == (2, 3, 3, 2, 16, 4)  # (O/16, KH, KW, I/4, 16, 4), O and I padded
    for o, ky, kx, i in [(0, 0, 0, 0), (17, 2, 1, 4), (5, 1, 2, 3)]:
        assert packed[o // 16, ky, kx, i // 4, o % 16, i % 4] == w[o, ky, kx, i]
    assert not packed[1, :, :, :, 4:].any() and not packed[:, :, :, 1, :, 1:].any()  # padding is zero weights
    assert pack_conv_weight(w, block=8, group=2).shape == (3, 3, 3, 3, 8, 2)


def test_dense_weight_packing():
    w = np.arange(7 * 20).reshape(7, 20).astype(np.int8)  # (K, N), the right operand of matmul
    packed = pack_dense_weight(w, block=16, group=4)
    assert packed.shape == (2, 2, 16, 4)
    for k, n in [(0, 0), (6, 19), (3, 16)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == w[k, n]
    assert not packed[:, 1, :, 3].any() and not packed[1, :, 4:].any()


@pytest.mark.parametrize("intrin", [DotIntrin(Int8Dot.PMADDWD, 8), FAST, DotIntrin(Int8Dot.VNNI, 16)])
@pytest.mark.parametrize("out_h,out_w,out_c", [(56, 56, 64), (14, 14, 256), (7, 7, 2048), (1, 1, 1000), (9, 13, 10)])
def test_tile_fits_the_register_budget(intrin, out_h, out_w, out_c):
    tile = conv_tile(out_h, out_w, out_c, intrin)
    assert tile.lanes == intrin.lanes and tile.block % intrin.lanes == 0
    assert tile.ty * tile.tx * tile.nvec <= intrin.acc_regs
    assert out_h % tile.ty == 0 and -(-out_c // intrin.lanes) * intrin.lanes % tile.block == 0


@pytest.mark.parametrize("intrin", [DotIntrin(Int8Dot.PMADDWD, 8), FAST, DotIntrin(Int8Dot.VNNI, 16)])
def test_dense_tile_computes_no_padded_rows_for_gemv(intrin):
    for m, n in [(1, 1000), (2, 2048), (1, 10)]:
        tile = dense_tile(m, n, intrin)
        assert (tile.ty, tile.tx) == (1, m) and tile.nvec * m <= intrin.acc_regs
        assert tile.nvec == min(4, -(-n // intrin.lanes))  # channels padded by less than one tile
    tile = dense_tile(64, 1000, intrin)  # batched: choose_tile's register tile
    assert tile.ty == 1 and 4 <= tile.tx * tile.nvec <= intrin.acc_regs


def test_dot_instruction_follows_the_target():
    assert HOST_FACTS.int8_dot in (None, DotIntrin(Int8Dot.PMADDWD, 8), DotIntrin(Int8Dot.PMADDWD, 16), DotIntrin(Int8Dot.VNNI, 16))
    assert dot_intrin_for(load_target("x86-avx512").tvm_target()) == DotIntrin(Int8Dot.VNNI, 16)
    assert dot_intrin_for(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})) == DotIntrin(Int8Dot.PMADDWD, 8)
    assert dot_intrin_for(load_target("arm-cortex-a76").tvm_target()) == DotIntrin(Int8Dot.SDOT, 4)  # tests/targets/test_arm_int8.py
    assert dot_intrin_for(load_target("arm-cortex-a72").tvm_target()) == DotIntrin(Int8Dot.SMULL, 4)  # no dotprod
    with pytest.raises(ValueError):
        DotIntrin(Int8Dot.VNNI, 8)  # no 256-bit VNNI intrinsic here


def test_vpmaddubsw_is_picked_only_for_7_bit_weights_without_vnni():
    """``dot_for_weights``: AVX2 / AVX512-BW ``vpmaddwd`` becomes ``vpmaddubsw`` (groups of 4,
    uint8 data) when every |w| <= 64, the largest that cannot saturate its int16 pair sums;
    VNNI, SSE2 (no SSSE3 intrinsic here) and no dot at all stay as they are."""
    pmaddwd = DotIntrin(Int8Dot.PMADDWD, 8)
    assert SATURATION_FREE_WEIGHT * 255 * 2 <= 32767 < (SATURATION_FREE_WEIGHT + 1) * 255 * 2
    assert dot_for_weights(pmaddwd, 64) == FAST and dot_for_weights(pmaddwd, 0) == FAST
    assert dot_for_weights(pmaddwd, 65) == pmaddwd and dot_for_weights(pmaddwd, 128) == pmaddwd
    assert dot_for_weights(DotIntrin(Int8Dot.PMADDWD, 16), 63) == DotIntrin(Int8Dot.PMADDUBSW, 16)
    for unchanged in (DotIntrin(Int8Dot.VNNI, 16), DotIntrin(Int8Dot.PMADDWD, 4), None):
        assert dot_for_weights(unchanged, 1) == unchanged
    assert (FAST.group, FAST.data_dtype, FAST.name) == (4, "uint8", "hwc_dot_8x4_pmaddubsw")
    with pytest.raises(ValueError):
        DotIntrin(Int8Dot.PMADDUBSW, 4)  # pmaddubsw on xmm is SSSE3, not registered


# ---------------------------------------------------------------------------- host kernels (TE level)

CONVS = {  # (N, H, W, I), (O, K), strides, padding (t, l, b, r), dilation, pad value (zero point)
    "3x3_zero_point_pad": ((1, 12, 12, 16), (16, 3), (1, 1), (1, 1, 1, 1), (1, 1), 131),
    "stride2_asymmetric_pad": ((1, 15, 13, 8), (24, 3), (2, 2), (0, 1, 2, 0), (1, 1), 7),
    "dilation2": ((1, 11, 11, 8), (8, 3), (1, 1), (2, 2, 2, 2), (2, 2), 255),
    "odd_channels_k_pad": ((2, 7, 9, 5), (10, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),  # I=5, O=10: both padded
    "1x1_no_pad": ((1, 7, 7, 64), (48, 1), (1, 1), (0, 0, 0, 0), (1, 1), 0),
    "1x1_whole_tiles": ((1, 8, 8, 64), (48, 1), (1, 1), (0, 0, 0, 0), (1, 1), 0),  # nothing to pad
    "stem_7x7_stride2": ((1, 20, 20, 3), (16, 7), (2, 2), (3, 3, 3, 3), (1, 1), 128),
}


def _build_te(tensors, facts, target):
    sch = s_tir.Schedule(te.create_prim_func(tensors))
    assert schedule_int8(sch, facts)
    return sch, tvm.compile(sch.mod, target=target)


def _host_conv(case, intrin=None, w_max=None):
    """``CONVS[case]`` built for the host with ``intrin`` (default: the CPU's exact one) on
    random weights in ``[-w_max, w_max]``; its output, the numpy reference, schedule, library."""
    (n, h, w, ci), (co, k), strides, padding, dilation, zp = CONVS[case]
    intrin = intrin or HOST_FACTS.int8_dot
    out_h = (h + padding[0] + padding[2] - dilation[0] * (k - 1) - 1) // strides[0] + 1
    out_w = (w + padding[1] + padding[3] - dilation[1] * (k - 1) - 1) // strides[1] + 1
    tile = conv_tile(out_h, out_w, co, intrin)
    rng = np.random.default_rng(hash(case) % 1000)
    x, wt = _full_range(rng, (n, h, w, ci), np.uint8), _full_range(rng, (co, k, k, ci), np.int8, w_max)
    packed = pack_conv_weight(wt, tile.block, intrin.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = conv2d_nhwc_int8(data, weight, strides, padding, dilation, tile, intrin, co, pad_value=zp)
    sch, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    return result.numpy(), conv_ref(x, wt, strides, padding, dilation, zp), sch, lib


@needs_x86
@pytest.mark.parametrize("case", sorted(CONVS))
def test_host_conv_is_bit_exact(case):
    out, ref, _, _ = _host_conv(case)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("intrin", [FAST, DotIntrin(Int8Dot.PMADDWD, 8), DotIntrin(Int8Dot.VNNI, 16)])
def test_flat_tile_only_where_rows_would_waste(intrin):
    assert flat_tile(7, 7, 512, intrin) is not None  # 7-pixel rows: 4-pixel tiles compute 8
    assert flat_tile(56, 56, 64, intrin) is None  # whole tiles per row already
    assert flat_tile(14, 14, 256, intrin) is None or intrin.kind is Int8Dot.VNNI


@needs_x86
@pytest.mark.parametrize("case", ["flat_7x7", "flat_stride2_zero_point", "flat_1x1"])
def test_flat_conv_is_bit_exact(case):
    """A conv over the output's pixels as one axis (``flat_tile``): the pixel -> (row, column)
    mapping, the pixels past the last row, padding and strides."""
    (n, h, w, ci), (co, k), strides, padding, zp = {
        "flat_7x7": ((1, 7, 7, 64), (48, 3), (1, 1), (1, 1, 1, 1), 0),
        "flat_stride2_zero_point": ((2, 13, 13, 16), (32, 3), (2, 2), (1, 1, 1, 1), 131),
        "flat_1x1": ((1, 7, 7, 40), (24, 1), (1, 1), (0, 0, 0, 0), 0),
    }[case]
    intrin = HOST_FACTS.int8_dot
    out_h = (h + padding[0] + padding[2] - k) // strides[0] + 1
    out_w = (w + padding[1] + padding[3] - k) // strides[1] + 1
    tile = flat_tile(out_h, out_w, co, intrin) or choose_tile(1, out_h * out_w, -(-co // intrin.lanes) * intrin.lanes, intrin.lanes, intrin.acc_regs)
    rng = np.random.default_rng(len(case))
    x, wt = _full_range(rng, (n, h, w, ci), np.uint8), _full_range(rng, (co, k, k, ci), np.int8)
    packed = pack_conv_weight(wt, tile.block, intrin.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = conv2d_nhwc_int8(data, weight, strides, padding, (1, 1), tile, intrin, co, pad_value=zp, flat=True)
    sch, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    assert FLAT_ATTR in sch.mod["main"].script()
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    np.testing.assert_array_equal(result.numpy(), conv_ref(x, wt, strides, padding, (1, 1), zp))


@needs_x86
def test_host_kernel_uses_the_exact_instruction():
    _, _, sch, lib = _host_conv("3x3_zero_point_pad")
    asm = lib.mod.inspect_source("asm")
    assert _has_dot(asm, HOST_FACTS.int8_dot.kind)
    assert "pmaddubsw" not in asm  # saturates on full-range u8 x s8 pairs
    assert HOST_FACTS.int8_dot.name in str(sch.trace)  # the dot is the tensorized intrinsic


@needs_x86
def test_worst_case_sums_do_not_saturate():
    """All-255 activations against all -128 / all 127 weights: any int16 pair sum saturates."""
    intrin = HOST_FACTS.int8_dot
    x = np.full((1, 4, 4, 64), 255, np.uint8)
    wt = np.concatenate([np.full((8, 3, 3, 64), -128, np.int8), np.full((8, 3, 3, 64), 127, np.int8)])
    tile = conv_tile(4, 4, 16, intrin)
    packed = pack_conv_weight(wt, tile.block, intrin.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = conv2d_nhwc_int8(data, weight, (1, 1), (1, 1, 1, 1), (1, 1), tile, intrin, 16, pad_value=255)
    _, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros((1, 4, 4, 16), np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    np.testing.assert_array_equal(result.numpy(), conv_ref(x, wt, padding=(1, 1, 1, 1), pad_value=255))
    assert result.numpy().min() == 255 * -128 * 9 * 64


@needs_x86
@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (5, 37, 20), (16, 64, 64)])
def test_host_dense_is_bit_exact(m, k, n):
    intrin = HOST_FACTS.int8_dot
    rng = np.random.default_rng(m * k + n)
    x, wt = _full_range(rng, (m, k), np.uint8), _full_range(rng, (k, n), np.int8)
    tile = dense_tile(m, n, intrin)
    packed = pack_dense_weight(wt, tile.block, intrin.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = dense_int8(data, weight, tile, intrin, n)
    _, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    np.testing.assert_array_equal(result.numpy(), x.astype(np.int64) @ wt.astype(np.int64))


# ---------------------------------------------------------------------------- vpmaddubsw (7-bit weights)


@needs_avx2
@pytest.mark.parametrize("case", sorted(CONVS))
def test_vpmaddubsw_conv_is_bit_exact_on_7_bit_weights(case):
    """Every conv shape (zero-point padding, stride, dilation, K padded to groups of 4, the
    7x7 stem with 3 channels) on weights in [-64, 64] and full-range uint8 activations."""
    out, ref, sch, _ = _host_conv(case, FAST, w_max=SATURATION_FREE_WEIGHT)
    assert FAST.name in str(sch.trace)
    np.testing.assert_array_equal(out, ref)


@needs_avx2
def test_vpmaddubsw_reads_uint8_in_place_and_has_the_instruction():
    """1x1 conv, nothing to pad: no ``data_pad`` copy (``vpmaddwd`` widens one to int16), and
    the assembly multiplies bytes with ``vpmaddubsw`` then sums pairs with ``vpmaddwd``."""
    assert conv_tile(8, 8, 48, FAST).padded_width(8) == 8  # the case's width is whole tiles
    out, ref, sch, lib = _host_conv("1x1_whole_tiles", FAST, w_max=SATURATION_FREE_WEIGHT)
    np.testing.assert_array_equal(out, ref)
    assert "data_pad" not in str(sch.mod)
    asm = lib.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm and _has_dot(asm, Int8Dot.PMADDWD) and "ymm" in asm
    if HOST_FACTS.int8_dot.kind is Int8Dot.PMADDWD:
        assert "data_pad" in str(_host_conv("1x1_whole_tiles")[2].mod)  # the int16 copy vpmaddubsw saves


@needs_avx2
@pytest.mark.parametrize("w", [SATURATION_FREE_WEIGHT, -SATURATION_FREE_WEIGHT, SATURATION_FREE_WEIGHT + 1])
def test_vpmaddubsw_worst_case_does_not_saturate(w):
    """All-255 activations (and padding) against all +-64 weights: every int16 pair sum is
    +-32640, the largest that fits; the int32 sums are exact. At 65 the pairs (33150)
    saturate to 32767: the bound is tight, and why legalization checks it."""
    x = np.full((1, 4, 4, 64), 255, np.uint8)
    wt = np.full((16, 3, 3, 64), w, np.int8)
    tile = conv_tile(4, 4, 16, FAST)
    packed = pack_conv_weight(wt, tile.block, FAST.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = conv2d_nhwc_int8(data, weight, (1, 1), (1, 1, 1, 1), (1, 1), tile, FAST, 16, pad_value=255)
    _, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros((1, 4, 4, 16), np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    pairs = 9 * 64 // 2
    expected = 255 * w * 2 * pairs if abs(w) <= SATURATION_FREE_WEIGHT else 32767 * pairs
    np.testing.assert_array_equal(result.numpy(), np.full((1, 4, 4, 16), expected))


@needs_avx2
@pytest.mark.parametrize("m,k,n", [(1, 2048, 1000), (5, 37, 20), (16, 64, 64)])
def test_vpmaddubsw_dense_is_bit_exact(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x, wt = _full_range(rng, (m, k), np.uint8), _full_range(rng, (k, n), np.int8, SATURATION_FREE_WEIGHT)
    tile = dense_tile(m, n, FAST)
    packed = pack_dense_weight(wt, tile.block, FAST.group)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = dense_int8(data, weight, tile, FAST, n)
    _, lib = _build_te([data, weight, out], HOST_FACTS, HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    np.testing.assert_array_equal(result.numpy(), x.astype(np.int64) @ wt.astype(np.int64))


def test_avx512bw_without_vnni_builds_vpmaddubsw_on_zmm():
    """Compiles only: Skylake-X has AVX512-BW but no VNNI; 7-bit weights get the 512-bit
    ``vpmaddubsw``."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    facts = CpuFacts.from_target(target)
    intrin = dot_for_weights(facts.int8_dot, SATURATION_FREE_WEIGHT)
    assert intrin == DotIntrin(Int8Dot.PMADDUBSW, 16)
    tile = conv_tile(6, 6, 32, intrin)
    data = te.placeholder((1, 8, 8, 12), "uint8", "data")
    weight = te.placeholder(pack_conv_weight(np.zeros((32, 3, 3, 12), np.int8), tile.block, 4).shape, "int8", "weight")
    out = conv2d_nhwc_int8(data, weight, (1, 1), (0, 0, 0, 0), (1, 1), tile, intrin, 32)
    _, lib = _build_te([data, weight, out], facts, target)
    asm = lib.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm and "zmm" in asm


# ---------------------------------------------------------------------------- Relax dispatch


def _quantized_conv_module(wt, shape, padding, requant: bool):
    """uint8 NHWC conv by a constant int8 OHWI weight to int32, optionally followed by a
    per-channel requantization to uint8 (the epilogue FuseOps puts into the kernel)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(wt), padding=padding, data_layout="NHWC", kernel_layout="OHWI",
                                           out_dtype="int32"))  # fmt: skip
            if requant:
                scale = relax.const((np.arange(wt.shape[0]) % 5 + 1).astype(np.float32) * 1e-4)
                y = bb.emit(relax.op.astype(y, "float32"))
                y = bb.emit(relax.op.round(relax.op.multiply(y, scale)))
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(y, relax.const(np.float32(128))), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled_kernel(mod, spec):
    mod = B.schedule(B.legalize(mod, spec), spec)
    (func,) = _kernels(mod).values()  # one kernel: a requantization is its epilogue
    assert func.attrs.get("tirx.is_scheduled") and TILE_ATTR in func.script()
    return mod, func


@needs_x86
@pytest.mark.parametrize("requant", [False, True])
@pytest.mark.parametrize("x_shape,w_shape", [((1, 10, 10, 8), (16, 3, 3, 8)), ((1, 9, 7, 5), (10, 3, 3, 5))])
def test_relax_conv_dispatches_to_the_int8_kernel(requant, x_shape, w_shape):
    rng = np.random.default_rng(3)
    wt, x = _full_range(rng, w_shape, np.int8), _full_range(rng, x_shape, np.uint8)
    mod, func = _scheduled_kernel(_quantized_conv_module(wt, x.shape, (1, 1, 1, 1), requant), HOST)
    assert TIR_MARK[HOST_FACTS.int8_dot.kind] in func.script()  # scheduled by schedule_int8: the dot is the tensorized LLVM intrinsic
    ex = B.build(mod, HOST)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = conv_ref(x, wt, padding=(1, 1, 1, 1))
    if requant:
        scale = (np.arange(wt.shape[0]) % 5 + 1).astype(np.float32) * 1e-4
        ref = np.clip(np.round(ref.astype(np.float32) * scale) + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)
    assert _has_dot(ex.mod.imports[0].inspect_source("asm"), HOST_FACTS.int8_dot.kind)


@needs_x86
def test_zero_point_padding_is_an_explicit_pad():
    """``relax.nn.conv2d`` pads with 0; a graph pads with the zero point by ``nn.pad`` and an
    unpadded conv, which the int8 kernel takes as it is."""
    rng = np.random.default_rng(4)
    wt, x, zp = _full_range(rng, (16, 3, 3, 8), np.int8), _full_range(rng, (1, 8, 8, 8), np.uint8), 77
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            padded = bb.emit(relax.op.nn.pad(xv, [0, 0, 1, 1, 2, 0, 0, 0], pad_value=float(zp)))
            out = bb.emit_output(relax.op.nn.conv2d(padded, relax.const(wt), data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
        bb.emit_func_output(out)
    mod = B.schedule(B.legalize(bb.get(), HOST), HOST)
    assert any(TILE_ATTR in f.script() for f in _kernels(mod).values())
    got = relax.VirtualMachine(B.build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, conv_ref(x, wt, padding=(1, 2, 1, 0), pad_value=zp))


@needs_x86
@pytest.mark.parametrize("w_max", [None, SATURATION_FREE_WEIGHT])
def test_relax_matmul_dispatches_through_the_backend_map(w_max):
    """Full-range weights: the CPU's exact dot; 7-bit ones: ``vpmaddubsw`` on AVX2 without VNNI."""
    rng = np.random.default_rng(5)
    wt, x = _full_range(rng, (96, 40), np.int8, w_max), _full_range(rng, (3, 96), np.uint8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(xv, relax.const(wt), out_dtype="int32"))
        bb.emit_func_output(out)
    mod = B.schedule(B.legalize(bb.get(), HOST), HOST)  # the CPU backend's map routes matmul
    (func,) = _kernels(mod).values()
    intrin = dot_for_weights(HOST_FACTS.int8_dot, int(np.abs(wt.astype(np.int16)).max()))
    assert TILE_ATTR in func.script() and f'"{DOT_ATTR}": "{intrin.name}"' in func.script()
    assert TIR_MARK[intrin.kind] in func.script() and ("pmadd.ub.sw" in func.script()) == (intrin.kind is Int8Dot.PMADDUBSW)
    out = relax.VirtualMachine(B.build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, x.astype(np.int64) @ wt.astype(np.int64))


@needs_avx2_no_vnni
@pytest.mark.parametrize("w_max,fast", [(SATURATION_FREE_WEIGHT, True), (SATURATION_FREE_WEIGHT + 1, False)])
def test_legalization_picks_vpmaddubsw_by_the_weights(w_max, fast):
    """7-bit weights (the quantizer's ``qmax=63`` on AVX2, and 64 itself) get ``vpmaddubsw``;
    one weight of 65 could saturate it, and the layer keeps the exact ``vpmaddwd``. Both
    bit-exact, with the requantization epilogue fused."""
    rng = np.random.default_rng(6)
    wt, x = _full_range(rng, (16, 3, 3, 8), np.int8, SATURATION_FREE_WEIGHT), _full_range(rng, (1, 10, 10, 8), np.uint8)
    wt[3, 1, 2, 5] = w_max
    mod, func = _scheduled_kernel(_quantized_conv_module(wt, x.shape, (1, 1, 1, 1), requant=True), HOST)
    assert DOT_ATTR in func.script()
    assert (FAST.name in func.script()) == fast and ("pmadd.ub.sw" in func.script()) == fast
    ex = B.build(mod, HOST)
    asm = ex.mod.imports[0].inspect_source("asm")
    assert ("vpmaddubsw" in asm) == fast and "vpmaddwd" in asm
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    scale = (np.arange(wt.shape[0]) % 5 + 1).astype(np.float32) * 1e-4
    ref = np.clip(np.round(conv_ref(x, wt, padding=(1, 1, 1, 1)).astype(np.float32) * scale) + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)


def test_other_integer_convs_keep_tvms_lowering():
    """int8 (signed) activations and grouped convs are not the kernel's; they stay exact."""
    rng = np.random.default_rng(9)
    for dtype, groups in ((np.int8, 1), (np.uint8, 2)):
        wt, x = _full_range(rng, (8, 3, 3, 4 // groups), np.int8), _full_range(rng, (1, 6, 6, 4), dtype)
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
        with bb.function("main", [xv]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.nn.conv2d(xv, relax.const(wt), groups=groups, data_layout="NHWC",
                                                        kernel_layout="OHWI", out_dtype="int32"))  # fmt: skip
            bb.emit_func_output(out)
        mod = B.schedule(B.legalize(bb.get(), HOST), HOST)
        assert all(TILE_ATTR not in f.script() for f in _kernels(mod).values())
        got = relax.VirtualMachine(B.build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = np.concatenate([conv_ref(x[..., g * 4 // groups : (g + 1) * 4 // groups], wt[g * 8 // groups : (g + 1) * 8 // groups])
                              for g in range(groups)], axis=-1)  # fmt: skip
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------- VNNI cross-build


def test_avx512_vnni_build_tensorizes_vpdpbusd():
    """Compiles only (this host need not have AVX-512): the kernel is tensorized with the VNNI
    intrinsic, its weight is packed 16 output channels x 4 reduction elements, and the
    assembly multiplies with ``vpdpbusd``, not the saturating ``vpmaddubsw``."""
    spec = load_target("x86-avx512")
    rng = np.random.default_rng(2)
    wt = _full_range(rng, (32, 3, 3, 6), np.int8)
    mod, func = _scheduled_kernel(_quantized_conv_module(wt, (1, 9, 9, 6), (1, 1, 1, 1), requant=True), spec)
    assert "vpdpbusd" in func.script()  # tensorized with the VNNI intrinsic
    o_blocks, kh, kw, i_groups, block, group = (int(d) for d in func.params[1].ty.shape)  # (O/ob, KH, KW, I/4, ob, 4)
    assert (kh, kw, i_groups, group) == (3, 3, 2, 4) and block % 16 == 0 and o_blocks * block == 32
    asm = B.build(mod, spec).mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" in asm
    assert "vpmaddubsw" not in asm
