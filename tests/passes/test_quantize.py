"""int8: static INT8 quantization with integer kernels.

Structural: the quantized Relax graph (quantize -> [pad with the zero point] -> int8 conv /
matmul -> dequantize), and the BUILT module's kernels (every conv / matmul reduction reads
8-bit integers and accumulates int32; only reported fallbacks stay float). Numerical: one layer
against a numpy emulation of the integer arithmetic and against float (SQNR in dB), the
Fashion classifier's top-1 and SQNR against FP32 on its sample images, and the built module
against the same quantized graph run by TVM's plain pipeline (within one quantization step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import pass_graphs as G

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.api import import_model  # noqa: E402
from hwcompress.backends.cpu_int8 import DOT_ATTR, TILE_ATTR  # noqa: E402
from hwcompress.backends.cpu_schedule import CpuFacts  # noqa: E402
from hwcompress.backends.cpu_intrin import Int8Dot, dot_for_weights  # noqa: E402
from hwcompress.errors import DataError, RecipeError  # noqa: E402
from hwcompress.optimize import Optimize, effective_recipe  # noqa: E402
from hwcompress.passes import ChannelPrune, Int8DataFree, Int8Static, Winograd, quantize_int8  # noqa: E402
from hwcompress.passes.quantize import int8_report, sqnr_db  # noqa: E402
from hwcompress.passes.quantize import quantize as quantize_array  # noqa: E402
from hwcompress.passes.quantize.int8_graph import emit_main, find_sites, module_with_main, rewrite  # noqa: E402
from hwcompress.passes.quantize.int8 import plan_layer, weight_qmax  # noqa: E402
from hwcompress.passes.quantize.observers import weight_qparams  # noqa: E402
from hwcompress.recipe import Recipe  # noqa: E402
from hwcompress.targets import Int8Kind, load_target  # noqa: E402
from hwcompress.verify import host_vm  # noqa: E402

HOST = load_target("host")
INT8_DOT = CpuFacts.from_target(HOST.tvm_target()).int8_dot
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FASHION_BATCH = 8

# A uint8 step of 1/255 of the range moves one activation by s_x; the bounds below are the
# measured values (Fashion: 39-48 dB per layer alone, 34 dB at the output) less a margin.
LAYER_SQNR_DB = 30.0
OUTPUT_SQNR_DB = 25.0


def _run(vm, *arrays):
    res = vm["main"](*(tvm.runtime.tensor(a) for a in arrays))
    return [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]


def _built_vm(mod):
    """``mod`` through hwc's own pipeline for the host: legalize (backend int8 kernels), fuse,
    default schedules, codegen."""
    return relax.VirtualMachine(B.build(B.schedule(B.legalize(mod, HOST), HOST), HOST), tvm.cpu())


def _ops(mod) -> list[str]:
    ops = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name"):
                ops.append(b.value.op.name)
    return ops


# ---------------------------------------------------------------------------- one layer, by hand


def _conv_module(x_shape, w, padding, bias=None, layout="NHWC"):
    """One float conv (+ bias) in ``layout`` (NHWC / OHWI or NCHW / OIHW)."""
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=padding, data_layout=layout,
                                           kernel_layout="OHWI" if layout == "NHWC" else "OIHW"))  # fmt: skip
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _int_conv_nhwc(q, w, padding, pad_value):
    """uint8 NHWC x int8 OHWI conv in int64, stride 1, the input padded with ``pad_value``."""
    pt, pl, pb, pr = padding
    x = np.pad(q.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=pad_value)
    o, kh, kw, _ = w.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], oh, ow, o), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            out += np.einsum("nhwc,oc->nhwo", x[:, ky : ky + oh, kx : kx + ow], w[:, ky, kx].astype(np.int64))
    return out


def _quantized_by_hand(mod, x):
    """The int8 module of ``mod``'s one site calibrated (min / max) on ``x``, and its layer."""
    (site,) = find_sites(mod["main"])
    layer = plan_layer(site, (float(x.min()), float(x.max())))
    return rewrite(mod, [layer]), layer


