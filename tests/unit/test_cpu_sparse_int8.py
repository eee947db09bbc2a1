"""The CPU 2:4 INT8 kernels (``backends.cpu_sparse_int8``): bit-exact against numpy's int64
``x @ W.T`` on the masked weight (integer arithmetic: no tolerance), at the extremes that could
saturate ``vpmaddubsw`` (x = 255, w = +-64); the packing; the AVX2 kernel's instructions; the
legalization that sends a 2:4 uint8 x int8 conv / matmul of a sparsified module to them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cpu_sparse_int8 as S8  # noqa: E402
from hwcompress.backends.cpu_sparse import build, has_avx2  # noqa: E402
from hwcompress.passes.sparsity import mask24  # noqa: E402
from hwcompress.passes.sparsity.sparse24 import REPORT_ATTR  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

SPEC = load_target("host")
HOST = SPEC.tvm_target()
needs_avx2 = pytest.mark.skipif(not has_avx2(HOST), reason="the AVX2 2:4 int8 kernel needs AVX2")


def _masked(rng, n, k, w_max=63):
    w = rng.integers(-w_max, w_max + 1, (n, k)).astype(np.int8)
    return (w * mask24.mask_2to4(w.astype(np.float32))).astype(np.int8)


def _run(m, n, k, w, x, kind, variant):
    values, meta = S8.pack(w, kind)
    args = [tvm.runtime.tensor(a) for a in (x, values, meta, np.zeros((m, n), np.int32))]
    build(S8.sparse24_int8_kernel(m, n, k, HOST, variant), HOST)["main"](*args)
    return args[3].numpy()


SHAPES = [(1, 64, 64), (1, 24, 128), (1, 37, 320), (3, 40, 192), (5, 33, 256), (49, 16, 64)]


@needs_avx2
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_avx2_variants_are_bit_exact(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    w, x = _masked(rng, n, k), rng.integers(0, 256, (m, k)).astype(np.uint8)
    ref = x.astype(np.int64) @ w.astype(np.int64).T
    for variant in S8.variants8(m, n, k, S8.Kind.AVX2) + [S8.Variant8(S8.Kind.AVX2, 3, 2, 3)]:
        np.testing.assert_array_equal(_run(m, n, k, w, x, S8.Kind.AVX2, variant), ref, err_msg=variant.name)


@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (2, 5, 24), (4, 16, 72), (3, 7, 36)])
def test_generic_is_bit_exact_on_full_range_weights(m, n, k):
    rng = np.random.default_rng(k)
    w, x = _masked(rng, n, k, 127), rng.integers(0, 256, (m, k)).astype(np.uint8)
    w[0, :4] = [-128, -128, 0, 0]  # the int8 extreme, still 2:4
    got = _run(m, n, k, w, x, S8.Kind.GENERIC, S8.variants8(m, n, k, S8.Kind.GENERIC)[0])
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64).T)


@needs_avx2
@pytest.mark.parametrize("w", [64, -64])
def test_avx2_worst_case_does_not_saturate(w):
    """x = 255 everywhere and every kept weight +-64: each vpmaddubsw pair sum is +-32640."""
    m, n, k = 2, 16, 128
    weight = np.zeros((n, k), np.int8)
    weight[:, 0::4] = weight[:, 3::4] = w  # 2 of every 4
    x = np.full((m, k), 255, np.uint8)
    got = _run(m, n, k, weight, x, S8.Kind.AVX2, S8.variants8(m, n, k, S8.Kind.AVX2)[0])
    np.testing.assert_array_equal(got, np.full((m, n), 255 * w * k // 2, np.int64))


def test_pack_keeps_the_weight():
    rng = np.random.default_rng(2)
    w = _masked(rng, 6, 128)
    values, meta = S8.pack(w, S8.Kind.GENERIC)
    np.testing.assert_array_equal(mask24.decompress(mask24.Compressed(values, meta, 128)), w)
    avx_values, avx_meta = S8.pack(w, S8.Kind.AVX2)  # a permutation within each 32-value step
    np.testing.assert_array_equal(avx_meta, meta)
    np.testing.assert_array_equal(avx_values.reshape(6, -1, 32), values.reshape(6, -1, 32)[:, :, S8.slot_order()])
    assert values.nbytes + meta.nbytes == 0.625 * w.nbytes
    assert sorted(S8.slot_order()) == list(range(32))
    with pytest.raises(ValueError, match="K % 64"):
        S8.pack(_masked(rng, 2, 96), S8.Kind.AVX2)
    with pytest.raises(ValueError, match="2:4 int8"):
        S8.pack(np.ones((2, 64), np.int8), S8.Kind.GENERIC)


AVX2_TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})


def test_kind_follows_target_shape_and_weight_range():
    arm = load_target("arm-cortex-a76").tvm_target()
    assert S8.kind_for(arm, 128, 63) is S8.Kind.GENERIC
    assert S8.kind_for(AVX2_TARGET, 128, 64) is S8.Kind.AVX2
    assert S8.kind_for(AVX2_TARGET, 128, 65) is S8.Kind.GENERIC  # vpmaddubsw could saturate
    assert S8.kind_for(AVX2_TARGET, 96, 63) is S8.Kind.GENERIC  # not whole 64-k steps
    avx512 = load_target("x86-avx512").tvm_target()  # Cascade Lake: AVX512-VNNI
    assert S8.kind_for(avx512, 128, 127) is S8.Kind.VNNI  # vpdpbusd sums in int32: any weight
    assert S8.kind_for(avx512, 96, 63) is S8.Kind.GENERIC
    assert not S8.has_vnni256(AVX2_TARGET) and not S8.has_vnni256(arm)


@needs_avx2
def test_avx2_assembly_gathers_with_vpshufb_and_multiplies_u8_by_s8():
    asm = build(S8.sparse24_int8_kernel(1, 32, 128, HOST, S8.Variant8(S8.Kind.AVX2)), HOST).inspect_source("asm")
    for insn in ("vpshufb", "vpsrlvq", "vpmaddubsw", "vpmaddwd", "ymm"):
        assert insn in asm, insn


needs_vnni = pytest.mark.skipif(not S8.has_vnni256(HOST), reason="the VNNI 2:4 int8 kernel needs AVX512-VNNI/VL or AVX-VNNI")


@needs_vnni
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 40, 192), (49, 16, 128), (5, 33, 256)])
def test_vnni_variants_are_bit_exact_on_full_range_weights(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    w, x = _masked(rng, n, k, 127), rng.integers(0, 256, (m, k)).astype(np.uint8)
    w[0, :4], x[0, :4] = [-128, 0, 0, -128], 255  # the extremes: 255 x -128, four at once
    ref = x.astype(np.int64) @ w.astype(np.int64).T
    for variant in S8.variants8(m, n, k, S8.Kind.VNNI) + [S8.Variant8(S8.Kind.VNNI, 3, 2, 3)]:
        np.testing.assert_array_equal(_run(m, n, k, w, x, S8.Kind.VNNI, variant), ref, err_msg=variant.name)


def test_vnni_assembly_multiplies_with_vpdpbusd():
    """Compiled for an AVX512-VNNI target (not run): the AVX2 kernel's gather, then one
    ``vpdpbusd`` on ymm where AVX2 needs ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``."""
    avx512 = load_target("x86-avx512").tvm_target()
    asm = build(S8.sparse24_int8_kernel(1, 32, 128, avx512, S8.Variant8(S8.Kind.VNNI)), avx512).inspect_source("asm")
    assert re.search(r"vpdpbusd\s+[^\n]*%ymm", asm) and "vpshufb" in asm and "vpmaddubsw" not in asm


def test_generic_cross_compiles_for_aarch64():
    arm = load_target("arm-cortex-a76").tvm_target()
    func = S8.sparse24_int8_kernel(2, 16, 64, arm, S8.Variant8(S8.Kind.GENERIC, 1, 1, 1))
    asm = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=arm).mod.inspect_source("asm")
    assert "ldrb" in asm and "ldrsb" in asm  # uint8 x and int8 values read as bytes


def _built(make, x_shape, sparse=True):
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(make(xv))
        bb.emit_func_output(out)
    mod = bb.get()
    if sparse:
        mod = mod.with_attr(REPORT_ATTR, json.dumps({"layers": []}))
    lowered = B.legalize(mod, SPEC)
    kernels = [gv.name_hint for gv in lowered.functions]
    return relax.VirtualMachine(B.build(B.schedule(lowered, SPEC), SPEC), tvm.cpu()), kernels


@pytest.mark.parametrize("k,w_max", [(256, 63), (192, 127)])
def test_sparsified_int8_matmul_runs_the_2_4_int8_kernel(k, w_max):
    rng = np.random.default_rng(k)
    w_nk, x = _masked(rng, 40, k, w_max), rng.integers(0, 256, (3, k)).astype(np.uint8)
    w_kn = np.ascontiguousarray(w_nk.T)
    vm, kernels = _built(lambda xv: relax.op.matmul(xv, relax.const(w_kn), out_dtype="int32"), x.shape)
    assert "sparse24_gemm" in kernels and not any("dense_int8" in name for name in kernels)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x.astype(np.int64) @ w_kn.astype(np.int64))
    _, plain = _built(lambda xv: relax.op.matmul(xv, relax.const(w_kn), out_dtype="int32"), x.shape, sparse=False)
    assert "sparse24_gemm" not in plain  # only a sparsified module: a 2:4-looking import stays dense


def test_sparsified_int8_conv_runs_the_2_4_int8_kernel():
    rng = np.random.default_rng(9)
    w = rng.integers(-63, 64, (8, 3, 3, 64)).astype(np.int8)
    w = (w * mask24.mask_2to4(mask24.conv_rows(w).astype(np.float32)).reshape(w.shape)).astype(np.int8)
    x = rng.integers(0, 256, (1, 6, 5, 64)).astype(np.uint8)

    def conv(xv):
        return relax.op.nn.conv2d(xv, relax.const(w), padding=(1, 1), data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32")

    vm, kernels = _built(conv, x.shape)
    assert "sparse24_gemm" in kernels and "im2col" in kernels
    dense_vm, _ = _built(conv, x.shape, sparse=False)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), dense_vm["main"](tvm.runtime.tensor(x)).numpy())
