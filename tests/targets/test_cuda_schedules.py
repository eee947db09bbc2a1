"""The CUDA backend's default schedules: Winograd kernels (``cuda_winograd``) and the dlight
rules' order (``cuda._declining``). Structure only: running needs a GPU (the measurements are
``tools/bench_gpu.py``'s, on a lent H100)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from hwcompress import build as B  # noqa: E402
from hwcompress.api import import_model  # noqa: E402
from hwcompress.backends import cuda as cuda_backend  # noqa: E402
from hwcompress.optimize import Optimize  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402
from tests.tool_modules import load_tool  # noqa: E402

CUDA = load_target("cuda-sm80")
needs_nvcc = pytest.mark.skipif(cuda_backend.find_nvcc() is None, reason="nvcc not on PATH")


def _scheduled(model, **optimize):
    front = import_model(model, CUDA, None, optimize=Optimize(**optimize))
    return B.schedule(B.legalize(front.mod, CUDA), CUDA)


def _kernel(mod, part: str):
    (func,) = [f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and part in gv.name_hint]
    return func.script()


def _launch_nests(script: str) -> int:
    """Top-level ``blockIdx`` loops of a scheduled PrimFunc: one kernel launch each."""
    lines = [ln for ln in script.splitlines() if 'thread="blockIdx' in ln]
    top = min(len(ln) - len(ln.lstrip()) for ln in lines)
    return sum(1 for ln in lines if len(ln) - len(ln.lstrip()) == top)


def test_winograd_kernel_is_separate_launches_with_a_shared_memory_gemm():
    conv = load_tool("benchlib").conv_relu_model(64, 64, 28)
    script = _kernel(_scheduled(conv, winograd="on"), "winograd")
    # data transform, batched GEMM, inverse transform, output gather (+ epilogue): a launch each
    assert _launch_nests(script) == 4
    assert "data_pack_shared" in script and "bgemm_local" in script
    allocs = {ln.split("=")[0].strip(): ln for ln in script.splitlines() if "T.sblock_alloc_buffer(" in ln}
    # the transforms' first products stay in registers; the tensors between launches in global
    # memory (dlight's schedule put them all in shared memory: > 48 KB, refused by ptxas)
    assert 'scope="local"' in allocs["data_pack_rows_local"] and 'scope="local"' in allocs["inverse_rows_local"]
    for name in ("data_pack", "bgemm", "inverse"):
        assert "scope=" not in allocs[name]


@needs_nvcc
def test_winograd_kernel_compiles_with_nvcc():
    conv = load_tool("benchlib").conv_relu_model(128, 128, 14)
    mod = _scheduled(conv, winograd="on")
    B.build(mod, CUDA)  # ptxas refused the dlight schedule's 1.2 MB of shared memory


def test_depthwise_conv_runs_one_thread_per_output():
    """A 9-tap reduction is not spread over threads (GeneralReduction): measured 3.4x slower
    end to end on MobileNetV2 than Fallback's one thread per output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((32, 1, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    lo, hi = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0)))
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 28, 28])], [w, b, lo, hi])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod = _scheduled(model)
    script = _kernel(mod, "conv2d")
    assert "tvm_thread_allreduce" not in script and 'scope="shared"' not in script
    assert _launch_nests(script) <= 2  # Fallback leaves the epilogue its own launch


def test_longest_reduction_of_kernels():
    from tvm import te

    a = te.placeholder((64, 300), name="a")
    k = te.reduce_axis((0, 300), "k")
    row_sum = te.compute((64,), lambda i: te.sum(a[i, k], axis=k), name="s")
    assert cuda_backend._longest_reduction(te.create_prim_func([a, row_sum])) == 300
    copy = te.compute((64, 300), lambda i, j: a[i, j] * 2, name="c")
    assert cuda_backend._longest_reduction(te.create_prim_func([a, copy])) == 0


def test_a_rule_that_raises_declines():
    from tvm.s_tir.schedule import ScheduleError

    class Raising:
        def apply(self, func, target, tunable):
            raise ScheduleError("no")

    class Accepting:
        def apply(self, func, target, tunable):
            return "schedule"

    assert cuda_backend._declining(Raising()).apply(None, None, False) is None
    assert cuda_backend._declining(Accepting()).apply(None, None, False) == "schedule"


def test_lifted_constants_keep_the_module_exact():
    """tools/bench_gpu.py times modules whose weights are parameters: fed the constants they
    came from, they compute exactly what the built-in-weights module computes."""
    import onnx

    bench_gpu = load_tool("bench_gpu")
    host = load_target("host")
    model = load_tool("benchlib").conv_relu_model(16, 16, 12)
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 12)).astype(np.float32)
    ex0, _, none = bench_gpu._build(model, host, Optimize(), None, lift=False)
    ex1, inputs, lifted = bench_gpu._build(model, host, Optimize(), None, lift=True)
    assert none == [] and lifted and inputs[0]["shape"] == [1, 16, 12, 12]
    a = tvm.relax.VirtualMachine(ex0, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    b = tvm.relax.VirtualMachine(ex1, tvm.cpu())["main"](tvm.runtime.tensor(x), *lifted).numpy()
    np.testing.assert_array_equal(a, b)
    assert isinstance(model, onnx.ModelProto)
