"""fold_bn: the numpy math without IR, the IR after the pass (no batch_norm, no BN arithmetic
in the built kernels), and outputs against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.passes import FoldBatchNorm, fold_bn
from hwcompress.passes.fold_bn import bn_scale_shift, fold_scale_shift

# Folding reassociates float32 arithmetic (done in float64, rounded once): relative max error.
RTOL = 1e-5
BN_ARITHMETIC = ("subtract", "divide", "multiply", "sqrt", "rsqrt")


# ---------------------------------------------------------------------------- math


@pytest.mark.parametrize("group", [1, 2, 6])
def test_folded_conv_matches_conv_then_bn(group):
    rng = np.random.default_rng(0)
    cin, cout = 6, 6
    x = rng.standard_normal((cin, 5, 5))
    w = rng.standard_normal((cout, cin // group, 3, 3))
    b = rng.standard_normal(cout)
    gamma, beta, mean, var = rng.uniform(0.5, 1.5, cout), rng.standard_normal(cout), rng.standard_normal(cout), rng.uniform(0.5, 2, cout)

    def conv(w, b):  # valid 3x3 grouped conv, float64
        out = np.zeros((cout, 3, 3))
        per = cout // group
        for o in range(cout):
            g = o // per
            xs = x[g * (cin // group) : (g + 1) * (cin // group)]
            for i in range(3):
                for j in range(3):
                    out[o, i, j] = np.sum(xs[:, i : i + 3, j : j + 3] * w[o]) + b[o]
        return out

    ref = (conv(w, b) - mean[:, None, None]) / np.sqrt(var + 1e-5)[:, None, None] * gamma[:, None, None] + beta[:, None, None]
    scale, shift = bn_scale_shift(gamma, beta, mean, var, 1e-5)
    w2, b2 = fold_scale_shift(w, b, scale, shift, out_axis=0)
    np.testing.assert_allclose(conv(w2, b2), ref, rtol=1e-12, atol=1e-12)


def test_folded_matmul_and_missing_bias_and_flags():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    scale, shift = bn_scale_shift(None, None, mean, var, 1e-3)  # center=scale=False
    w2, b2 = fold_scale_shift(w, None, scale, shift, out_axis=-1)
    np.testing.assert_allclose(x @ w2 + b2, (x @ w - mean) / np.sqrt(var + 1e-3), rtol=1e-12)
    assert w2.dtype == w.dtype


def test_math_rejects_bad_inputs():
    with pytest.raises(ValueError, match="positive"):
        bn_scale_shift(None, None, np.zeros(2), np.array([1.0, -1.0]), 0.0)
    with pytest.raises(ValueError, match="shape"):
        fold_scale_shift(np.ones((3, 2)), None, np.ones(2), np.ones(2), out_axis=0)


def test_config_validates():
    with pytest.raises(TypeError):
        FoldBatchNorm(matmul="yes")


# ---------------------------------------------------------------------------- IR + numerics

CASES = {
    "conv": lambda: G.conv_bn(),
    "conv_bias": lambda: G.conv_bn(bias=True),
    "depthwise": lambda: G.conv_bn(group=8, bias=True),
    "grouped": lambda: G.conv_bn(group=2),
    "gemm": lambda: G.gemm_bn(),
    "gemm_nobias_notrans": lambda: G.gemm_bn(bias=False, trans_b=False),
    "matmul": lambda: G.matmul_bn(),
    "conv_relu": lambda: G.conv_bn(bias=True, act="Relu"),
    "residual": lambda: G.residual_block(),
}


def _ops(mod):
    import tvm
    from tvm import relax

    ops = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            ops.append(e.op.name if e.op.name != "relax.call_tir" else e.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return ops


def _input(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(2).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_bn_leaves_no_bn(name, host_build):
    model = CASES[name]()
    before = G.raw_import(model)
    assert "relax.nn.batch_norm" in _ops(before)
    after = fold_bn(before)
    assert "relax.nn.batch_norm" not in _ops(after)
    kernels = host_build.kernels(after)
    assert not [k for k in kernels if any(op in k for op in BN_ARITHMETIC)], kernels
    x = _input(model)
    out = host_build.run(after, x)
    ref = G.ort_run(model, x)
    assert np.abs(out - ref).max() <= RTOL * np.abs(ref).max()


def test_without_fold_tvm_keeps_bn_arithmetic(host_build):
    """The gap this pass closes: TVM alone leaves BN as epilogue arithmetic in the kernel."""
    kernels = host_build.kernels(G.raw_import(G.conv_bn(bias=True)))
    assert any(op in k for k in kernels for op in BN_ARITHMETIC), kernels


def test_gemm_bn_is_folded_after_the_usual_frontend(host_build):
    """ONNX Runtime's basic folding (the frontend's normalization) leaves Gemm + BN alone."""
    import hwcompress

    model = G.gemm_bn()
    mod = hwcompress.import_onnx(model)
    assert "relax.nn.batch_norm" in _ops(mod)
    assert host_build.kernels(fold_bn(mod)) == ["fused_matmul_add"]


def test_shared_producer_is_not_folded():
    """Folding a conv whose output is also used elsewhere would compute it twice."""
    after = fold_bn(G.raw_import(G.shared_conv_bn()))
    assert _ops(after).count("relax.nn.conv2d") == 1
    assert "relax.nn.batch_norm" in _ops(after)


def test_matmul_off_leaves_gemm_bn():
    after = fold_bn(G.raw_import(G.gemm_bn()), FoldBatchNorm(matmul=False))
    assert "relax.nn.batch_norm" in _ops(after)
