"""The CUDA 2:4 sparse tensor-core kernel (``mma.sp``): tiles and shape rules; the numpy
emulation of every thread's loads, metadata registers and stores against ``x @ W.T``; the
PrimFunc's structure; builds through ``hwcompress.build`` for sm_80 and Jetson Orin (sm_87)
whose PTX issues ``mma.sp::ordered_metadata`` and whose SASS holds sparse ``HMMA.SP``; and,
where a CUDA GPU exists, the kernel's results against numpy."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cuda as cuda_backend  # noqa: E402
from hwcompress.backends import cuda_sparse as cs  # noqa: E402
from hwcompress.backends.cuda_sparse import (  # noqa: E402
    SparseTile,
    choose_tile,
    dense_f16_kernel_cuda,
    emulate,
    emulate_gemv,
    mma_k,
    mma_sp_reference,
    sparse24_gemv_cuda,
    sparse24_kernel_cuda,
)
from hwcompress.passes.sparsity.mask24 import compress, decompress  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402
from cuda_code import cuda_source as _cuda_source  # noqa: E402
from cuda_code import ptx as _ptx  # noqa: E402

SM80, ORIN = load_target("cuda-sm80"), load_target("jetson-orin")
needs_nvcc = pytest.mark.skipif(cuda_backend.find_nvcc() is None, reason="nvcc not on PATH")


def fp16_tol(k: int) -> dict:
    """Tolerance against the float32 product: each operand rounded to fp16 (relative 2^-11),
    N(0, 1) data, errors of k products adding up like a random walk (sqrt(k)), 8 sigma."""
    return dict(rtol=0, atol=8 * 2**-11 * np.sqrt(2 * k))


def _cuobjdump() -> str | None:
    """cuobjdump from PATH or the ``nvidia-cuda-cuobjdump`` wheel (which also needs the
    ``nvidia-cuda-nvdisasm`` wheel's nvdisasm beside it)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    return None


def _sass(cubin: bytes, tmp_path) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    env = {**os.environ, "PATH": f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _operands(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    c = compress(rng.standard_normal((n, k)).astype(np.float32))
    return x, c


def _ref16(x, c):
    """``x @ W.T`` with both operands rounded to fp16 (what the tensor core multiplies)."""
    w = decompress(c).astype(np.float16).astype(np.float64)
    return x.astype(np.float16).astype(np.float64) @ w.T


# ---------------------------------------------------------------------------- shapes and tiles


@pytest.mark.parametrize("k,ks", [(16, 16), (32, 32), (48, 16), (64, 32), (144, 16), (4608, 32)])
def test_mma_shape_follows_k(k, ks):
    assert mma_k(k) == ks


@pytest.mark.parametrize("k", [0, 4, 8, 20, 36, 100])
def test_k_not_a_multiple_of_16_is_refused(k):
    with pytest.raises(ValueError, match="multiple of 16"):
        sparse24_kernel_cuda(4, 16, k, SM80.tvm_target())


def test_targets_without_sparse_tensor_cores_are_refused():
    turing = tvm.target.Target({"kind": "cuda", "arch": "sm_75"})
    with pytest.raises(ValueError, match="sm_80"):
        sparse24_kernel_cuda(4, 16, 32, turing)
    with pytest.raises(ValueError, match="sm_80"):
        sparse24_kernel_cuda(4, 16, 32, tvm.target.Target({"kind": "llvm"}))


@pytest.mark.parametrize("m,n", [(1, 1000), (1, 40), (3, 16), (49, 64), (196, 256), (4096, 512), (1024, 4096)])
def test_tiles(m, n):
    tile = choose_tile(m, n)
    assert 32 * tile.wn * tile.wm <= 1024
    assert tile.block_m <= max(8, -(-m // 8) * 8)  # no block mostly padding along m
    assert tile.block_n <= max(16, -(-n // 16) * 16)
    if m <= 8:  # GEMV-like: one MMA column tile
        assert tile.block_m == 8
    with pytest.raises(ValueError):
        SparseTile(tn=0)


# ---------------------------------------------------------------------------- the ISA model


def _tvm_test_meta(mask: np.ndarray) -> np.ndarray:
    """Metadata of a 16 x 16 sparse A as TVM's own GPU test of mma.sp m16n8k16 builds it
    (tests/python/tirx-base/test_tir_ptx_mma_sp.py, ``get_meta_m16n8k16_half``): word ``i``
    for rows ``i`` (low 16 bits) and ``i + 8``; lane ``l`` passes word ``l // 4``."""
    mask = mask.reshape(16, 8)
    out = np.zeros(8, np.uint32)
    for i in range(8):
        base = 1
        for blk in range(2):
            for j in range(8):
                out[i] |= np.uint32(int(mask[blk * 8 + i, j]) * base)
                base <<= 2
    return out


def test_isa_model_agrees_with_tvms_gpu_test_layout():
    """``mma_sp_reference`` reads fragments and metadata the way TVM's GPU test of the same
    instruction supplies them (a second reading of the ISA, checked there on hardware)."""
    rng = np.random.default_rng(3)
    pos = np.sort(np.stack([rng.choice(4, 2, replace=False) for _ in range(16 * 4)]), axis=-1).reshape(16, 4, 2)
    vals = rng.standard_normal((16, 8)).astype(np.float16)
    dense = np.zeros((16, 4, 4), np.float32)
    np.put_along_axis(dense, pos, vals.reshape(16, 4, 2).astype(np.float32), axis=-1)
    b_mat = rng.standard_normal((16, 8)).astype(np.float16)
    lane = np.arange(32)
    a = np.stack([vals[lane // 4 + i // 2 * 8, lane % 4 * 2 + i % 2] for i in range(4)], axis=1)
    b = np.stack([b_mat[lane % 4 * 2 + i % 2 + i // 2 * 8, lane // 4] for i in range(4)], axis=1)
    e = _tvm_test_meta(pos)[lane // 4]
    d = mma_sp_reference(a, b, np.zeros((32, 4), np.float32), e, 16)
    want = dense.reshape(16, 16) @ b_mat.astype(np.float32)
    got = np.zeros((16, 8))
    for i in range(4):
        got[lane // 4 + i // 2 * 8, lane % 4 * 2 + i % 2] = d[:, i]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_isa_model_rejects_unordered_metadata():
    e = np.full(32, 0x1111, np.uint32)  # i0 = 1, i1 = 0: not increasing
    with pytest.raises(ValueError, match="increasing"):
        mma_sp_reference(np.ones((32, 4), np.float16), np.ones((32, 4), np.float16), np.zeros((32, 4), np.float32), e, 16)


# ---------------------------------------------------------------------------- emulated kernel

SHAPES = [  # m, n, k: whole tiles, partial tiles along m and n, GEMV, the k16 shape
    (16, 64, 64),
    (32, 128, 128),
    (20, 40, 64),
    (1, 24, 48),
    (1, 100, 256),
    (9, 17, 80),
    (33, 70, 32),
]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_emulated_kernel_matches_numpy(m, n, k):
    x, c = _operands(m, n, k, seed=m + n + k)
    y = emulate(x, c.values, c.meta)
    assert not np.isnan(y).any()  # every output stored (exactly once: partial tiles guarded)
    np.testing.assert_allclose(y, _ref16(x, c), rtol=1e-5, atol=1e-5)  # fp16 products, f32 sums
    np.testing.assert_allclose(y, x @ decompress(c).T, **fp16_tol(k))


@pytest.mark.parametrize("tile", [SparseTile(1, 1, 1, 1), SparseTile(1, 4, 2, 1), SparseTile(2, 1, 1, 4)])
def test_emulated_kernel_with_other_tiles(tile):
    x, c = _operands(27, 50, 96, seed=1)
    np.testing.assert_allclose(emulate(x, c.values, c.meta, tile), _ref16(x, c), rtol=1e-5, atol=1e-5)


def test_emulation_notices_a_wrong_metadata_word(monkeypatch):
    """The check has teeth: the k32 second lane reading the first 16 k's metadata is caught."""
    x, c = _operands(8, 16, 64, seed=2)
    monkeypatch.setattr(cs, "_meta_byte", lambda ks, step, lane: step * (ks // 16) * 2 + 0 * lane)
    assert not np.allclose(emulate(x, c.values, c.meta), _ref16(x, c), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- TIR and builds


def _relax_module(m, n, k, spec):
    func = sparse24_kernel_cuda(m, n, k, spec.tvm_target())
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    values = relax.Var("values", relax.TensorType((n, k // 2), "float32"))
    meta = relax.Var("meta", relax.TensorType((n, (k + 7) // 8), "uint8"))
    with bb.function("main", [x, values, meta]):
        with bb.dataflow():
            gvar = bb.add_func(func, "sparse24_matmul")
            out = bb.emit_output(relax.call_tir(gvar, [x, values, meta], relax.TensorType((m, n), "float32")))
        bb.emit_func_output(out)
    return bb.get(), func


def test_primfunc_signature_and_schedule():
    func = sparse24_kernel_cuda(20, 40, 64, SM80.tvm_target())
    shapes = [(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in func.params]  # buffer params
    assert shapes == [((20, 64), "float32"), ((40, 32), "float32"), ((40, 8), "uint8"), ((20, 40), "float32")]
    assert func.attrs["tirx.is_scheduled"]
    script = func.script()
    assert "T.ptx.mma(" in script and '"sp::ordered_metadata"' in script and '"m16n8k32"' in script
    assert 'T.launch_thread("threadIdx.x", 32)' in script


def test_default_schedule_leaves_the_kernel_alone():
    mod, func = _relax_module(20, 40, 64, SM80)
    scheduled = B.schedule(mod, SM80)
    assert B.scheduled_kernels(scheduled) == ["sparse24_matmul"]
    tvm.ir.assert_structural_equal(scheduled["sparse24_matmul"].body, func.body)


@needs_nvcc
@pytest.mark.parametrize("spec", [SM80, ORIN], ids=["sm_80", "jetson-orin-sm_87"])
@pytest.mark.parametrize("m,n,k,ks", [(20, 40, 64, 32), (1, 1000, 48, 16)])
def test_nvcc_builds_sparse_tensor_core_code(spec, m, n, k, ks, tmp_path):
    mod, _ = _relax_module(m, n, k, spec)
    ex = B.build(B.schedule(mod, spec), spec)
    source = _cuda_source(ex)
    arch = spec.tvm["arch"]
    ptx = _ptx(source, arch)
    assert f"mma.sp::ordered_metadata.sync.aligned.m16n8k{ks}.row.col.f32.f16.f16.f32" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx  # fragments and sums stay in registers
    sass = _sass(cuda_backend.compile_cuda_source(source, spec), tmp_path)
    assert f"code for {arch}" in sass
    assert f"HMMA.SP.168{ks}.F32" in sass  # the sparse tensor-core instruction, f32 accumulate
    assert "HMMA.168" not in sass  # no dense tensor-core fallback


@needs_nvcc
def test_dense_twin_builds_dense_tensor_core_code(tmp_path):
    """The benchmark's baseline (``tools/bench_gpu_sparse.py``): the same kernel on the dense
    weight, ``mma.sync.m16n8k16``, in registers, and no sparse instruction."""
    func = dense_f16_kernel_cuda(49, 70, 144)
    shapes = [tuple(int(d) for d in p.ty.shape) for p in func.params]
    assert shapes == [(49, 144), (70, 144), (49, 70)]
    bb = relax.BlockBuilder()
    x, w = relax.Var("x", relax.TensorType((49, 144), "float32")), relax.Var("w", relax.TensorType((70, 144), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            gvar = bb.add_func(func, "dense_f16")
            out = bb.emit_output(relax.call_tir(gvar, [x, w], relax.TensorType((49, 70), "float32")))
        bb.emit_func_output(out)
    source = _cuda_source(B.build(B.schedule(bb.get(), SM80), SM80))
    ptx = _ptx(source, "sm_80")
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx and "mma.sp" not in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    sass = _sass(cuda_backend.compile_cuda_source(source, SM80), tmp_path)
    assert "HMMA.16816.F32" in sass and "HMMA.SP" not in sass


@pytest.mark.parametrize("k", [15, 0])
def test_dense_twin_refuses_k_not_a_multiple_of_16(k):
    with pytest.raises(ValueError, match="multiple of 16"):
        dense_f16_kernel_cuda(1, 8, k)


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("m,n,k", [(1, 1000, 512), (49, 70, 144), (196, 256, 576)])
def test_runs_on_the_gpu_like_numpy(m, n, k):
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU on this machine")
    major, minor = dev.compute_version.split(".")
    if int(major) < 8:
        pytest.skip(f"mma.sp needs sm_80+, the GPU is sm_{major}{minor}")
    spec = dataclasses.replace(SM80, name=f"local-sm{major}{minor}", tvm={**SM80.tvm, "arch": f"sm_{major}{minor}"})
    mod, _ = _relax_module(m, n, k, spec)
    vm = relax.VirtualMachine(B.build(B.schedule(mod, spec), spec), dev)
    x, c = _operands(m, n, k, seed=k)
    args = [tvm.runtime.tensor(a, dev) for a in (x, c.values, c.meta)]
    got = vm["main"](*args).numpy()
    np.testing.assert_allclose(got, _ref16(x, c), rtol=1e-3, atol=1e-3)  # f32 sums in any order
    np.testing.assert_allclose(got, x @ decompress(c).T, **fp16_tol(k))


# ---------------------------------------------------------------------------- the whole path


def _two_layer_mlp(rows: int):
    rng = np.random.default_rng(0)
    x = relax.Var("x", relax.TensorType((rows, 256), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(relax.op.matmul(x, relax.const(rng.standard_normal((256, 128)).astype(np.float32)))))
            # ONNX Gemm (transB = 1, as PyTorch's Linear exports) imports as matmul(h, permute_dims(W))
            w_t = relax.op.permute_dims(relax.const(rng.standard_normal((10, 128)).astype(np.float32)), [1, 0])
            out = bb.emit_output(relax.op.matmul(h, w_t))
        bb.emit_func_output(out)
    return bb.get()


@needs_nvcc
def test_sparse_2_4_build_for_jetson_runs_matmuls_on_mma_sp():
    """``sparsify`` on a Jetson Orin target (cannot run here: every eligible layer that is not a
    GEMV, unmeasured) then hwc's legalization: the 2:4 matmuls, a Gemm's transposed weight included (CUDA targets
    have no layout step to fold it), become the sparse tensor-core kernel."""
    from hwcompress.passes import Sparse24, sparsify
    from hwcompress.passes.sparsity import sparsity_report

    mod = sparsify(_two_layer_mlp(32), Sparse24(), ORIN)
    report = sparsity_report(mod)
    assert not report["measured"] and "no CUDA GPU" in report["not_measured_because"]
    assert report["sparse_layers"] == 2
    ex = B.build(B.schedule(B.legalize(mod, ORIN), ORIN), ORIN)
    source = _cuda_source(ex)
    # TVM emits the mma.sp asm once as a device function; each sparse kernel calls it
    (helper,) = set(re.findall(r"(\w+)\([^)]*\) \{\s*asm volatile\(\"mma\.sp::ordered_metadata", source))
    kernels = set(re.findall(r"void __launch_bounds__\(\d+\) (sparse24_gemm\w*)\(", source))  # declared, defined
    assert len(kernels) == 2, kernels
    assert source.count(helper + "(") >= 1 + len(kernels)


def _matmul(rows: int, k: int, n: int = 64):
    x = relax.Var("x", relax.TensorType((rows, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w = np.random.default_rng(k).standard_normal((k, n)).astype(np.float32)
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("rows, k, decide, sparse", [(1, 256, "auto", 1), (1, 20, "auto", 0), (1, 20, "all", 1), (2, 20, "auto", 1)])
def test_cuda_gemvs_the_2_4_gemv_cannot_take_stay_dense(rows, k, decide, sparse):
    """Unmeasured on CUDA, ``auto`` keeps a one-row matmul dense when its ``K`` is not a
    multiple of 8 (it would run on ``mma.sp``, measured slower than the dense GEMV on an H100);
    ``all`` takes every eligible layer."""
    from hwcompress.passes import Sparse24, sparsify
    from hwcompress.passes.sparsity import sparsity_report

    report = sparsity_report(sparsify(_matmul(rows, k), Sparse24(decide=decide), ORIN))
    assert report["sparse_layers"] == sparse
    if not sparse:
        (layer,) = report["layers"]
        assert "GEMV" in layer["reason"] and not layer["measured"]


@pytest.mark.parametrize("m,n,k", [(1, 70, 144), (1, 1000, 2048), (3, 33, 64), (8, 4, 8)])
def test_gemv_kernel_emulation_matches_numpy(m, n, k):
    x, c = _operands(m, n, k, seed=n)
    np.testing.assert_allclose(emulate_gemv(x, c.values, c.meta), x @ decompress(c).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [12, 0])
def test_gemv_kernel_needs_whole_meta_bytes(k):
    with pytest.raises(ValueError, match="multiple of 8"):
        sparse24_gemv_cuda(1, 8, k)


@needs_nvcc
@pytest.mark.parametrize("rows, gemv", [(1, True), (8, True), (9, False)])
def test_small_batches_build_on_the_2_4_gemv(rows, gemv):
    """Up to ``SPARSE_GEMV_MAX_ROWS`` rows a 2:4 matmul runs on the CUDA-core GEMV (16-byte
    loads of the kept values, warp shuffles, no MMA), above on ``mma.sp``."""
    from hwcompress.passes import Sparse24, sparsify

    mod = sparsify(_matmul(rows, 256), Sparse24(decide="all"), SM80)
    ptx = _ptx(_cuda_source(B.build(B.schedule(B.legalize(mod, SM80), SM80), SM80)), "sm_80")
    assert ("mma.sp" not in ptx) == gemv
    if gemv:
        assert "ld.global.v4.f32" in ptx or "ld.global.nc.v4.f32" in ptx
        assert "shfl.sync.down" in ptx


def test_gpu_bench_checks_against_the_decompressed_weight():
    """``tools/bench_gpu_sparse.py run`` judges the GPU's results with its own numpy reference
    (no hwcompress import there): it must be ``x @ W.T`` of the weight ``values`` + ``meta``
    encode, and the emulated kernel must pass its bound while a wrong weight must not."""
    from tests.tool_modules import load_tool

    tool = load_tool("bench_gpu_sparse")
    x, c = _operands(49, 70, 144, seed=3)
    ref = tool._reference("sparse", [x, c.values, c.meta], tool._mask24())
    np.testing.assert_allclose(ref, x.astype(np.float64) @ decompress(c).astype(np.float64).T, rtol=1e-12, atol=1e-9)
    assert np.abs(emulate(x, c.values, c.meta) - ref).max() <= tool.fp16_tol(144)
    assert np.abs(emulate(x, c.values[::-1].copy(), c.meta) - ref).max() > tool.fp16_tol(144)
    w = decompress(c)
    np.testing.assert_allclose(tool._reference("dense", [x, w], None), ref, rtol=1e-12, atol=1e-9)
