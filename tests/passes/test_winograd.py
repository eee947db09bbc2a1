"""winograd: the Cook–Toom math without IR, the IR after the pass (eligible convs become
Winograd kernels, ineligible ones stay conv2d), per-layer error against a float64 direct conv
for F(2,3) and F(4,3), end to end against ONNX Runtime, and the recipe round trip."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.passes import Winograd, winograd
from hwcompress.backends import cpu_schedule
from hwcompress.backends.cpu_winograd import schedule_winograd
from hwcompress.passes.winograd import choose_tile, transform_weights, winograd_candidates, winograd_matrices

# Relative max error (max |out - ref| / max |ref|) of a float32 Winograd conv + bias + relu
# against the float64 direct conv, unit-variance inputs, He-scaled weights. Measured on
# ResNet-18's 3x3 layers (64..512 channels): F(2,3) 3.4e-7..9.0e-7 (below the float32 direct
# conv's 0.8e-6..2.5e-6: it sums over the channels only and its transforms are 0, +-1, 1/2);
# F(4,3) 2.2e-6..5.0e-6, ~6x F(2,3) (entries up to 8 and down to 1/24 in its matrices).
TOL = {2: 5e-6, 4: 2e-5}
# A whole float32 network vs ONNX Runtime (also float32; different summation order).
E2E_RTOL = 1e-4


# ---------------------------------------------------------------------------- math


def _correlate2d(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Valid 2D correlation, float64."""
    k = g.shape[0]
    oh, ow = d.shape[0] - k + 1, d.shape[1] - k + 1
    return np.array([[np.sum(d[i : i + k, j : j + k] * g) for j in range(ow)] for i in range(oh)])


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_matrices_reproduce_correlation(m):
    A, B, G_ = winograd_matrices(m)
    alpha = m + 2
    assert A.shape == (alpha, m) and B.shape == (alpha, alpha) and G_.shape == (alpha, 3)
    rng = np.random.default_rng(m)
    for _ in range(5):
        g, d = rng.standard_normal(3), rng.standard_normal(alpha)
        y = A.T @ ((G_ @ g) * (B.T @ d))
        np.testing.assert_allclose(y, [g @ d[i : i + 3] for i in range(m)], rtol=0, atol=1e-13)
        g2, d2 = rng.standard_normal((3, 3)), rng.standard_normal((alpha, alpha))
        y2 = A.T @ ((G_ @ g2 @ G_.T) * (B.T @ d2 @ B)) @ A
        np.testing.assert_allclose(y2, _correlate2d(d2, g2), rtol=0, atol=1e-12)