def test_zero_point_padding_matches_the_integer_arithmetic():
    """Input in [-1, 3]: zero point 64, so the padded taps must hold 64 (the float 0), not 0.
    The graph pads explicitly and convs unpadded; the result equals the numpy emulation of
    the integer arithmetic and stays close to float at the borders too."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 3, (2, 9, 7, 6)).astype(np.float32)
    w = (rng.standard_normal((8, 3, 3, 6)) / 7).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    padding = (1, 2, 1, 0)  # top, left, bottom, right: asymmetric on purpose
    mod = _conv_module(x.shape, w, padding, bias)
    qmod, layer = _quantized_by_hand(mod, x)
    assert layer.act.zero_point == 64
    assert _ops(qmod) == ["relax.quantize", "relax.nn.pad", "relax.nn.conv2d", "relax.dequantize", "relax.add"]
    pad = next(b.value for b in qmod["main"].body.blocks[0].bindings if getattr(b.value.op, "name", "") == "relax.nn.pad")
    assert float(pad.attrs.pad_value) == 64 and [int(p) for p in pad.attrs.pad_width] == [0, 0, 1, 1, 2, 0, 0, 0]
    conv = next(b.value for b in qmod["main"].body.blocks[0].bindings if getattr(b.value.op, "name", "") == "relax.nn.conv2d")
    assert [int(p) for p in conv.attrs.padding] == [0, 0, 0, 0] and str(conv.attrs.out_dtype) == "int32"
    assert str(conv.args[0].ty.dtype) == "uint8" and str(conv.args[1].ty.dtype) == "int8"

    (got,) = _run(host_vm(qmod), x)
    q = quantize_array(x, layer.act)
    acc = _int_conv_nhwc(q, layer.weight, padding, pad_value=64)
    emulated = (acc - layer.correction()).astype(np.float32) * layer.multiplier() + bias
    np.testing.assert_allclose(got, emulated, rtol=1e-5, atol=1e-5)

    (ref,) = _run(host_vm(mod), x)
    assert sqnr_db(ref, got) > 35
    border = np.ones(ref.shape, bool)
    border[:, 1:-1, 2:] = False  # outputs that read padded taps
    assert sqnr_db(ref[border], got[border]) > 35
    # what zero-padding would have given: the correction assumes every tap is zp_x
    wrong = (_int_conv_nhwc(q, layer.weight, padding, 0) - layer.correction()) * layer.multiplier() + bias
    assert sqnr_db(ref[border], wrong[border]) < 15


def test_avx2_targets_get_7_bit_weights():
    """``[hardware].int8 = "avx2"``: weights in [-63, 63] per channel (each channel's largest
    reaches 63), so that the CPU kernels multiply them with ``vpmaddubsw``; every other
    target (an NPU target too, even on an AVX2 host), and no target, keeps [-127, 127]."""
    avx2 = dataclasses.replace(HOST, hardware=dataclasses.replace(HOST.hardware, int8=Int8Kind.AVX2))
    assert weight_qmax(avx2) == 63
    assert weight_qmax(None) == weight_qmax(load_target("x86-avx512")) == weight_qmax(load_target("arm-cortex-a76")) == 127
    assert weight_qmax(HOST) == (63 if HOST.hardware.int8 is Int8Kind.AVX2 else 127)  # host: detected
    assert weight_qmax(load_target("npu-stub")) == 127  # its layers run in the NPU's int32 arithmetic
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 3, (2, 9, 7, 6)).astype(np.float32)
    w = (rng.standard_normal((8, 3, 3, 6)) * np.logspace(-2, 1, 8)[:, None, None, None]).astype(np.float32)
    (site,) = find_sites(_conv_module(x.shape, w, (1, 1, 1, 1))["main"])
    for per_channel in (True, False):
        wide = plan_layer(site, (-1.0, 3.0), per_channel).weight
        narrow = plan_layer(site, (-1.0, 3.0), per_channel, qmax=63).weight
        assert np.abs(wide.astype(np.int16)).max() == 127 and np.abs(narrow.astype(np.int16)).max() == 63
    per_channel = np.abs(plan_layer(site, (-1.0, 3.0), qmax=63).weight.astype(np.int16)).max(axis=(1, 2, 3))
    np.testing.assert_array_equal(per_channel, 63)
    np.testing.assert_allclose(weight_qparams(w, 0, 63).scale, np.abs(w).max(axis=(1, 2, 3)) / 63, rtol=1e-6)
    for bad in (0, 128, True, 63.0):
        with pytest.raises(ValueError, match="qmax"):
            weight_qparams(w, 0, bad)


def test_zero_point_zero_keeps_the_conv_padding():
    """A ReLU-like input (>= 0) has zero point 0: no pad op, the conv pads itself; NCHW too."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((1, 6, 8, 8)), 0).astype(np.float32)
    w = (rng.standard_normal((4, 6, 3, 3)) / 7).astype(np.float32)
    mod = _conv_module(x.shape, w, (1, 1, 1, 1), layout="NCHW")
    qmod, layer = _quantized_by_hand(mod, x)
    assert layer.act.zero_point == 0
    assert _ops(qmod) == ["relax.quantize", "relax.nn.conv2d", "relax.dequantize"]
    (ref,), (got,) = _run(host_vm(mod), x), _run(host_vm(qmod), x)
    assert sqnr_db(ref, got) > 35


