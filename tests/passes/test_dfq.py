"""dfq (data-free quantization): the numpy math without IR; equalization keeps the float
function (against ONNX Runtime) and evens out channel ranges; it stops at residual adds and
concats and handles ReLU6; bias correction removes the mean output error of int8 weights."""

from __future__ import annotations

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.passes.quantize import dfq, dfq_graph
from hwcompress.passes.quantize.observers import sqnr_db
from hwcompress.verify import graph_reference

# Equalization rescales float32 weights (in float64, rounded once): relative error to ORT.
RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------- math


def test_equalization_scales_even_out_ranges():
    r1, r2 = np.array([100.0, 1.0, 0.01, 0.0]), np.array([0.01, 1.0, 4.0, 3.0])
    s = dfq.equalization_scales(r1, r2)
    np.testing.assert_allclose((r1 / s)[:3], (r2 * s)[:3], rtol=1e-12)
    np.testing.assert_allclose((r1 / s)[:3], np.sqrt(r1 * r2)[:3], rtol=1e-12)
    assert s[3] == 1.0  # a dead channel keeps its scale


def test_clipped_normal_mean_matches_sampling():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-1.0, 0.0, 0.5, 3.0]), np.array([1.0, 2.0, 0.5, 2.0])
    y = rng.standard_normal((400_000, 4)) * sigma + mu
    for lo, hi in ((0.0, np.inf), (0.0, 6.0), (-np.inf, 1.0), (-np.inf, np.inf)):
        np.testing.assert_allclose(dfq.clipped_normal_mean(mu, sigma, lo, hi), np.clip(y, lo, hi).mean(0), atol=0.01)
    assert dfq.clipped_normal_mean(2.0, 0.0, 0.0, 1.0) == 1.0  # no spread: the clipped mean


