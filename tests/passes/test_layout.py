"""layout: the IR after the pass (every conv in the requested layout with a constant weight,
activation transposes only at the graph's edges, Clip kept), end to end against ONNX Runtime
(also followed by Winograd), the target field ``[hardware].conv_layout``, the order of the
default steps, and ``hwc build --layout`` into the manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import pass_graphs as G
from hwcompress.errors import RecipeError, TargetError
from hwcompress.optimize import Optimize, effective_recipe
from hwcompress.passes import ConvLayout, FoldBatchNorm, Fuse, Winograd, convert_layout, fold_bn
from hwcompress.passes.layout import block_size, kernel_layout
from hwcompress.recipe import Recipe
from hwcompress.targets import DataLayout, load_target, spec_from_dict

# Relative max error (max |out - ref| / max |ref|) of a float32 network against ONNX Runtime:
# a layout changes the order of the sums only (measured <= 3e-7 on these graphs).
RTOL = 1e-5
# With Winograd after the layout pass (F(4,3) adds its own rounding; see test_winograd).
RTOL_WINOGRAD = 1e-4
LAYOUTS = ["NHWC", "NCHW8c", "NCHW4c"]
TRANSFORMS = ("relax.permute_dims", "relax.layout_transform")


def _stem_graph(seed: int = 0):
    """3-channel input conv (too few channels to block), stride-2 3x3, 1x1 projection."""
    g = G._Graph(seed)
    y = g.act(g.conv("input", 3, 16, bias=True), "Relu")
    y = g.act(g.conv(y, 16, 16, stride=2), "Relu")
    y = g.conv(y, 16, 8, k=1, bias=True)
    return g.model((1, 3, 10, 10), y, (1, 8, 5, 5))


GRAPHS = {
    "residual": (lambda: G.residual_block(c=16, hw=10), (1, 16, 10, 10)),
    "inverted_residual": (lambda: G.inverted_residual(c=16, hw=10), (1, 16, 10, 10)),
    "stem": (_stem_graph, (1, 3, 10, 10)),
}


def _imported_raw(name):
    import hwcompress

    return hwcompress.import_onnx(GRAPHS[name][0]())


def _imported(name):
    return fold_bn(_imported_raw(name))


def _bindings(mod):
    """(var, call) of every op call in ``main``'s dataflow blocks, in order."""
    import tvm
    from tvm import relax

    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                out.append((b.var, b.value))
    return out


def _is_const(expr) -> bool:
    return type(expr).__name__ == "GenericConst"  # relax.Constant in TVM 0.27


def _op(call) -> str:
    return call.op.name


def _tir_calls(mod) -> list[str]:
    from tvm import relax

    return [c.args[0].name_hint for _, c in _bindings(mod) if _op(c) == "relax.call_tir" and isinstance(c.args[0], relax.GlobalVar)]


def _assert_transforms_at_edges(mod, count: int) -> None:
    """``count`` activation transposes in ``main``, each at an edge of the graph: it reads a
    parameter (the input into the conv layout) or comes after the last conv (the result back
    to NCHW). None sits between two convs."""
    calls = _bindings(mod)
    conv_ops = ("relax.nn.conv2d", "relax.call_tir")
    last_conv = max(i for i, (_, c) in enumerate(calls) if _op(c) in conv_ops)
    params = set(mod["main"].params)
    transforms = [(i, c) for i, (_, c) in enumerate(calls) if _op(c) in TRANSFORMS]
    assert len(transforms) == count, [str(c.op) for _, c in transforms]
    for i, call in transforms:
        assert call.args[0] in params or i > last_conv, f"transform #{i} between convs"


# ---------------------------------------------------------------------------- config


def test_config_and_layout_facts():
    assert ConvLayout().layout is DataLayout.NHWC
    assert ConvLayout("NCHW8c").layout is DataLayout.NCHW8C
    with pytest.raises(ValueError, match="NCHW, NHWC, NCHW4c"):
        ConvLayout("NCHW3c")
    assert [kernel_layout(k) for k in ("NCHW", "NHWC", "NCHW16c")] == ["OIHW", "OHWI", "OIHW16i16o"]
    assert [block_size(k) for k in ("NCHW", "NHWC", "NCHW4c")] == [None, None, 4]


