"""Float matmuls by a constant weight run on the CPU backend's packed conv kernel (a 1x1 NHWC
conv): the legalized module calls it, and it equals numpy (float32 sums in another order:
rtol 1e-5 of sum |x||w|)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

HOST = load_target("host")


def _matmul(x_shape, w, bias=None, relu=False):
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = relax.op.matmul(x, relax.const(w))
            if bias is not None:
                y = relax.op.add(y, relax.const(bias))
            if relu:
                y = relax.op.nn.relu(y)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize(
    "x_shape,n,epilogue,packed",
    [((1, 256), 96, False, True), ((3, 64), 16, True, True), ((2, 5, 40), 24, True, True), ((3, 64), 10, True, True), ((1, 64), 1000, False, True)],
)
def test_matmul_by_constant_runs_the_packed_conv(x_shape, n, epilogue, packed):
    """Output channels that are no whole vectors (10, 1000 classes) are padded with zero weights
    and cropped."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if epilogue else None
    mod = _matmul(x_shape, w, bias, relu=epilogue)
    lowered = B.legalize(mod, HOST)
    assert any("conv2d" in k for k in _kernels(lowered)) == packed, _kernels(lowered)
    assert any("matmul" in k for k in _kernels(lowered)) != packed, _kernels(lowered)
    vm = relax.VirtualMachine(B.build(B.default_schedule(lowered, HOST), HOST), tvm.cpu())
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = x @ w + (bias if bias is not None else 0)
    if epilogue:
        want = np.maximum(want, 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * (np.abs(x) @ np.abs(w)).max())


def test_matmul_of_two_inputs_keeps_tvms_legalization():
    a = relax.Var("a", relax.TensorType((4, 8), "float32"))
    b = relax.Var("b", relax.TensorType((8, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    assert [k for k in _kernels(B.legalize(bb.get(), HOST)) if "matmul" in k]