def test_expected_output_error_is_the_mean_shift():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4, 3, 3))
    eps = dfq.weight_quant_error(w)
    assert np.all(np.abs(eps).max(axis=(1, 2, 3)) <= np.abs(w).max(axis=(1, 2, 3)) / 254 + 1e-7)  # half a step
    m = rng.standard_normal(4)
    noise = rng.standard_normal((100, 4, 3, 3))
    x = noise - noise.mean(axis=0) + m[:, None, None]  # patches whose every tap has the channel mean m
    shift = np.einsum("nihw,oihw->o", x, eps) / len(x)
    np.testing.assert_allclose(dfq.expected_output_error(eps, m), shift, rtol=1e-9)
    grouped = eps.reshape(6, 4, 9)[:, :2].reshape(6, 2, 3, 3)  # groups=2: output o sees inputs of its group
    m = np.arange(4.0)
    want = [grouped[o].sum(axis=(1, 2)) @ m[(o // 3) * 2 : (o // 3) * 2 + 2] for o in range(6)]
    np.testing.assert_allclose(dfq.expected_output_error(grouped, m, groups=2), want, rtol=1e-12)


def test_config_is_validated():
    assert dfq.DataFree() == dfq.DataFree(equalize=True, bias_correction=True)
    with pytest.raises(TypeError, match="equalize"):
        dfq.DataFree(equalize=1)
    with pytest.raises(ValueError, match="iterations"):
        dfq.DataFree(iterations=0)


# ---------------------------------------------------------------------------- graphs


def _conv(g, x, w, b=None):
    inputs = [x, g.const(w, "w")] + ([g.const(b, "b")] if b is not None else [])
    k = w.shape[-1]
    return g.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)


def badly_scaled(hw: int = 10, seed: int = 0, factor: float = 100.0):
    """conv(3->8, bias) -> ReLU -> conv(8->8) -> ReLU -> conv 1x1 (8->4): channels 0-3 of the first
    conv scaled by ``factor``, the matching inputs of the second by ``1/factor`` (same function)."""
    g = G._Graph(seed)
    rng = g.rng
    w1, b1 = rng.standard_normal((8, 3, 3, 3)) / 5, rng.standard_normal(8) * 0.2
    w2 = rng.standard_normal((8, 8, 3, 3)) / 8
    w1[:4] *= factor
    b1[:4] *= factor
    w2[:, :4] /= factor
    y = g.node("Relu", [_conv(g, "input", w1, b1)])
    y = g.node("Relu", [_conv(g, y, w2, rng.standard_normal(8) * 0.1)])
    y = _conv(g, y, rng.standard_normal((4, 8, 1, 1)) / 3)
    return g.model((4, 3, hw, hw), y, (4, 4, hw, hw))


def mobilenet_chain(hw: int = 8, seed: int = 0):
    """conv+BN+ReLU6 -> depthwise+BN+ReLU -> conv 1x1 (BN left for dfq to fold)."""
    g = G._Graph(seed)
    y = g.act(g.bn(g.conv("input", 3, 8, bias=True), 8), "Clip")
    y = g.act(g.bn(g.conv(y, 8, 8, group=8), 8), "Relu")
    y = g.conv(y, 8, 4, k=1)
    return g.model((2, 3, hw, hw), y, (2, 4, hw, hw))


def classifier_head(hw: int = 8, seed: int = 0):
    """conv -> ReLU -> MaxPool -> GlobalAveragePool -> Flatten -> Gemm: a pair across pooling."""
    g = G._Graph(seed)
    y = g.node("MaxPool", [g.node("Relu", [g.conv("input", 3, 8, bias=True)])], kernel_shape=[2, 2], strides=[2, 2])
    y = g.node("Flatten", [g.node("GlobalAveragePool", [y])])
    y = g.node("Gemm", [y, g.const(g.rng.standard_normal((5, 8)), "w"), g.const(g.rng.standard_normal(5), "b")], transB=1)
    return g.model((2, 3, hw, hw), y, (2, 5))


def _inputs(model, n: int | None = None, seed: int = 0, scale: float = 1.0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (np.random.default_rng(seed).standard_normal([n or shape[0], *shape[1:]]) * scale).astype(np.float32)


def _batches(mod, x):
    """Run ``mod`` (fixed batch) over ``x`` in its batch size."""
    n = int(mod["main"].params[0].ty.shape.values[0])
    run = graph_reference(mod)
    return np.concatenate([run([x[i : i + n]])[0] for i in range(0, len(x) - len(x) % n, n)])


def fake_quant_weights(mod):
    """Every conv2d (one group) / matmul weight through per-channel int8 quantize-dequantize:
    the weight error the int8 pass introduces, measured without its activation error."""
    g = dfq_graph._Graph(mod["main"])
    layers = [layer for layer in g.layers if layer.groups == 1]
    for layer in layers:
        layer.weight = layer.weight + dfq.weight_quant_error(layer.weight)
    return dfq_graph._rewrite(mod, layers)


def _ops(mod) -> list[str]:
    from tvm import relax

    return [getattr(b.value.op, "name", "") for blk in mod["main"].body.blocks for b in blk.bindings if isinstance(b.value, relax.Call)]


# ---------------------------------------------------------------------------- equalization


@pytest.mark.parametrize("builder, pairs", [(badly_scaled, 2), (mobilenet_chain, 2), (classifier_head, 1)])
def test_equalize_keeps_the_float_output(builder, pairs):
    model = builder()
    mod, report = dfq.apply_dfq(G.raw_import(model), dfq.DataFree(bias_correction=False))
    assert len(report.equalize.pairs) == pairs and report.equalize.converged
    assert "relax.nn.batch_norm" not in _ops(mod)
    x = _inputs(model, scale=4.0)  # large enough that ReLU6 clips
    np.testing.assert_allclose(_batches(mod, x), G.ort_run(model, x), rtol=RTOL, atol=ATOL)


def test_equalize_evens_out_ranges_and_raises_int8_sqnr():
    model = badly_scaled()
    mod = G.raw_import(model)
    eq, report = dfq.equalize(mod)
    first = report.pairs[0]
    assert (first["layer1"], first["layer2"], first["via"]) == ("conv2d[0]", "conv2d[1]", ["nn.relu"])
    assert first["out_ratio"][0] < 0.01 and first["in_ratio"][0] < 0.01  # the factor 100
    assert min(first["out_ratio"][1], first["in_ratio"][1]) > 0.1
    x = _inputs(model, n=16, seed=1)
    ref = _batches(mod, x)
    before = sqnr_db(ref, _batches(fake_quant_weights(mod), x))
    after = sqnr_db(ref, _batches(fake_quant_weights(eq), x))
    assert after > before + 15, (before, after)  # measured: 8.7 -> 40.5 dB


def test_residual_and_concat_are_not_equalized():
    g = G._Graph(0)
    r = g.node("Relu", [g.conv("input", 8, 8)])
    res = g.node("Add", [g.conv(r, 8, 8), r])  # r feeds a conv and the residual add
    cat = g.node("Concat", [g.node("Relu", [g.conv(res, 8, 8)]), "input"], axis=1)
    y = g.conv(cat, 16, 8)
    mod = G.raw_import(g.model((1, 8, 6, 6), y, (1, 8, 6, 6)))
    out, report = dfq.equalize(mod)
    assert report.pairs == ()
    reasons = {s["layer"]: s["reason"] for s in report.skipped}
    assert "2 users" in reasons["conv2d[0]"] and "add" in reasons["conv2d[1]"] and "concat" in reasons["conv2d[2]"]
    assert out is mod


def test_relu6_bounds_are_rescaled_or_skipped():
    model = mobilenet_chain()
    mod = dfq.apply_dfq(G.raw_import(model), dfq.DataFree(equalize=False, bias_correction=False))[0]  # BN folded
    eq, report = dfq.equalize(mod)
    assert report.pairs[0]["via"] == ["maximum", "minimum"] and report.pairs[0]["rescaled_bounds"] == 1
    assert "relax.minimum" in _ops(eq)  # per-channel upper bounds 6 / s_i
    skip, skipped = dfq.equalize(mod, rescale_clip=False)
    assert [p["layer1"] for p in skipped.pairs] == ["conv2d[1]"]
    assert "rescale_clip=False" in skipped.skipped[0]["reason"]
    x = _inputs(model, scale=4.0)  # ~3% of the ReLU6 inputs are above 6: the bounds matter
    ref = G.ort_run(model, x)
    for m in (eq, skip):
        np.testing.assert_allclose(_batches(m, x), ref, rtol=RTOL, atol=ATOL)


def test_equalize_in_nhwc():
    from hwcompress.passes.layout import ConvLayout, convert_layout

    model = mobilenet_chain()
    nhwc = convert_layout(dfq.apply_dfq(G.raw_import(model), dfq.DataFree(equalize=False, bias_correction=False))[0], ConvLayout("NHWC"))
    eq, report = dfq.equalize(nhwc)
    assert len(report.pairs) == 2
    x = _inputs(model, scale=4.0)
    np.testing.assert_allclose(_batches(eq, x), G.ort_run(model, x), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- bias correction


def bn_consistent(x: np.ndarray, seed: int = 0):
    """conv 3x3 -> BN -> ReLU -> conv 1x1 -> BN -> ReLU -> GlobalAveragePool -> Gemm, each BN's
    running statistics those of its input on ``x``: the BNs see what they were trained on."""
    import onnxruntime as ort

    g = G._Graph(seed)

    def bn_relu(y, c):
        probe = g.model(x.shape, y, (x.shape[0], c, *x.shape[2:]))
        v = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        stats = (g.rng.uniform(0.5, 1.5, c), g.rng.standard_normal(c) * 0.5, v.mean(axis=(0, 2, 3)), v.var(axis=(0, 2, 3)))
        return g.node("Relu", [g.node("BatchNormalization", [y, *(g.const(p, "bn") for p in stats)], epsilon=1e-5)])

    y = bn_relu(g.conv(bn_relu(g.conv("input", 3, 16), 16), 16, 16, k=1), 16)
    y = g.node("Flatten", [g.node("GlobalAveragePool", [y])])
    y = g.node("Gemm", [y, g.const(g.rng.standard_normal((6, 16)) / 4, "w")], transB=1)
    return g.model((4, *x.shape[1:]), y, (4, 6))


def _mean_error(quantized, reference):
    return float(np.linalg.norm((quantized.astype(np.float64) - reference).mean(axis=0)))


@pytest.mark.parametrize("source", ["bn", "data"])
def test_bias_correction_removes_the_mean_output_error(source):
    x = np.random.default_rng(2).standard_normal((256, 3, 12, 12)).astype(np.float32)
    model = bn_consistent(x)
    mod = G.raw_import(model)
    calib = x[:128] if source == "data" else None
    folded, _ = dfq.apply_dfq(mod, dfq.DataFree(equalize=False, bias_correction=False))
    corrected, report = dfq.apply_dfq(mod, dfq.DataFree(equalize=False), calib=calib)
    rows = {r["name"]: r for r in report.bias_correction.corrected}
    assert set(rows) == ({"conv2d[1]", "matmul[0]"} if source == "bn" else {"conv2d[0]", "conv2d[1]", "matmul[0]"})
    assert all(r["source"] == source for r in rows.values())
    test = x[128:]
    ref = _batches(folded, test).astype(np.float64)
    before = _mean_error(_batches(fake_quant_weights(folded), test), ref)
    after = _mean_error(_batches(fake_quant_weights(corrected), test), ref)
    assert after < 0.5 * before, (before, after)
