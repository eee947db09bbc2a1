"""Default graph optimizations (``Optimize``): which steps run, as the target spec and the
switches decide, and what the module looks like after import with and without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.api import import_model
from hwcompress.errors import RecipeError
from hwcompress.optimize import Optimize, Switch, effective_recipe
from hwcompress.passes import ConvLayout, FoldBatchNorm, Winograd
from hwcompress.recipe import Recipe
from hwcompress.targets import load_target


def _names(recipe) -> list[str]:
    return [step["technique"] for step in recipe.to_dict()["steps"]]


@pytest.mark.parametrize(
    "target,winograd,nhwc",
    [("host", True, True), ("arm-cortex-a72", True, True), ("cuda-sm80", True, False), ("jetson-orin", True, False), ("npu-stub", False, True)],
)
def test_auto_follows_the_target_spec(target, winograd, nhwc):
    """CPU targets: Winograd and NHWC convs (the layout measured faster there); CUDA: Winograd
    in NCHW (measured on an H100); NPU: NHWC (what it reads), no Winograd."""
    spec = load_target(target)
    assert spec.hardware.winograd is winograd
    assert spec.hardware.conv_layout.value == ("NHWC" if nhwc else "NCHW")
    steps = _names(effective_recipe(None, Optimize(), spec))
    assert steps == ["fold-bn"] + (["layout"] if nhwc else []) + (["winograd"] if winograd else [])


def test_switches_override_the_spec():
    host, cuda = load_target("host"), load_target("cuda-sm80")
    assert _names(effective_recipe(None, Optimize(winograd=Switch.OFF), host)) == ["fold-bn", "layout"]
    assert _names(effective_recipe(None, Optimize(winograd="off"), cuda)) == ["fold-bn"]
    assert _names(effective_recipe(None, Optimize(fold_bn=False, winograd="off", layout="NCHW"), host)) == []
    assert _names(effective_recipe(None, Optimize(layout="NHWC", winograd="off"), cuda)) == ["fold-bn", "layout"]


def test_recipe_steps_keep_their_settings_and_order():
    """BN folding first, the user's steps, the layout before Winograd, Winograd last; a step
    the recipe names is not added again (its settings win)."""
    host = load_target("host")
    mine = Winograd(tile=2)
    recipe = effective_recipe(Recipe((mine,)), Optimize(), host)
    assert recipe.steps == (FoldBatchNorm(), ConvLayout("NHWC"), mine)


@pytest.mark.parametrize(
    "options,step,flag",
    [(Optimize(fold_bn=False), FoldBatchNorm(), "--no-fold-bn"), (Optimize(winograd="off"), Winograd(), "--winograd off")],
)
def test_conflicting_switch_and_recipe_is_an_error(options, step, flag):
    with pytest.raises(RecipeError, match=flag):
        effective_recipe(Recipe((step,)), options, load_target("host"))


def test_bad_switch_values():
    with pytest.raises(ValueError, match="on, off or auto"):
        Optimize(winograd="sometimes")
    with pytest.raises(TypeError, match="fold_bn"):
        Optimize(fold_bn="yes")


def _ops(mod) -> set[str]:
    from tvm import relax

    ops = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, __import__("tvm").ir.Op):
            ops.add(e.op.name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return ops


def test_no_fold_bn_keeps_batch_norm_through_the_frontend():
    """ONNX Runtime's basic level folds Conv+BN in the frontend; --no-fold-bn must stop that too."""
    model = G.conv_bn(bias=True, act="Relu")
    host = load_target("host")
    folded = import_model(model, host, optimize=Optimize(winograd="off")).mod
    kept = import_model(model, host, optimize=Optimize(fold_bn=False, winograd="off")).mod
    assert "relax.nn.batch_norm" not in _ops(folded)
    assert "relax.nn.batch_norm" in _ops(kept)


def test_cli_switches_reach_the_manifest_and_the_kernels(tmp_path: Path):
    """Default host build: BN folded, NHWC, Winograd kernels; with the switches off: none of
    them, and both artifacts verified against ONNX Runtime."""
    model = tmp_path / "m.onnx"
    model.write_bytes(G.residual_block(c=16, hw=12).SerializeToString())
    hwc = [sys.executable, "-m", "hwcompress"]
    runs = {}
    for label, flags in (("default", []), ("off", ["--no-fold-bn", "--no-fuse-blocks", "--winograd", "off", "--layout", "NCHW"])):
        out = tmp_path / label
        done = subprocess.run([*hwc, "-q", "build", str(model), "-o", str(out), *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs[label] = json.loads((out / "manifest.json").read_text())
    default, off = runs["default"], runs["off"]
    assert default["optimize"] == {
        "fold_bn": True, "fuse": True, "blocks": True, "winograd": "auto", "winograd_applied": True, "layout": "auto", "layout_applied": "NHWC"
    }
    assert off["optimize"] == {
        "fold_bn": False, "fuse": True, "blocks": False, "winograd": "off", "winograd_applied": False, "layout": "NCHW", "layout_applied": "NCHW"
    }
    all_default = default["kernels"]["default_schedule"] + default["kernels"]["tuned"]
    all_off = off["kernels"]["default_schedule"] + off["kernels"]["tuned"]
    assert any("winograd" in k for k in all_default), all_default
    assert not any("winograd" in k for k in all_off), all_off
    for manifest in (default, off):
        assert manifest["verification"]["status"] == "passed"
        assert np.isfinite(manifest["verification"]["cases"][0]["max_abs_err"])