def test_recipe_round_trip():
    recipe = Recipe.from_dict({"steps": [{"technique": "layout", "layout": "NCHW8c"}]})
    assert recipe.steps == (ConvLayout("NCHW8c"),)
    assert recipe.to_dict() == {"steps": [{"technique": "layout", "layout": "NCHW8c"}]}
    with pytest.raises(RecipeError, match="layout"):
        Recipe.from_dict({"steps": [{"technique": "layout", "layout": "CHWN"}]})


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("graph", ["residual", "inverted_residual"])
def test_nhwc_convs_and_edge_transposes_only(graph):
    """Every conv NHWC/OHWI with a constant weight; two transposes left, on the input and the
    output (the residual input is transposed once, not once per use); ReLU6 stays R.clip."""
    before = _imported(graph)
    mod = convert_layout(before, ConvLayout("NHWC"))
    calls = _bindings(mod)
    convs = [c for _, c in calls if _op(c) == "relax.nn.conv2d"]
    assert len(convs) == len([c for _, c in _bindings(before) if _op(c) == "relax.nn.conv2d"])
    for conv in convs:
        assert (str(conv.attrs.data_layout), str(conv.attrs.kernel_layout), str(conv.attrs.out_layout)) == ("NHWC", "OHWI", "NHWC")
        assert _is_const(conv.args[1])
    _assert_transforms_at_edges(mod, 2)
    ops = {_op(c) for _, c in calls}
    assert "relax.call_tir" not in ops and "relax.minimum" not in ops
    if graph == "inverted_residual":
        assert "relax.clip" in ops


def test_blocked_convs_become_kernels():
    """NCHW8c: every conv with channels divisible by 8 is a ``conv2d_NCHW8c`` kernel with a
    6-D constant weight; the 3-channel stem conv stays a NCHW conv2d."""
    mod = convert_layout(_imported("stem"), ConvLayout("NCHW8c"))
    calls = _bindings(mod)
    assert [c.attrs.data_layout for _, c in calls if _op(c) == "relax.nn.conv2d"] == ["NCHW"]
    blocked = [c for _, c in calls if _op(c) == "relax.call_tir" and c.args[0].name_hint.startswith("conv2d_NCHW8c")]
    assert len(blocked) == 2
    for call in blocked:
        weight = call.args[1].fields[1]
        assert _is_const(weight) and weight.value.numpy().ndim == 6
    # after the NCHW stem conv, into NCHW8c; the output back to NCHW; none between blocked convs
    transforms = [i for i, (_, c) in enumerate(calls) if _op(c) in TRANSFORMS]
    assert len(transforms) == 2 and _op(calls[transforms[0] - 1][1]) in ("relax.nn.conv2d", "relax.nn.relu", "relax.add")
    kernels = [i for i, (_, c) in enumerate(calls) if _op(c) == "relax.call_tir"]
    assert transforms[0] < kernels[0] and transforms[1] > kernels[-1]


def test_depthwise_stays_nchw_in_blocked_layouts():
    mod = convert_layout(_imported("inverted_residual"), ConvLayout("NCHW8c"))
    convs = [c for _, c in _bindings(mod) if _op(c) == "relax.nn.conv2d"]
    assert [(int(c.attrs.groups), str(c.attrs.data_layout)) for c in convs] == [(48, "NCHW")]
    assert sum(name.startswith("conv2d_NCHW8c") for name in _tir_calls(mod)) == 2


def test_nchw_leaves_imported_convs_as_they_are():
    calls = _bindings(convert_layout(_imported("residual"), ConvLayout("NCHW")))
    convs = [c for _, c in calls if _op(c) == "relax.nn.conv2d"]
    assert [(str(c.attrs.data_layout), str(c.attrs.kernel_layout)) for c in convs] == [("NCHW", "OIHW")] * 2
    assert not any(_op(c) in TRANSFORMS for _, c in calls)


