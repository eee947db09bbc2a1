"""lower_qdq: models that arrive quantized (ONNX Runtime's ``quantize_static``, QDQ and
QOperator formats) import with integer convs / matmuls.

Structural: the imported graph (uint8 x int8 -> int32 convs and matmul holding the model's own
int8 weights, the zero-point pad, the depthwise conv left float with its reason) and the
legalized module's kernels. Numerical: the built module against ONNX Runtime within one
quantization step of the output, and ``hwcompress.compile`` verifying against it.

Which ONNX Runtime output is the reference: with full-range int8 weights, ORT's u8 x s8
kernels on x86 CPUs without VNNI (``vpmaddubsw``) saturate pairs of products in int16 and
miss the exact result by many steps (ORT recommends ``reduce_range`` there). So ORT's integer
kernels are compared on ``reduce_range=True`` models (7-bit weights: no saturation), and
full-range models against ORT running the QDQ graph at the basic optimization level, which
dequantizes and computes in float: the exact QDQ arithmetic up to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import pass_graphs as G
from model_builders import make_model

tvm = pytest.importorskip("tvm")
quantization = pytest.importorskip("onnxruntime.quantization")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

import hwcompress  # noqa: E402
from hwcompress import build as B  # noqa: E402
from hwcompress.api import import_model  # noqa: E402
from hwcompress.backends.cpu_schedule import CpuFacts  # noqa: E402
from hwcompress.frontend import import_onnx  # noqa: E402
from hwcompress.passes.quantize.qdq import lower_qdq, qdq_report  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

HOST = load_target("host")
INT8_DOT = CpuFacts.from_target(HOST.tvm_target()).int8_dot
SHAPE = (1, 3, 8, 8)
INTEGER = ["conv2d[0]", "conv2d[2]", "matmul[0]"]  # conv2d[1] is the depthwise conv


def _float_model(head: str):
    """Conv(bias) + Relu -> depthwise Conv + Relu -> Conv(bias, stride 2) -> Flatten -> Gemm(transB)
    or MatMul + Add (ORT's QOperator format makes contrib QGemm / QLinearAdd of the others)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["d1"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["d1"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"]),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("wd", 8, 1, 3, 3)]
    inits += [init("w2", 16, 8, 3, 3), init("b2", 16), init("bf", 10)]
    if head == "gemm":
        nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1))
        inits.append(init("wf", 10, 256, scale=0.05))
    else:
        nodes += [helper.make_node("MatMul", ["f", "wf"], ["mm"]), helper.make_node("Add", ["mm", "bf"], ["logits"])]
        inits.append(init("wf", 256, 10, scale=0.05))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, samples: int = 8):
        rng = np.random.default_rng(1)
        self._batches = iter([{"input": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(samples)])

    def get_next(self):
        return next(self._batches, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``quantized(format, activation="QUInt8", reduce_range=False, weight="QInt8")`` ->
    ModelProto (weights per channel except for uint8 ones), cached."""
    import onnx

    cache, tmp = {}, tmp_path_factory.mktemp("qdq")

    def make(fmt: str, activation: str = "QUInt8", reduce_range: bool = False, weight: str = "QInt8"):
        key = (fmt, activation, reduce_range, weight)
        if key not in cache:
            path = tmp / f"{'_'.join(map(str, key))}.onnx"
            quantization.quantize_static(
                _float_model("gemm" if fmt == "QDQ" else "matmul"), str(path), _Calibration(),
                quant_format=getattr(quantization.QuantFormat, fmt), per_channel=weight == "QInt8", reduce_range=reduce_range,
                activation_type=getattr(quantization.QuantType, activation), weight_type=getattr(quantization.QuantType, weight),
                op_types_to_quantize=["Conv", "MatMul", "Gemm"] if fmt == "QDQ" else ["Conv", "MatMul"],
            )  # fmt: skip
            cache[key] = onnx.load(str(path))
        return cache[key]

    return make


def _initializer(model, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _output_step(model) -> float:
    """The quantization step of the output: the scale of the last DequantizeLinear of an
    activation (not of a weight or bias initializer)."""
    inits = {t.name for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    return float(_initializer(model, dq[-1].input[1]))


def _calls(mod, op: str) -> list:
    values = [b.value for blk in mod["main"].body.blocks for b in blk.bindings]
    return [v for v in values if isinstance(v, relax.Call) and getattr(v.op, "name", "") == op]


def _built(mod):
    vm = relax.VirtualMachine(B.build(B.schedule(B.legalize(mod, HOST), HOST), HOST), tvm.cpu())
    return lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def _ort(model, level: str = "ORT_ENABLE_ALL"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _assert_within_one_step(got_fn, ref_fn, step: float, samples: int = 16):
    """Every output within one quantization step of the reference, and almost all equal."""
    rng = np.random.default_rng(2)
    errors = []
    for _ in range(samples):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        errors.append(np.abs(got_fn(x) - ref_fn(x)).ravel() / step)
    errors = np.concatenate(errors)
    assert errors.max() <= 1.01, f"outputs differ by up to {errors.max():.2f} quantization steps"
    assert (errors > 0.01).mean() <= 0.05, f"{(errors > 0.01).mean():.1%} of the outputs differ"


# ---------------------------------------------------------------------------- structure


def test_qdq_model_imports_integer_convs_and_matmul(quantized):
    """The imported QDQ graph: the int8 initializers of the model themselves as weights (the
    Gemm's transposed), uint8 x int8 -> int32, the conv reading the network input (zero point
    != 0) padded with that zero point and unpadded, the one reading ReLU (zero point 0) padding
    itself; the depthwise conv stays float, and the report says why."""
    model = quantized("QDQ")
    mod = import_onnx(model)
    report = qdq_report(mod)
    assert [layer["name"] for layer in report["layers"]] == INTEGER
    assert report["float_fallback"] == [{"name": "conv2d[1]", "reason": "groups=8 (grouped / depthwise conv: no integer kernel)"}]

    convs = [c for c in _calls(mod, "relax.nn.conv2d") if str(c.attrs.out_dtype) == "int32"]
    (matmul,) = _calls(mod, "relax.matmul")
    for call in (*convs, matmul):
        assert [str(a.ty.dtype) for a in call.args[:2]] == ["uint8", "int8"] and str(call.ty.dtype) == "int32"
    np.testing.assert_array_equal(convs[0].args[1].value.numpy(), _initializer(model, "w1_quantized"))
    np.testing.assert_array_equal(convs[1].args[1].value.numpy(), _initializer(model, "w2_quantized"))
    np.testing.assert_array_equal(matmul.args[1].value.numpy(), _initializer(model, "wf_quantized").T)

    (pad,) = _calls(mod, "relax.nn.pad")
    zero_point = int(_initializer(model, "input_zero_point"))
    assert zero_point != 0 and float(pad.attrs.pad_value) == zero_point == report["layers"][0]["input_zero_point"]
    assert [int(p) for p in convs[0].attrs.padding] == [0, 0, 0, 0] and [int(p) for p in convs[1].attrs.padding] == [1] * 4
    (float_conv,) = [c for c in _calls(mod, "relax.nn.conv2d") if str(c.ty.dtype) == "float32"]
    assert int(float_conv.attrs.groups) == 8


def test_a_float_model_is_left_alone(tiny_static_model):
    mod = import_onnx(tiny_static_model)
    lowered, report = lower_qdq(mod)
    assert lowered.same_as(mod) and not report.found and qdq_report(lowered) is None


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_legalized_kernels_are_integer(quantized, fmt):
    """After the host recipe (NHWC layout) and the backend's legalization: three integer
    kernels (the backend's tiled ones where the CPU has an int8 dot instruction), one float
    (the depthwise conv)."""
    front = import_model(quantized(fmt), HOST)
    assert [layer["name"] for layer in qdq_report(front.mod)["layers"]] == INTEGER
    kernels = G.mac_kernels(B.legalize(front.mod, HOST))
    assert sorted(k["integer"] for k in kernels) == [False, True, True, True], kernels
    if INT8_DOT is not None:
        assert all(k["tiled"] for k in kernels if k["integer"])


def test_asymmetric_uint8_weights_stay_float(quantized):
    """Per-tensor uint8 weights with a zero point far from 128 have no int8 form: reported."""
    model = quantized("QDQ", weight="QUInt8")
    zero_points = [int(_initializer(model, f"{w}_zero_point")) for w in ("w1", "w2", "wf")]
    assert all(abs(z - 128) > 1 for z in zero_points), zero_points  # else the test proves nothing
    report = qdq_report(import_onnx(model))
    assert report["layers"] == []
    assert {f["name"]: f["reason"] for f in report["float_fallback"]} == {
        "conv2d[0]": "uint8 weight minus its zero point does not fit int8",
        "conv2d[1]": "groups=8 (grouped / depthwise conv: no integer kernel)",
        "conv2d[2]": "uint8 weight minus its zero point does not fit int8",
        "matmul[0]": "uint8 weight minus its zero point does not fit int8",
    }


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_matches_onnxruntime_integer_kernels(quantized, fmt):
    """7-bit weights (``reduce_range``): ORT's own int8 kernels are exact, and so are ours."""
    model = quantized(fmt, reduce_range=True)
    _assert_within_one_step(_built(import_model(model, HOST).mod), _ort(model), _output_step(model))


@pytest.mark.parametrize("activation", ["QUInt8", "QInt8"])
def test_full_range_matches_the_qdq_arithmetic(quantized, activation):
    """Full-range int8 weights, uint8 or int8 activations (int8 ones shifted to uint8) against
    the QDQ graph as ORT computes it in float."""
    model = quantized("QDQ", activation)
    front = import_model(model, HOST)
    dtypes = {layer["input_dtype"] for layer in qdq_report(front.mod)["layers"]}
    assert dtypes == {"uint8" if activation == "QUInt8" else "int8 (shifted to uint8)"}
    _assert_within_one_step(_built(front.mod), _ort(model, "ORT_ENABLE_BASIC"), _output_step(model))


def test_compile_verifies_against_onnxruntime(quantized, tmp_path):
    """``hwc build quantized.onnx``: integer kernels, verified against ONNX Runtime with the
    default tolerance, the imported quantization in the manifest."""
    model = quantized("QDQ")
    artifact = hwcompress.compile(model, "host", out=tmp_path / "art")
    verification = artifact.manifest["verification"]
    assert verification["status"] == "passed" and verification["reference"] == "onnxruntime"
    assert max(c["max_abs_err"] for c in verification["cases"]) < _output_step(model)
    assert [layer["name"] for layer in artifact.manifest["imported_quantization"]["layers"]] == INTEGER
    if INT8_DOT is not None:
        kernels = artifact.manifest["kernels"]["default_schedule"]
        assert sum("int8" in k for k in kernels) == 3, kernels


def test_qoperator_model_verifies_against_its_qdq_form(quantized, tmp_path):
    """A full-range QOperator model: ONNX Runtime's own QLinearConv kernels saturate on AVX2
    without VNNI, so the artifact is checked against ONNX Runtime running the model's QDQ form
    (exact arithmetic), and the manifest says so."""
    model = quantized("QOperator")
    artifact = hwcompress.compile(model, "host", out=tmp_path / "art")
    verification = artifact.manifest["verification"]
    assert verification["status"] == "passed"
    assert verification["reference"] == "onnxruntime (QOperator ops run as their QDQ form)"
    assert max(c["max_abs_err"] for c in verification["cases"]) < _output_step(model)


# ---------------------------------------------------------------------------- conv layout (NHWC)


def _chain_model():
    """Conv(bias) -> Conv(bias) -> Relu -> Flatten -> Gemm: the second conv's input has no ReLU,
    hence a zero point, so it reads a zero-point pad inside the graph (not at the input)."""
    rng = np.random.default_rng(3)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 8, 3, 3), init("b2", 8)]
    inits += [init("wf", 10, 512, scale=0.05), init("bf", 10)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)


@pytest.fixture(scope="module")
def quantized_chain(tmp_path_factory):
    """``_chain_model`` through ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations)."""
    import onnx

    path = tmp_path_factory.mktemp("qdq_chain") / "chain.onnx"
    quantization.quantize_static(
        _chain_model(), str(path), _Calibration(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )  # fmt: skip
    return onnx.load(str(path))


def _neighbours(mod):
    """``{var: call}`` of ``main``'s op calls and ``{var: [calls reading it]}``."""
    values, readers = {}, {}
    for blk in mod["main"].body.blocks:
        for b in blk.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                values[b.var] = b.value
                for arg in b.value.args:
                    readers.setdefault(arg, []).append(b.value)
    return values, readers


def _upstream_ops(call, values) -> set:
    """Every op ``call`` depends on (not itself), back to the function's inputs and constants."""
    seen, stack = set(), list(call.args)
    while stack:
        value = values.get(stack.pop())
        if value is not None:
            seen.add(value.op.name)
            stack.extend(value.args)
    return seen


@pytest.mark.parametrize("graph", ["qdq", "chain"])
def test_integer_convs_take_no_transposes_in_nhwc(quantized, quantized_chain, graph):
    """The host's NHWC layout step on an imported QDQ model: every integer conv NHWC / OHWI,
    reading its (padded) uint8 input and handing its int32 sums to a ``dequantize`` along
    axis 3 (the channel axis moved with the layout) without a transpose in between. Two
    transposes are left, as in a float model: after the input's quantize (+ pad) and before
    the flatten. ``chain``: the zero-point pad inside the graph is NHWC too."""
    model = quantized("QDQ") if graph == "qdq" else quantized_chain
    mod = import_model(model, HOST).mod
    values, readers = _neighbours(mod)
    convs = [c for c in _calls(mod, "relax.nn.conv2d") if str(c.attrs.out_dtype) == "int32"]
    assert len(convs) == 2
    for conv in convs:
        assert (str(conv.attrs.data_layout), str(conv.attrs.kernel_layout)) == ("NHWC", "OHWI")
        data = values[conv.args[0]]
        if data.op.name == "relax.nn.pad":
            data = values.get(data.args[0], data)
        if data.op.name == "relax.permute_dims":  # only the edge one: the network input's uint8 form
            assert _upstream_ops(data, values) <= {"relax.quantize", "relax.nn.pad", "relax.astype", "relax.add"}
        var = next(v for v, c in values.items() if c.same_as(conv))
        (dq,) = readers[var]
        assert dq.op.name == "relax.dequantize" and int(dq.attrs.axis) == 3
    assert len(_calls(mod, "relax.permute_dims")) == 2
    pads = _calls(mod, "relax.nn.pad")
    if graph == "chain":
        assert [[int(w) for w in p.attrs.pad_width] for p in pads][1] == [0, 0, 1, 1, 1, 1, 0, 0]
        assert float(pads[1].attrs.pad_value) != 0
    # nothing between a conv and its requantization: FuseOps puts it into the kernel's epilogue
    kernels = G.mac_kernels(B.legalize(mod, HOST))
    assert sum(k["integer"] for k in kernels) == 3, kernels
    assert all("dequantize" in k["kernel"] for k in kernels if k["integer"]), kernels


def test_nhwc_build_is_bit_exact(quantized_chain):
    """NHWC (the host's layout, no transposes around the integer convs) and NCHW (no layout
    step) builds of an all-integer QDQ model give the same bits, and match ONNX Runtime."""
    from hwcompress.optimize import Optimize

    model = quantized_chain
    nhwc = _built(import_model(model, HOST).mod)
    nchw = _built(import_model(model, HOST, optimize=Optimize(layout="NCHW")).mod)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        np.testing.assert_array_equal(nhwc(x), nchw(x))
    _assert_within_one_step(nhwc, _ort(model, "ORT_ENABLE_BASIC"), _output_step(model), samples=8)
