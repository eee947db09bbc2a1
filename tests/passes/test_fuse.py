"""fuse: conv + bias + activation (+ residual add) as one kernel; the switchable legalize
pass list; outputs against ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.passes import FoldBatchNorm, Fuse, fold_bn, fuse

# Relative max error vs ONNX Runtime (float32, BN folded, reassociated epilogue).
RTOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def _zoo():
    from tool_modules import load_tool

    return load_tool("zoo")


def _input(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(3).standard_normal(shape).astype(np.float32)


def _close(out, ref):
    return np.abs(out - ref).max() <= RTOL * np.abs(ref).max()


def test_config_validates():
    with pytest.raises(TypeError):
        Fuse(residual=1)


@pytest.mark.parametrize("act", G.ACTIVATIONS)
@pytest.mark.parametrize("frontend", ["raw", "hwc"])
def test_conv_bn_activation_is_one_kernel(act, frontend, host_build):
    import hwcompress

    model = G.conv_bn(bias=True, act=act)
    mod = G.raw_import(model) if frontend == "raw" else hwcompress.import_onnx(model)
    mod = fuse(fold_bn(mod))
    kernels = host_build.kernels(mod, fuse=False)  # the pass alone, without TVM's FuseOps
    assert len(kernels) == 1 and "conv2d" in kernels[0], kernels
    x = _input(model)
    assert _close(host_build.run(mod, x, fuse=False), G.ort_run(model, x))


def test_clip_becomes_r_clip():
    from hwcompress.passes.fuse import canonicalize_clip

    text = canonicalize_clip(G.raw_import(G.conv_bn(act="Clip")))["main"].script()
    assert "R.clip(" in text and "R.isnan" not in text and "call_tir" not in text


@pytest.mark.parametrize("residual", [True, False])
def test_residual_add_joins_the_conv_kernel(residual, host_build):
    model = G.residual_block()
    mod = fuse(fold_bn(G.raw_import(model)), Fuse(residual=residual))
    kernels = host_build.kernels(mod, fuse=False)
    conv_kernels = [k for k in kernels if "conv2d" in k]
    assert len(conv_kernels) == 2
    assert len(kernels) == (2 if residual else 4), kernels  # else: separate add and relu kernels
    x = _input(model)
    assert _close(host_build.run(mod, x, fuse=False), G.ort_run(model, x))


def test_residual_operand_computed_from_the_conv_is_not_fused(host_build):
    """MobileNetV2's first residual adds two conv outputs where one feeds the other: the
    group takes the conv that feeds the add directly, never the earlier one."""
    model = G.inverted_residual()
    mod = fuse(fold_bn(G.raw_import(model)))
    kernels = host_build.kernels(mod, fuse=False)
    assert len(kernels) == 3 and kernels[-1].endswith("add_relax_add"), kernels
    x = _input(model)
    assert _close(host_build.run(mod, x, fuse=False), G.ort_run(model, x))


def test_unfused_legalize_has_one_kernel_per_op(host_build):
    kernels = host_build.kernels(G.raw_import(G.residual_block()), fuse=False)
    assert not [k for k in kernels if k.startswith("fused")], kernels
    assert kernels.count("conv2d") == 2 and "relu" in kernels


@pytest.mark.parametrize(
    "name, convs, total",
    [("resnet18", 20, 24), ("mobilenet_v2", 52, 55)],
)
@pytest.mark.parametrize("frontend", ["raw", "hwc"])
def test_zoo_kernel_counts(name, convs, total, frontend, host_build):
    """Every conv is one kernel with its bias, activation and residual add; no BN left."""
    import hwcompress

    model = getattr(_zoo(), name)()
    shapes = {"input": (1, 3, 224, 224)}
    mod = G.raw_import(model, shapes) if frontend == "raw" else hwcompress.import_onnx(model, shapes)
    kernels = host_build.kernels(fuse(fold_bn(mod)))
    conv_kernels = [k for k in kernels if "conv2d" in k]
    assert len(conv_kernels) == convs and len(kernels) == total, kernels
    assert all(k.startswith("fused") for k in conv_kernels)
    adds = {"resnet18": 8, "mobilenet_v2": 10}[name]
    assert sum(k.count("add") == 2 for k in conv_kernels) == adds  # bias + residual in one kernel
    assert not [k for k in kernels if any(op in k for op in ("subtract", "divide", "multiply", "batch_norm"))]
    assert not [k for k in kernels if k in ("add", "relu", "clip", "maximum", "minimum")]


def test_small_cnn_matches_onnxruntime(host_build):
    model = _zoo().small_cnn()
    mod = fuse(fold_bn(G.raw_import(model), FoldBatchNorm()), Fuse())
    x = _input(model)
    assert _close(host_build.run(mod, x), G.ort_run(model, x))


def test_recipe_round_trip():
    from hwcompress.recipe import Recipe

    recipe = Recipe((FoldBatchNorm(), Fuse(residual=False)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert [s["technique"] for s in recipe.to_dict()["steps"]] == ["fold-bn", "fuse"]


def test_import_passes_is_light():
    import subprocess

    code = "import sys, hwcompress.passes; print(','.join(m for m in ('tvm', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