# ---------------------------------------------------------------------------- numerics


def _rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_matches_onnxruntime(host_build, graph, layout):
    build, shape = GRAPHS[graph]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got = host_build.run(convert_layout(_imported(graph), ConvLayout(layout)), x)
    assert _rel_err(got, G.ort_run(build(), x)) <= RTOL


@pytest.mark.parametrize("layout", ["NHWC", "NCHW8c"])
def test_winograd_after_the_layout(host_build, layout):
    """The default order (layout, then Winograd): NHWC convs become NHWC Winograd kernels with
    no transposes of their own; blocked convs are kernels already, Winograd leaves them."""
    from hwcompress.passes import winograd

    x = np.random.default_rng(2).standard_normal((1, 16, 10, 10)).astype(np.float32)
    mod = winograd(convert_layout(_imported("residual"), ConvLayout(layout)), Winograd(tile=2))
    kernels = _tir_calls(mod)
    if layout == "NHWC":
        assert kernels == ["conv2d_winograd_f2", "conv2d_winograd_f2"]
        assert sum(_op(c) in TRANSFORMS for _, c in _bindings(mod)) == 2
    else:
        assert not any("winograd" in k for k in kernels)
    got = host_build.run(mod, x)
    assert _rel_err(got, G.ort_run(G.residual_block(c=16, hw=10), x)) <= RTOL_WINOGRAD


def test_fuse_after_the_layout(host_build, tmp_path):
    """A recipe's ``fuse`` step runs after the default layout step; the NHWC convs end up in
    one kernel each with their epilogues (the CPU backend packs them, so ``fuse`` leaves them to
    FuseOps); only the two edge transposes stay separate kernels."""
    nhwc = load_target(_target(tmp_path, '"NHWC"'))
    recipe = effective_recipe(Recipe((Fuse(),)), Optimize(winograd="off"), nhwc)
    mod = recipe.apply(_imported_raw("residual"), nhwc)
    kernels = host_build.kernels(mod)
    convs = [k for k in kernels if "conv2d" in k]
    assert len(kernels) == 4 and len(convs) == 2 and all("relu" in k for k in convs), kernels
    x = np.random.default_rng(3).standard_normal((1, 16, 10, 10)).astype(np.float32)
    assert _rel_err(host_build.run(mod, x), G.ort_run(G.residual_block(c=16, hw=10), x)) <= RTOL


# ---------------------------------------------------------------------------- target spec + defaults


def _target(tmp_path, conv_layout, base="host"):
    path = tmp_path / "t.toml"
    path.write_text(f'name = "t"\nbase = "{base}"\n[hardware]\nconv_layout = {conv_layout}\n')
    return str(path)


@pytest.mark.parametrize("value", ['"NCWH"', '"nhwc"', "8"])
def test_bad_conv_layout_names_file_and_field(tmp_path, value):
    path = _target(tmp_path, value)
    with pytest.raises(TargetError) as err:
        load_target(path)
    assert path in str(err.value) and "[hardware].conv_layout" in str(err.value)


def test_conv_layout_field_loads_and_round_trips(tmp_path):
    spec = load_target(_target(tmp_path, '"NCHW16c"'))
    assert spec.hardware.conv_layout is DataLayout.NCHW16C
    assert spec.to_dict()["hardware"]["conv_layout"] == "NCHW16c"
    assert spec_from_dict(spec.to_dict()) == spec
    old = spec.to_dict()
    del old["hardware"]["conv_layout"]  # a manifest written before the field existed
    assert spec_from_dict(old).hardware.conv_layout is DataLayout.NCHW
    for name in ("cuda-sm80", "jetson-orin"):
        assert load_target(name).hardware.conv_layout is DataLayout.NCHW
    assert load_target("npu-stub").hardware.conv_layout is DataLayout.NHWC  # what the NPU reads