def test_batched_matmul_runs_the_int8_dense_kernel():
    """``[B, S, K] @ [K, N]`` folds to ``[B*S, K]`` for the integer kernel and back."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("input", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(xv, relax.const(w)))
        bb.emit_func_output(out)
    mod = bb.get()
    qmod, _layer = _quantized_by_hand(mod, x)
    assert _ops(qmod) == ["relax.quantize", "relax.reshape", "relax.matmul", "relax.reshape", "relax.dequantize"]
    (ref,) = _run(host_vm(mod), x)
    (graph,) = _run(host_vm(qmod), x)
    (built,) = _run(_built_vm(qmod), x)
    assert sqnr_db(ref, graph) > 35
    np.testing.assert_allclose(built, graph, rtol=1e-5, atol=1e-5)  # one layer: no requantization in between


# ---------------------------------------------------------------------------- the verb, errors, recipes


def test_config_validates_and_keeps_data_out_of_recipes():
    for bad in ({"calibration": "kl"}, {"max_samples": 0}, {"max_samples": 2.5}, {"per_channel": "yes"}):
        with pytest.raises((TypeError, ValueError)):
            Int8Static(**bad)
    cfg = Int8Static(calibration="entropy", per_channel=False, data=np.zeros((4, 3)), max_samples=64)
    plain = Recipe((cfg,)).to_dict()
    assert plain == {"steps": [{"technique": "int8", "calibration": "entropy", "per_channel": False, "max_samples": 64,
                                "equalize": False, "bias_correction": False}]}  # fmt: skip
    again = Recipe.from_dict(plain).steps[0]
    assert again == cfg and again.data is None
    free = Recipe((Int8DataFree(samples=8),))
    assert free.to_dict()["steps"][0]["technique"] == "int8-data-free"
    assert Recipe.from_dict(free.to_dict()) == free
    for bad in ({"data": np.zeros((4, 3))}, {"calibration": "entropy"}, {"samples": 0}):
        with pytest.raises(ValueError):
            Int8DataFree(**bad)


def test_data_free_quantizes_without_data_and_says_how():
    """No calibration data: DFQ's weight steps, activation ranges from synthetic inputs; the
    kernels are the same integer kernels and the report names the method."""
    mod = G.raw_import(G.conv_bn())
    q = quantize_int8(mod, Int8DataFree(samples=4))
    report = int8_report(q)
    assert report["calibration"].startswith("data-free") and report["layers"]
    assert "dfq" in report and "bias_correction" in report["dfq"]
    assert "relax.nn.conv2d" in _ops(q) and "relax.quantize" in _ops(q)
    kernels = G.mac_kernels(B.legalize(q, load_target("host")))
    assert kernels and all(k["integer"] for k in kernels)


def test_missing_calibration_data_is_a_clear_error():
    mod = G.raw_import(G.conv_bn())
    with pytest.raises(RecipeError, match="calibration data is needed"):
        quantize_int8(mod, Int8Static())


def test_wrong_shaped_calibration_data_names_the_input():
    mod = G.raw_import(G.conv_bn())  # input [1, 8, 10, 10]
    with pytest.raises(DataError, match="'input'.*does not fit"):
        quantize_int8(mod, Int8Static(data=np.zeros((4, 3, 10, 10), np.float32)))


def test_recipe_order_puts_the_layout_before_int8():
    """fold-bn, prune, the conv layout, int8, Winograd: int8 sees final widths and NHWC convs."""
    steps = effective_recipe(Recipe((ChannelPrune(0.2), Int8Static())), Optimize(), HOST).to_dict()["steps"]
    assert [s["technique"] for s in steps] == ["fold-bn", "prune", "layout", "int8", "winograd"]
    for wrong in ((Int8Static(), ChannelPrune(0.2)), (Winograd(), Int8Static())):
        with pytest.raises(RecipeError, match="int8"):
            effective_recipe(Recipe(wrong), Optimize(), HOST)


def test_depthwise_convs_stay_float_and_are_reported():
    """MobileNetV2 block: the two 1x1 convs run in int8, the depthwise conv stays float (the
    report says why), and the built module's only float conv kernel is that one."""
    model = G.inverted_residual(c=8, expand=3, hw=10)
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((16, 8, 10, 10)).astype(np.float32)
    front = import_model(model, HOST, recipe=Recipe((Int8Static(data=calib),)), optimize=Optimize(winograd="off"))
    report = int8_report(front.mod)
    assert [f["name"] for f in report["float_fallback"]] == ["conv2d[1]"]
    assert "groups=24" in report["float_fallback"][0]["reason"]
    assert [layer["name"] for layer in report["layers"]] == ["conv2d[0]", "conv2d[2]"]
    assert all(layer["sqnr_db"] > LAYER_SQNR_DB for layer in report["layers"])
    kernels = G.mac_kernels(B.schedule(B.legalize(front.mod, HOST), HOST))
    assert sorted(k["integer"] for k in kernels) == [False, True, True]
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    (got,) = _run(_built_vm(front.mod), x)
    assert sqnr_db(G.ort_run(model, x), got) > OUTPUT_SQNR_DB


