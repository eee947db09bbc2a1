"""Software prefetch of streamed weights (``backends.cpu_prefetch``) in the Winograd GEMM."""

from __future__ import annotations

import platform

import numpy as np
import pytest

import model_builders as G
from asm_loops import fma_loops, vector_stores
from tool_modules import load_tool

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checks x86 assembly")

from hwcompress.backends import cpu_prefetch  # noqa: E402

NO_PREFETCH_CPUS = cpu_prefetch.NO_PREFETCH_CPUS


@pytest.fixture(autouse=True)
def _host_prefetches(monkeypatch):
    """The prefetch as a target that has it builds it, on any host (Zen 4 hosts have none:
    ``NO_PREFETCH_CPUS``)."""
    monkeypatch.setattr(cpu_prefetch, "NO_PREFETCH_CPUS", frozenset())


def _winograd_scheduled(channels: int, hw: int):
    """``(host spec, ONNX model, scheduled module)`` of a 3x3 conv + ReLU as Winograd F(4,3)."""
    import hwcompress
    from hwcompress import build as B
    from hwcompress.passes.layout import ConvLayout, convert_layout
    from hwcompress.passes.winograd import Winograd, winograd
    from hwcompress.targets import load_target

    spec = load_target("host")
    model = load_tool("benchlib").conv_relu_model(channels, channels, hw)
    mod = winograd(convert_layout(hwcompress.import_onnx(model), ConvLayout("NHWC")), Winograd(tile=4, min_channels=1), spec)
    return spec, model, B.schedule(B.legalize(mod, spec), spec, [])


def _winograd_build(channels: int, hw: int):
    """``(VM executable, ONNX model, kernel assembly)`` of ``_winograd_scheduled``'s module."""
    from hwcompress import build as B

    spec, model, scheduled = _winograd_scheduled(channels, hw)
    ex = B.build(scheduled, spec)
    (lib,) = ex.mod.imports
    return ex, model, lib.inspect_source("asm")


@x86_only
def test_gemm_prefetches_weights_read_once_and_keeps_accumulators_in_registers():
    """64 channels at 7x7: 4 output tiles, one row block of the batched GEMM, so every
    transformed weight is read once: its reduction loop prefetches them. The accumulators stay
    in registers: with the write-back tile in ``local`` (workspace) memory, LLVM could not keep
    them across the prefetch call and stored all of them every iteration."""
    import onnxruntime as ort
    import tvm

    ex, model, asm = _winograd_build(64, 7)
    loops = fma_loops(asm)
    assert loops, "no FMA loop found"
    gemm = [body for body in loops if any("prefetcht0" in x for x in body)]
    assert gemm, "the GEMM's reduction loop issues no prefetch"
    for body in gemm:
        assert not vector_stores(body), "vector stores in the GEMM's reduction loop:\n" + "\n".join(body)
    x = np.random.default_rng(0).standard_normal((1, 64, 7, 7)).astype(np.float32)
    got = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@x86_only
def test_no_prefetch_where_the_weights_are_reused():
    """64 channels at 28x28: 49 tiles in several row blocks, each weight slice (16 KB) stays
    in cache across them: no prefetch."""
    _, _, asm = _winograd_build(64, 28)
    assert "prefetcht0" not in asm


def _copy(annotation: str):
    import tvm
    from tvm.script import tirx as T

    from hwcompress.backends.cpu_prefetch import ATTR

    @T.prim_func(private=True, s_tir=True)
    def func(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in T.serial(64, annotations={ATTR: annotation}):
            with T.sblock("copy"):
                vi = T.axis.spatial(64, i)
                b[vi] = a[vi]

    return tvm.IRModule({"main": func})


def test_pass_prefetches_the_named_read_ahead():
    from hwcompress.backends.cpu_prefetch import ATTR, inject_prefetch

    out = inject_prefetch()(_copy("copy:a:16:2:16"))["main"].script()
    assert "T.prefetch(T.address_of(a[i + 16]), 0, 3, 1)" in out
    assert "T.prefetch(T.address_of(a[i + 16 + 16]), 0, 3, 1)" in out
    assert ATTR not in out


def test_pass_drops_an_annotation_without_its_read():
    """An annotation naming a buffer the block does not read injects nothing and is removed."""
    from hwcompress.backends.cpu_prefetch import ATTR, inject_prefetch

    out = inject_prefetch()(_copy("copy:w:16:1:16"))["main"].script()
    assert "prefetch" not in out and ATTR not in out


def _gemv_asm(k: int, n: int, batch: int = 1) -> str:
    from onnx import TensorProto, helper, numpy_helper

    import hwcompress
    from hwcompress import build as B
    from hwcompress.targets import load_target

    spec = load_target("host")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    model = G.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])], [w],
    )
    ex = B.build(B.schedule(B.legalize(hwcompress.import_onnx(model), spec), spec, []), spec)
    (lib,) = ex.mod.imports
    return lib.inspect_source("asm")


@x86_only
def test_gemv_prefetches_its_weight_panels():
    """A batch-1 matmul (the packed conv kernel with one pixel tile) reads each weight panel
    once: its reduction loop prefetches them, its accumulators stay in registers."""
    loops = [body for body in fma_loops(_gemv_asm(512, 256), 4) if any("prefetcht0" in x for x in body)]
    assert loops, "the GEMV's reduction loop issues no prefetch"
    for body in loops:
        assert not vector_stores(body), "vector stores in the GEMV's reduction loop:\n" + "\n".join(body)


@x86_only
def test_batched_matmul_reuses_its_weights_without_prefetch():
    assert "prefetcht0" not in _gemv_asm(512, 256, batch=64)


@x86_only
def test_tuning_candidates_are_built_with_the_prefetch():
    """The tuner measures the default schedule (its seed) as ``hwc build`` compiles it."""
    import tvm

    from hwcompress.tuning_workers import build_candidate

    spec, _, scheduled = _winograd_scheduled(64, 7)
    (func,) = [f for gv, f in scheduled.functions.items() if "winograd" in gv.name_hint]
    lib = build_candidate(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), spec.tvm_target(), None)
    assert "prefetcht0" in lib.inspect_source("asm")


@x86_only
def test_cpus_whose_hardware_prefetchers_keep_up_get_none(monkeypatch):
    """Zen 4: the software prefetch cost the GEMVs 10-30% (``cpu_prefetch.NO_PREFETCH_CPUS``):
    its targets' kernels issue none; other CPUs keep it."""
    import tvm

    from hwcompress.backends import cpu_sparse as S
    from hwcompress.backends.cpu_schedule import CpuFacts

    monkeypatch.setattr(cpu_prefetch, "NO_PREFETCH_CPUS", NO_PREFETCH_CPUS)
    base = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "num-cores": 2}
    zen4, zen1 = (tvm.target.Target({**base, "mcpu": cpu}) for cpu in ("znver4", "znver1"))
    assert cpu_prefetch.distance_for(zen4) == 0 and CpuFacts.from_target(zen4).prefetch_bytes == 0
    assert cpu_prefetch.distance_for(zen1) == cpu_prefetch.DISTANCE == CpuFacts.from_target(zen1).prefetch_bytes
    lanes = S.Variant(S.Gather.LANES, 2, 2)
    asm = {t: S.build(S.sparse24_kernel(1, 256, 512, t, lanes), t).inspect_source("asm") for t in (zen4, zen1)}
    assert "prefetcht0" not in asm[zen4] and "prefetcht0" in asm[zen1]