def _names(recipe) -> list[str]:
    return [step["technique"] for step in recipe.to_dict()["steps"]]


def test_layout_step_order(tmp_path):
    """auto follows the spec; NCHW adds no step; the layout goes before the recipe's fuse /
    winograd steps and before the default Winograd; a recipe's own layout step wins."""
    nhwc = load_target(_target(tmp_path, '"NHWC"'))
    assert _names(effective_recipe(None, Optimize(), nhwc)) == ["fold-bn", "layout", "winograd"]
    assert effective_recipe(None, Optimize(), nhwc).steps[1] == ConvLayout("NHWC")
    assert _names(effective_recipe(None, Optimize(layout="NCHW"), nhwc)) == ["fold-bn", "winograd"]
    assert effective_recipe(None, Optimize(layout="NCHW8c", winograd="off"), nhwc).steps == (FoldBatchNorm(), ConvLayout("NCHW8c"))
    steps = effective_recipe(Recipe((Fuse(),)), Optimize(), nhwc).steps
    assert steps == (FoldBatchNorm(), ConvLayout("NHWC"), Fuse(), Winograd())
    mine = ConvLayout("NCHW4c")
    assert effective_recipe(Recipe((mine,)), Optimize(), nhwc).steps == (FoldBatchNorm(), mine, Winograd())
    with pytest.raises(RecipeError, match="--layout NHWC"):
        effective_recipe(Recipe((mine,)), Optimize(layout="NHWC"), nhwc)


def test_bad_optimize_layout():
    with pytest.raises(ValueError, match="auto or one of NCHW"):
        Optimize(layout="HWCN")
    assert Optimize(layout="NHWC").layout is DataLayout.NHWC