# ---------------------------------------------------------------------------- the Fashion classifier


@pytest.fixture(scope="module")
def fashion():
    """FP32 and INT8 imports of the Fashion classifier (batch 8) for the host, calibrated on
    the 8 shipped sample images, and both built by hwc's pipeline."""
    images = np.load(EXAMPLES / "fashion_sample.npy")
    labels = np.load(EXAMPLES / "fashion_sample_labels.npy")
    shapes = {"input": [FASHION_BATCH, 1, 28, 28]}
    fp32 = import_model(EXAMPLES / "fashion_resnet.onnx", HOST, shapes)
    int8 = import_model(EXAMPLES / "fashion_resnet.onnx", HOST, shapes, recipe=Recipe((Int8Static(data=images),)))
    return {"images": images, "labels": labels, "fp32": fp32.mod, "int8": int8.mod}


def test_every_conv_and_matmul_of_the_built_module_is_integer(fashion):
    """The scheduled module: all 9 convs and the classifier's matmul are integer kernels
    (uint8 x int8 inputs, int32 sums), tensorized with the CPU's dot instruction where it has one."""
    scheduled = B.schedule(B.legalize(fashion["int8"], HOST), HOST)
    kernels = G.mac_kernels(scheduled)
    assert len(kernels) == 10
    floats = [k for k in kernels if not k["integer"]]
    assert not floats, f"conv / matmul kernels still in float: {floats}"
    fp32 = G.mac_kernels(B.schedule(B.legalize(fashion["fp32"], HOST), HOST))
    assert len(fp32) == 10 and not any(k["integer"] for k in fp32)  # the walk does see float convs
    if INT8_DOT is not None:
        legalized = B.legalize(fashion["int8"], HOST)
        tiled = [gv.name_hint for gv, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and TILE_ATTR in f.script()]
        assert len(tiled) == 10  # the backend's packed int8 kernels, not TVM's generic loops
        assert all(f.attrs.get("tirx.is_scheduled") for gv, f in scheduled.functions_items() if gv.name_hint in tiled)