def test_matrices_are_topis():
    """Same points and scaling as TOPI (the MetaSchedule rules and literature assume them)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    for m in (2, 4):
        for ours, topi in zip(winograd_matrices(m), _cook_toom_convolution(_interpolation_points(m + 1), m, 3)):
            np.testing.assert_allclose(ours, topi, rtol=0, atol=1e-15)


def test_f23_matrices_are_the_classic_ones():
    """Lavin & Gray's F(2,3), with the points in TOPI's order (0, -1, 1, inf)."""
    A, B, G_ = winograd_matrices(2)
    np.testing.assert_array_equal(B.T, [[1, 0, -1, 0], [0, -1, 1, 0], [0, 1, 1, 0], [0, -1, 0, 1]])
    np.testing.assert_array_equal(A.T, [[1, 1, 1, 0], [0, -1, 1, 1]])
    np.testing.assert_array_equal(G_, [[1, 0, 0], [0.5, -0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 1]])


@pytest.mark.parametrize("m", [2, 4])
def test_transform_weights(m):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 3, 3))
    u = transform_weights(w, m)
    _, _, G_ = winograd_matrices(m)
    assert u.shape == (m + 2, m + 2, 3, 5) and u.dtype == w.dtype
    np.testing.assert_allclose(u[:, :, 1, 4], G_ @ w[4, 1] @ G_.T, rtol=1e-14)
    assert transform_weights(w.astype(np.float32), m).dtype == np.float32


def test_math_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not supported"):
        winograd_matrices(8)
    with pytest.raises(ValueError, match="not supported"):
        winograd_matrices(2, r=5)
    with pytest.raises(ValueError, match="3x3"):
        transform_weights(np.zeros((4, 4, 5, 5)), 2)


def test_choose_tile_f4_on_cpus_by_tile_count_elsewhere():
    from hwcompress.targets import load_target

    for spec in (None, load_target("host")):
        assert choose_tile((7, 7), (512, 512), spec) == 4
        assert choose_tile((56, 56), (64, 64), spec) == 4
    gpu = load_target("cuda-sm80")
    assert choose_tile((56, 56), (64, 64), gpu) == 4
    assert choose_tile((14, 14), (256, 256), gpu) == 4
    assert choose_tile((7, 7), (512, 512), gpu) == 2


# ---------------------------------------------------------------------------- config


def test_config_validation():
    Winograd(tile=2, per_layer={"0": 0, "3": 4}, min_channels=1)
    for bad in (3, 6, True, "4"):
        with pytest.raises(ValueError, match="tile"):
            Winograd(tile=bad)
    with pytest.raises(ValueError, match="keys"):
        Winograd(per_layer={3: 4})
    with pytest.raises(ValueError, match="keys"):
        Winograd(per_layer={"conv3": 4})
    with pytest.raises(ValueError, match=r"per_layer\['1'\]"):
        Winograd(per_layer={"1": 3})
    with pytest.raises(TypeError, match="table"):
        Winograd(per_layer=[("1", 2)])
    with pytest.raises(ValueError, match="min_channels"):
        Winograd(min_channels=0)
    assert hash(Winograd(per_layer={"1": 2})) == hash(Winograd(per_layer={"1": 2}))


def test_recipe_round_trip(host_build):
    from hwcompress.recipe import Recipe

    recipe = Recipe([Winograd(tile=4, per_layer={"0": 0, "1": 2}, min_channels=8)])
    text = recipe.to_toml()
    again = Recipe.from_dict(tomllib.loads(text))
    assert again == recipe and again.to_toml() == text
    assert Recipe.from_dict({"steps": [{"technique": "winograd"}]}).steps == (Winograd(),)
    mod = G.raw_import(_mixed_model())
    tiles = [r["tile"] for r in winograd_candidates(mod, recipe.steps[0])]
    assert tiles == [0, 2, None, None, None, None]
    assert _kernels(host_build, recipe.apply(mod, host_build.spec)) == _kernels(host_build, winograd(mod, recipe.steps[0]))


# ---------------------------------------------------------------------------- structure


def _mixed_model():
    """Two eligible 3x3 convs (the second with bias + relu), then stride-2, 1x1, grouped and
    dilated convs that must stay direct."""
    g = G._Graph(0)
    y = g.conv("input", 8, 8)
    y = g.node("Relu", [g.conv(y, 8, 8, bias=True)])
    y = g.conv(y, 8, 8, stride=2)
    y = g.conv(y, 8, 8, k=1)
    y = g.conv(y, 8, 8, group=2)
    w = g.const(g.rng.standard_normal((8, 8, 3, 3)) / 8, "w")
    y = g.node("Conv", [y, w], kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2])
    return g.model((1, 8, 10, 10), y, (1, 8, 5, 5))


def _ops(func) -> list[str]:
    from tvm import relax

    names = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call):
                op = b.value.op
                names.append(op.name if hasattr(op, "name") else b.value.args[0].name_hint)
    return names


def _kernels(host_build, mod) -> list[str]:
    return host_build.kernels(mod)


def test_only_eligible_convs_are_rewritten(host_build):
    mod = G.raw_import(_mixed_model())
    rows = winograd_candidates(mod, Winograd(min_channels=1))
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["tile"] for r in rows] == [4, 4, None, None, None, None]  # no target: the CPU rule
    out = winograd(mod, Winograd(min_channels=1))
    ops = _ops(out["main"])
    assert ops.count("relax.nn.conv2d") == 4
    assert ops.count("relax.call_tir") == 2
    # the two convs have the same shapes: one PrimFunc serves both
    assert [gv.name_hint for gv in out.functions if "winograd" in gv.name_hint] == ["conv2d_winograd_f4"]
    # the epilogue stays Relax ops, and fusion puts it into the Winograd kernel
    assert _kernels(host_build, out) == ["conv2d_winograd_f", "fused_conv2d_winograd_f4_add_relu"] + ["conv2d"] * 4  # digits stripped


def test_per_layer_override_and_min_channels():
    mod = G.raw_import(_mixed_model())
    assert [r["tile"] for r in winograd_candidates(mod)][:2] == [0, 0]  # 8 < min_channels
    cfg = Winograd(tile=2, per_layer={"0": 4, "1": 0}, min_channels=1)
    assert [r["tile"] for r in winograd_candidates(mod, cfg)][:2] == [4, 0]
    out = winograd(mod, cfg)
    assert sorted(gv.name_hint for gv in out.functions if "winograd" in gv.name_hint) == ["conv2d_winograd_f4"]
    assert _ops(out["main"]).count("relax.nn.conv2d") == 5
    # an override applies below min_channels
    out = winograd(mod, Winograd(per_layer={"1": 2}))
    assert sorted(gv.name_hint for gv in out.functions if "winograd" in gv.name_hint) == ["conv2d_winograd_f2"]


# ---------------------------------------------------------------------------- numerics per layer


def _relax_conv(x_shape, w_oihw, layout: str, padding, bias=None):
    """A Relax module ``conv2d(x, W) [+ bias, relu]`` in ``layout`` (weights HWIO for NHWC)."""
    from tvm import relax

    kernel_layout = "OIHW" if layout == "NCHW" else "HWIO"
    w = w_oihw if layout == "NCHW" else np.transpose(w_oihw, (2, 3, 1, 0))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w.astype(np.float32)), padding=padding, data_layout=layout, kernel_layout=kernel_layout))
            if bias is not None:
                shape = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias.reshape(shape).astype(np.float32)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _direct_f64(x_nchw, w, padding):
    """float64 direct correlation, NCHW / OIHW, ``padding = (top, left, bottom, right)``."""
    t, l, b, r = padding
    xp = np.pad(x_nchw.astype(np.float64), ((0, 0), (0, 0), (t, b), (l, r)))
    oh, ow = xp.shape[2] - 2, xp.shape[3] - 2
    cols = np.stack([xp[:, :, i : i + oh, j : j + ow] for i in range(3) for j in range(3)], axis=2)  # N C 9 H W
    return np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], w.shape[1], 9).astype(np.float64))


def _run(host_build, mod, x, own_schedule: bool):
    import tvm

    from hwcompress import build as B

    lowered = host_build.legalize(mod)
    rules = cpu_schedule._RULES
    if not own_schedule:  # the generic rules' schedule of the Winograd kernel must be right too
        cpu_schedule._RULES = tuple(r for r in rules if r[0] != "winograd")
    try:
        ex = B.build(B.schedule(lowered, host_build.spec), host_build.spec)
    finally:
        cpu_schedule._RULES = rules
    return tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


# (layout, channels in, channels out, size, padding, own schedule): odd sizes (outputs not a
# multiple of the tile, tile counts not a multiple of the GEMM rows, channels not a multiple
# of the vector lanes), asymmetric and no padding, both schedules.
CASES = [
    ("NCHW", 32, 48, 15, (1, 1, 1, 1), True),
    ("NHWC", 24, 40, 13, (1, 1, 1, 1), True),
    ("NCHW", 12, 20, 9, (0, 0, 0, 0), True),
    ("NHWC", 16, 16, 11, (2, 1, 0, 1), True),
    ("NCHW", 20, 12, 10, (1, 1, 1, 1), False),
    ("NHWC", 3, 5, 7, (1, 1, 1, 1), False),
]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("layout,cin,cout,hw,padding,own", CASES)
def test_layer_error_vs_direct_conv(host_build, m, layout, cin, cout, hw, padding, own, batch=1):
    rng = np.random.default_rng(cin + hw)
    x = rng.standard_normal((batch, cin, hw, hw))
    w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))
    bias = rng.standard_normal(cout) * 0.1
    ref = np.maximum(_direct_f64(x, w, padding) + bias[None, :, None, None], 0)
    x_in = x if layout == "NCHW" else np.transpose(x, (0, 2, 3, 1))
    mod = _relax_conv(x_in.shape, w, layout, padding, bias)
    out_mod = winograd(mod, Winograd(tile=m, min_channels=1))
    assert _ops(out_mod["main"]).count("relax.nn.conv2d") == 0
    out = _run(host_build, out_mod, x_in.astype(np.float32), own)
    if layout == "NHWC":
        out = np.transpose(out, (0, 3, 1, 2))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < TOL[m], f"F({m},3) relative max error {err:.2e}"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batch_of_two(host_build, layout):
    test_layer_error_vs_direct_conv(host_build, 4, layout, 16, 24, 10, (1, 1, 1, 1), True, batch=2)


def test_schedule_declines_other_kernels():
    from tvm import s_tir, te

    a = te.placeholder((8, 8), name="a")
    func = te.create_prim_func([a, te.compute((8, 8), lambda i, j: a[i, j] * 2, name="b")])
    from hwcompress.backends.cpu_schedule import CpuFacts

    assert schedule_winograd(s_tir.Schedule(func), CpuFacts(num_cores=2, vector_bits=256)) is False


# ---------------------------------------------------------------------------- end to end


def _zoo():
    from tool_modules import load_tool

    return load_tool("zoo")


@pytest.mark.parametrize("cfg", [Winograd(), Winograd(tile=4, min_channels=1)], ids=["auto", "f4-all"])
def test_small_cnn_end_to_end_vs_onnxruntime(host_build, cfg):
    import hwcompress

    model = _zoo().small_cnn()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    mod = winograd(hwcompress.import_onnx(model), cfg, host_build.spec)
    rewritten = [r for r in winograd_candidates(hwcompress.import_onnx(model), cfg) if r["tile"]]
    assert len(rewritten) == (2 if cfg.tile is None else 3)  # the block's two 32-ch convs (+ the stem)
    assert any("winograd" in k for k in host_build.kernels(mod))
    ref = G.ort_run(model, x)
    for own in (True, False):
        out = _run(host_build, mod, x, own)
        np.testing.assert_allclose(out, ref, rtol=0, atol=E2E_RTOL * np.abs(ref).max())


def test_residual_block_end_to_end(host_build):
    """conv+BN+relu -> conv(bias)+BN -> add -> relu, BN from the raw import (not folded)."""
    model = G.residual_block(c=16, hw=12)
    x = np.random.default_rng(1).standard_normal((1, 16, 12, 12)).astype(np.float32)
    mod = winograd(G.raw_import(model), Winograd(min_channels=16))
    assert _ops(mod["main"]).count("relax.nn.conv2d") == 0
    out = _run(host_build, mod, x, True)
    ref = G.ort_run(model, x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=E2E_RTOL * np.abs(ref).max())