def test_cli_layout_reaches_the_manifest(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(G.residual_block(c=16, hw=12).SerializeToString())
    out = tmp_path / "nhwc"
    hwc = [sys.executable, "-m", "hwcompress"]
    done = subprocess.run(
        [*hwc, "-q", "build", str(model), "-o", str(out), "--layout", "NHWC", "--winograd", "off"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["optimize"]["layout"] == "NHWC" and manifest["optimize"]["layout_applied"] == "NHWC"
    assert {"technique": "layout", "layout": "NHWC"} in manifest["recipe"]["steps"]
    assert manifest["verification"]["status"] == "passed"
    bad = subprocess.run([*hwc, "build", str(model), "--layout", "CHWN"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--layout" in bad.stderr


# ---------------------------------------------------------------------------- quantized graphs


def _qdq_function(per_channel: bool):
    """quantize (float32 -> uint8 and int8) and dequantize (int8 and int32, per channel along
    axis 1 or per tensor) of a [2, 4, 3, 5] tensor, the quantize output dequantized."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(7)
    x = relax.Var("x", relax.TensorType((2, 4, 3, 5), "float32"))
    acc = relax.Var("acc", relax.TensorType((2, 4, 3, 5), "int32"))
    scale = relax.const(np.float32([0.5, 0.25, 0.1, 0.03]) if per_channel else np.float32(0.07))
    zp8 = relax.const(np.int8([3, -2, 0, 7]) if per_channel else np.int8(-5))
    zpu8 = relax.const(np.uint8([128, 0, 255, 17]) if per_channel else np.uint8(131))
    zp32 = relax.const(rng.integers(-(2**20), 2**20, 4).astype(np.int32) if per_channel else np.int32(-70000))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, acc]):
        with bb.dataflow():
            qu = bb.emit(relax.op.quantize(x, scale, zpu8, axis=1, out_dtype="uint8"))
            qs = bb.emit(relax.op.quantize(x, scale, zp8, axis=1, out_dtype="int8"))
            outs = [
                bb.emit(relax.op.dequantize(qu, scale, zpu8, axis=1)),
                bb.emit(relax.op.dequantize(qs, scale, zp8, axis=1)),
                bb.emit(relax.op.dequantize(acc, scale, zp32, axis=1)),
            ]
            out = bb.emit_output(relax.Tuple([qu, qs, *outs]))
        bb.emit_func_output(out)
    return bb.get(), tvm


def _run(mod, *args) -> list:
    """``main``'s outputs (one tensor or a tuple) built with TVM's default CPU pipeline."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in args))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_dequantize_split_is_bit_exact(per_channel):
    """The elementwise form the layout pass gives ``quantize`` / ``dequantize`` (so that
    ``ConvertLayout`` can move them) computes the same bits as TVM's legalization of the ops,
    ties to even, clipping and int32 zero points included; joining it back restores the ops."""
    from tvm.relax.dpl import rewrite_call

    from hwcompress.passes import layout_qdq as qdq

    mod, tvm = _qdq_function(per_channel)
    split = mod
    for make in (qdq.quantize_split, qdq.dequantize_split):
        split = tvm.IRModule({"main": rewrite_call(*make(), split["main"])})
    ops = {_op(c) for _, c in _bindings(split)}
    assert "relax.quantize" not in ops and "relax.dequantize" not in ops and "relax.round" in ops
    rng = np.random.default_rng(8)
    x = (rng.integers(-600, 600, (2, 4, 3, 5)) / 4).astype(np.float32)  # halves of the scale 0.5: ties
    x[0, 0, 0, :2] = [1e6, -1e6]  # clipped
    acc = rng.integers(-(2**24), 2**24, (2, 4, 3, 5)).astype(np.int32)
    for want, got in zip(_run(mod, x, acc), _run(split, x, acc)):
        np.testing.assert_array_equal(got, want)
    joined = split
    for make in (qdq.dequantize_join, qdq.quantize_join):
        joined = tvm.IRModule({"main": rewrite_call(*make(), joined["main"])})
    calls = [c for _, c in _bindings(joined)]
    assert [_op(c) for c in calls] == ["relax.quantize"] * 2 + ["relax.dequantize"] * 3
    assert all(int(c.attrs.axis) in ((1,) if per_channel else (-1,)) for c in calls)


def test_quantized_convs_follow_the_layout():
    """``quantize -> pad(zero point) -> int8 conv -> dequantize`` after a float conv:
    NHWC with no transpose inside (the per-channel dequantize along axis 3, the pad's widths
    moved to H and W), the two at the edges left."""
    from tvm import relax

    rng = np.random.default_rng(9)
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            f = relax.const(rng.standard_normal((8, 8, 1, 1)).astype(np.float32))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(x, f))))
            q = bb.emit(relax.op.quantize(y, relax.const(np.float32(0.1)), relax.const(np.uint8(100)), axis=1, out_dtype="uint8"))
            p = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=100.0))
            w = relax.const(rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8))
            a = bb.emit(relax.op.nn.conv2d(p, w, out_dtype="int32"))
            scale = relax.const(rng.uniform(1e-3, 2e-3, 16).astype(np.float32))
            d = bb.emit(relax.op.dequantize(a, scale, relax.const(rng.integers(-99, 99, 16).astype(np.int32)), axis=1))
            out = bb.emit_output(relax.op.nn.relu(d))
        bb.emit_func_output(out)
    before = bb.get()
    mod = convert_layout(before, ConvLayout("NHWC"))
    calls = _bindings(mod)
    assert [_op(c) for _, c in calls] == [
        "relax.permute_dims", "relax.nn.conv2d", "relax.nn.relu", "relax.quantize", "relax.nn.pad", "relax.nn.conv2d",
        "relax.dequantize", "relax.nn.relu", "relax.permute_dims",
    ]  # fmt: skip
    ops = {_op(c): c for _, c in calls}
    assert [int(w) for w in ops["relax.nn.pad"].attrs.pad_width] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert int(ops["relax.dequantize"].attrs.axis) == 3 and str(ops["relax.nn.conv2d"].attrs.data_layout) == "NHWC"
    assert str(ops["relax.nn.conv2d"].attrs.out_dtype) == "int32"
    xv = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(mod, xv)[0], _run(before, xv)[0])