def test_fashion_int8_agrees_with_fp32(fashion):
    """Built INT8 vs built FP32 on the sample images: the same top-1 (>= 95%), output SQNR,
    and the per-layer SQNR of the report."""
    images, labels = fashion["images"], fashion["labels"]
    (ref,) = _run(_built_vm(fashion["fp32"]), images)
    (got,) = _run(_built_vm(fashion["int8"]), images)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    assert agreement >= 0.95
    assert (got.argmax(1) == labels).mean() >= (ref.argmax(1) == labels).mean()
    assert sqnr_db(ref, got) > OUTPUT_SQNR_DB
    report = int8_report(fashion["int8"])
    assert report["float_fallback"] == [] and report["calibration"] == "minmax"
    assert len(report["layers"]) == 10 and report["calibration_samples"] == 8
    assert all(layer["sqnr_db"] > LAYER_SQNR_DB and layer["sqnr_db_network"] > OUTPUT_SQNR_DB for layer in report["layers"])
    assert report["layers"][0]["input_zero_point"] > 0  # normalized images are signed
    assert report["output_sqnr_db"] > OUTPUT_SQNR_DB and report["top1_agreement"] >= 0.95


def _int8_weights(mod) -> list[np.ndarray]:
    """The constant int8 weights of the int8 convs / matmuls of ``mod["main"]``."""
    found = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") in ("relax.nn.conv2d", "relax.matmul"):
                weight = b.value.args[1]
                if isinstance(weight, tvm.ir.expr.GenericConst) and str(weight.ty.dtype) == "int8":
                    found.append(weight.value.numpy())
    return found


@pytest.mark.skipif(HOST.hardware.int8 is not Int8Kind.AVX2, reason="7-bit weights are for AVX2 without VNNI")
def test_host_avx2_quantizes_to_7_bit_weights_for_vpmaddubsw(fashion):
    """On this AVX2 host every int8 weight of the Fashion classifier lies in [-63, 63], the
    report says why, and every int8 kernel is legalized with ``vpmaddubsw``."""
    weights = _int8_weights(fashion["int8"])
    assert len(weights) == 10
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) == 63
    assert "7-bit weights for AVX2 vpmaddubsw" in int8_report(fashion["int8"])["scheme"]
    fast = dot_for_weights(INT8_DOT, 63)
    assert fast.kind is Int8Dot.PMADDUBSW
    legalized = B.legalize(fashion["int8"], HOST)
    kernels = [f.script() for _, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and TILE_ATTR in f.script()]
    assert len(kernels) == 10 and all(f'"{DOT_ATTR}": "{fast.name}"' in k for k in kernels)


def test_built_module_equals_the_quantized_graph_within_one_step(fashion):
    """Every uint8 tensor of the int8 network, built by hwc (packed kernels, fused epilogues)
    vs the same graph run op by op by TVM's plain pipeline: at most one quantization step
    apart, and rarely that (a fused epilogue rounds its float sums once, FMA)."""
    mod = fashion["int8"]
    func = mod["main"]
    bindings = func.body.blocks[0].bindings
    quantized = [b.var for b in bindings if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.quantize"]
    assert len(quantized) == 8  # one per distinct input tensor of the 10 int8 layers

    def outputs(bb):
        results, vmap = emit_main(bb, func, func.params)
        return [*results, *(vmap[v] for v in quantized)]

    probe = module_with_main(mod, func, outputs, as_tuple=True)
    rng = np.random.default_rng(0)
    images = fashion["images"]
    cases = [images, images[::-1] + rng.normal(0, 0.05, images.shape).astype(np.float32)]
    built, graph = _built_vm(probe), host_vm(probe)
    total = differ = 0
    for x in cases:
        a, b = _run(built, x), _run(graph, x)
        for u, v in zip(a[1:], b[1:]):
            assert u.dtype == np.uint8
            step = np.abs(u.astype(np.int32) - v.astype(np.int32))
            assert step.max() <= 1
            total, differ = total + step.size, differ + int(np.count_nonzero(step))
        np.testing.assert_allclose(a[0], b[0], atol=0.02 * np.abs(b[0]).max())
    assert differ <= 1e-4 * total
