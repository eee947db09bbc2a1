"""CUDA targets: device code is compiled ahead of time with nvcc for exactly the target's arch.

Builds a small CNN (Conv, Relu, MaxPool, Gemm, MatMul, Add, Softmax) for ``cuda-sm80`` (x86-64
host) and ``jetson-orin`` (aarch64 host, cross-linked) and reads the exported ``module.so`` back:
its CUDA module must hold a cubin for sm_80 / sm_87 and no CUDA source. Needs nvcc (and the
aarch64 cross compiler for Orin); skipped without them. Running the module needs a CUDA GPU
(``gpu`` mark).
"""

from __future__ import annotations

import dataclasses
import shutil
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwcompress import build as B
from hwcompress.backends import cuda as cuda_backend
from hwcompress.backends import get_backend
from hwcompress.errors import BuildError
from hwcompress.targets import load_target

HAVE_NVCC = cuda_backend.find_nvcc() is not None
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not on PATH (CUDA targets compile device code with it)")

EM_X86_64, EM_AARCH64 = 62, 183


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "wg", "bg"], ["g1"], transB=1),
        helper.make_node("Relu", ["g1"], ["r2"]),
        helper.make_node("MatMul", ["r2", "wm"], ["m1"]),
        helper.make_node("Add", ["m1", "bm"], ["a1"]),
        helper.make_node("Softmax", ["a1"], ["y"], axis=-1),
    ]
    inits = [
        init("w1", 8, 3, 3, 3), init("b1", 8),
        init("wg", 32, 8 * 8 * 8), init("bg", 32),
        init("wm", 32, 10), init("bm", 10),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def build_and_export(spec, path):
    import hwcompress.frontend as fe

    mod = fe.import_onnx(small_cnn())
    ex = B.build(B.schedule(B.legalize(mod, spec), spec), spec)
    get_backend(spec).export(ex, path, spec)
    return path


def _target_params():
    params = []
    for name in ("cuda-sm80", "jetson-orin"):
        cc = load_target(name).toolchain.cc
        marks = [needs_nvcc]
        if cc and shutil.which(cc) is None:
            marks.append(pytest.mark.skip(reason=f"{cc} not installed (links the {name} host code)"))
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.fixture(scope="module", params=_target_params())
def artifact(request, tmp_path_factory):
    spec = load_target(request.param)
    path = tmp_path_factory.mktemp(spec.name) / "module.so"
    return spec, build_and_export(spec, path)


def test_module_holds_sass_for_exactly_the_target_arch(artifact):
    spec, path = artifact
    assert cuda_backend.device_archs(path) == {spec.tvm["arch"]}  # sm_80 / sm_87, no PTX
    assert [fmt for fmt, _ in cuda_backend.cuda_modules(path)] == ["cubin"]


def test_no_cuda_source_and_host_code_for_the_target_cpu(artifact):
    spec, path = artifact
    data = path.read_bytes()
    assert b"__global__" not in data and b"extern \"C\"" not in data  # no source to JIT at load time
    (machine,) = struct.unpack_from("<H", data, 18)
    assert machine == {"x86_64": EM_X86_64, "aarch64": EM_AARCH64}[spec.arch]


def test_exported_blob_loads_with_tvms_loader(artifact):
    """TVM's library loader reads the repacked blob: the VM executable deserializes and the
    CUDA loader is handed a cubin (a stand-in loader where this machine has no CUDA runtime)."""
    import tvm
    import tvm_ffi
    from tvm.script import tirx as T

    spec, path = artifact
    name = "ffi.Module.load_from_bytes.cuda"
    if spec.arch != "x86_64":
        pytest.skip("host code is for another CPU")
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        pytest.skip("the real CUDA runtime is loaded (the gpu test covers loading)")

    @T.prim_func
    def noop(a: T.Buffer((1,), "float32")):
        a[0] = T.float32(0)

    placeholder = tvm.compile(tvm.IRModule({"noop": noop}), target="llvm")
    placeholder = getattr(placeholder, "mod", placeholder)
    payloads = []

    def load_cuda(data):
        payloads.append(bytes(data))
        return placeholder

    tvm_ffi.register_global_func(name, load_cuda)
    try:
        lib = tvm.runtime.load_module(str(path))
        tvm.relax.VirtualMachine(lib, tvm.cpu())
    finally:
        tvm_ffi.remove_global_func(name)
    assert len(payloads) == 1
    fmt, _, code = cuda_backend._split_cuda_payload(payloads[0])
    assert fmt == "cubin" and cuda_backend.code_archs(fmt, code) == {"sm_80"}


def _scheduled(spec):
    import hwcompress.frontend as fe

    return B.schedule(B.legalize(fe.import_onnx(small_cnn()), spec), spec)


def test_missing_nvcc_is_a_one_line_build_error(monkeypatch):
    import tvm_ffi

    spec = load_target("jetson-orin")
    mod = _scheduled(spec)
    monkeypatch.setattr(cuda_backend, "find_nvcc", lambda: None)
    with pytest.raises(BuildError, match="nvcc not found") as info:
        B.build(mod, spec)
    assert "\n" not in str(info.value) and "sm_87" in str(info.value)
    assert tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True) is None


@needs_nvcc
def test_arch_nvcc_refuses_is_a_build_error_not_a_fallback():
    import tvm_ffi

    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    base = load_target("cuda-sm80")
    spec = dataclasses.replace(base, name="xavier-like", tvm={**base.tvm, "arch": "sm_72"})
    with pytest.raises(BuildError, match="nvcc") as info:
        B.build(_scheduled(spec), spec)
    assert "\n" not in str(info.value)
    # the hooks are restored after a failed build
    assert tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True) is None
    assert tvm_ffi.get_global_func("tvm_callback_cuda_compile").same_as(before)


@needs_nvcc
def test_code_archs_reads_fatbin_entries(tmp_path):
    import subprocess

    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void k(float* a) { a[threadIdx.x] *= 2.f; }\n')
    out = tmp_path / "k.fatbin"
    subprocess.run(
        ["nvcc", "--fatbin", "-gencode", "arch=compute_87,code=sm_87", "-gencode", "arch=compute_80,code=compute_80",
         "-o", str(out), str(src)],
        check=True, capture_output=True,
    )
    assert cuda_backend.code_archs("fatbin", out.read_bytes()) == {"sm_87", "compute_80"}


def test_code_archs_source_and_ptx():
    assert cuda_backend.code_archs("cuda", b'extern "C" __global__ void k() {}') == {"cuda-source"}
    ptx = b"//\n.version 8.0\n.target sm_80\n.address_size 64\n"
    assert cuda_backend.code_archs("ptx", ptx) == {"compute_80"}


@pytest.mark.gpu
@needs_nvcc
def test_runs_on_the_gpu_like_onnxruntime(tmp_path):
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU on this machine")
    ort = pytest.importorskip("onnxruntime")
    major, minor = dev.compute_version.split(".")
    base = load_target("cuda-sm80")  # same target, built for the GPU at hand
    spec = dataclasses.replace(base, name=f"local-sm{major}{minor}", tvm={**base.tvm, "arch": f"sm_{major}{minor}"})
    path = build_and_export(spec, tmp_path / "module.so")
    assert cuda_backend.device_archs(path) == {spec.tvm["arch"]}

    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    lib = tvm.runtime.load_module(str(path))
    vm = tvm.relax.VirtualMachine(lib, dev)
    out = vm["main"](tvm.runtime.tensor(x, dev))
    got = (out if hasattr(out, "numpy") else out[0]).numpy()  # one output, maybe in a tuple
    sess = ort.InferenceSession(small_cnn().SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
