"""The normalization rewrites on small hand-built graphs: the op types after ``prepare_onnx``
(structural) and the built module against ONNX Runtime on the original graph (numerical)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from hwcompress.errors import ShapeError, UnsupportedOpError
from hwcompress.frontend import prepare_onnx

# Float outputs: the built kernels sum in another order than ONNX Runtime.
RTOL, ATOL = 1e-4, 1e-5


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def vo(name, elem, rank):
    """A graph output of known rank (ONNX's checker wants a shape; its dims are left symbolic)."""
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_requantized_close(got: np.ndarray, ref: np.ndarray) -> None:
    """Requantized outputs: float math on dequantized values may round a value lying within
    float32 error of a .5 tie the other way than the integer reference, so off-by-one is
    allowed, on at most 1% of the elements."""
    diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= max(1, diff.size // 100)


# --- QOperator ops -> QDQ --------------------------------------------------------------------


# ONNX Runtime's u8 x s8 kernels on x86 without VNNI add pairs of products in int16 and
# saturate on full-range weights; 7-bit weights (as its quantizer's reduce_range makes) keep
# the reference exact.
def qlinear_conv_model(make_model, rng, opset, per_channel, bias):
    w = rng.integers(-63, 64, (4, 3, 3, 3), dtype=np.int8)
    w_scale = np.float32([0.01, 0.02, 0.015, 0.03]) if per_channel else np.float32(0.02)
    inits = [init("xs", np.float32(0.05)), init("xz", np.uint8(128)), init("w", w), init("ws", w_scale),
             init("wz", np.zeros(np.shape(w_scale), np.int8)), init("ys", np.float32(0.2)), init("yz", np.uint8(100))]
    inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias:
        inits.append(init("b", rng.integers(-2000, 2000, (4,), dtype=np.int32)))
        inputs.append("b")
    node = helper.make_node("QLinearConv", inputs, ["y"], name="qconv", pads=[1, 1, 1, 1], strides=[2, 2])
    return make_model([node], [vi("x", T.UINT8, [1, 3, 9, 9])], [vo("y", T.UINT8, 4)], inits, opset)


@pytest.mark.parametrize("opset,per_channel,bias", [(10, False, True), (10, True, True), (13, True, False), (13, True, True)])
def test_qlinear_conv(make_model, run_ort, run_host, rng, opset, per_channel, bias):
    model = qlinear_conv_model(make_model, rng, opset, per_channel, bias)
    prepared = prepare_onnx(model)
    assert "QLinearConv" not in op_types(prepared)
    assert {"DequantizeLinear", "Conv", "QuantizeLinear"} <= set(op_types(prepared))
    x = rng.integers(0, 256, (1, 3, 9, 9), dtype=np.uint8)
    (ref,) = run_ort(model, {"x": x})
    (got,) = run_host(model, [x])
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert_requantized_close(got, ref)
    # The prepared graph stays a valid reference. (ONNX Runtime's full-level optimizer breaks
    # opset-10 DQ -> Conv -> Q graphs with float weights: it inserts a Round, which opset 10
    # lacks; the basic level is what normalization itself uses.)
    (prep_ref,) = run_ort(prepared, {"x": x}, basic=True)
    assert_requantized_close(prep_ref, ref)


@pytest.mark.parametrize("per_column", [False, True])
def test_qlinear_matmul(make_model, run_ort, run_host, rng, per_column):
    b_scale = np.float32([0.01, 0.02, 0.03, 0.04, 0.05]) if per_column else np.float32(0.02)
    inits = [init("as", np.float32(0.03)), init("az", np.uint8(120)),
             init("b", rng.integers(-63, 64, (8, 5), dtype=np.int8)), init("bs", b_scale),
             init("bz", np.zeros(np.shape(b_scale), np.int8)), init("ys", np.float32(0.5)), init("yz", np.uint8(128))]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"], name="qmm")
    model = make_model([node], [vi("a", T.UINT8, [2, 3, 8])], [vo("y", T.UINT8, 3)], inits, opset=13)
    prepared = prepare_onnx(model)
    assert op_types(prepared).count("MatMul") == 1 and "QLinearMatMul" not in op_types(prepared)
    a = rng.integers(0, 256, (2, 3, 8), dtype=np.uint8)
    (ref,) = run_ort(model, {"a": a})
    (got,) = run_host(model, [a])
    assert_requantized_close(got, ref)


def conv_int_reference(x, w, x_zero, w_zero, pad):
    """Integer NCHW convolution (stride 1) in int64, the ConvInteger definition."""
    xi = np.pad(x.astype(np.int64) - x_zero, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    wi = w.astype(np.int64) - np.reshape(w_zero, (-1, 1, 1, 1))
    kh, kw = w.shape[2:]
    oh, ow = xi.shape[2] - kh + 1, xi.shape[3] - kw + 1
    windows = np.lib.stride_tricks.sliding_window_view(xi, (kh, kw), axis=(2, 3))[:, :, :oh, :ow]
    return np.einsum("nchwij,fcij->nfhw", windows, wi).astype(np.int32)


@pytest.mark.parametrize("zero_points", ["none", "scalar", "per_channel"])
def test_conv_integer_exact(make_model, run_host, rng, zero_points):
    w = rng.integers(0, 256, (4, 2, 3, 3), dtype=np.uint8)
    inits = [init("w", w)]
    inputs = ["x", "w"]
    x_z, w_z = np.uint8(0), np.uint8(0)
    if zero_points != "none":
        x_z = np.uint8(17)
        w_z = np.uint8([3, 7, 0, 250]) if zero_points == "per_channel" else np.uint8(128)
        inits += [init("xz", x_z), init("wz", w_z)]
        inputs += ["xz", "wz"]
    node = helper.make_node("ConvInteger", inputs, ["y"], name="cint", pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", T.UINT8, [1, 2, 6, 6])], [vo("y", T.INT32, 4)], inits, opset=13)
    prepared = prepare_onnx(model)
    assert op_types(prepared)[-2:] == ["Conv", "Cast"]
    x = rng.integers(0, 256, (1, 2, 6, 6), dtype=np.uint8)
    (got,) = run_host(model, [x])
    # K = 2 * 3 * 3 = 18 terms: float32 sums of these integer products are exact. (The
    # reference is numpy: ONNX Runtime's ConvInteger has no per-channel weight zero points.)
    np.testing.assert_array_equal(got, conv_int_reference(x, w, x_z, w_z, pad=1))


# --- Resize by scales ------------------------------------------------------------------------


def resize_model(make_model, shape, scales, mode, coord, exclude_outside=0):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode=mode,
                            coordinate_transformation_mode=coord, exclude_outside=exclude_outside)
    return make_model([node], [vi("x", T.FLOAT, shape)], [vo("y", T.FLOAT, len(shape))],
                      [init("scales", np.float32(scales))], opset=13)


@pytest.mark.parametrize(
    "scales,mode,coord",
    [
        ([1, 1, 0.6, 0.6], "linear", "half_pixel"),  # TVM's size ratio (0.5) differs from 0.6
        ([1, 1, 0.6, 0.7], "cubic", "asymmetric"),
        ([1, 1, 1.7, 1.5], "linear", "half_pixel"),  # upsampling: coordinates below 0, edge-padded
        ([1, 1, 1.7, 2.0], "cubic", "pytorch_half_pixel"),
        ([1, 1, 0.3, 0.8], "linear", "pytorch_half_pixel"),
        ([1, 1, 2.0, 3.0], "nearest", "asymmetric"),  # integral: sizes only
        ([1, 1, 0.8, 0.8], "cubic", "half_pixel"),
    ],
)
def test_resize_scales(make_model, run_ort, run_host, rng, scales, mode, coord):
    model = resize_model(make_model, [1, 2, 5, 7], scales, mode, coord)
    prepared = prepare_onnx(model)
    for node in prepared.graph.node:
        if node.op_type == "Resize":
            assert node.input[2] == "" and node.input[3], "Resize must be given sizes, not scales"
    x = rng.standard_normal((1, 2, 5, 7)).astype(np.float32)
    (ref,) = run_ort(model, {"x": x})
    (got,) = run_host(model, [x])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    (prep_ref,) = run_ort(prepared, {"x": x})  # the prepared graph stays a valid reference
    np.testing.assert_allclose(prep_ref, ref, rtol=RTOL, atol=ATOL)


def test_resize_integral_scales_stay_plain(make_model):
    prepared = prepare_onnx(resize_model(make_model, [1, 1, 4, 4], [1, 1, 2, 2], "linear", "half_pixel"))
    (resize,) = [n for n in prepared.graph.node if n.op_type == "Resize"]
    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["coordinate_transformation_mode"] == b"half_pixel"
    assert op_types(prepared) == ["Resize"]


# --- ConvTranspose, MaxPool indices, Split, PRelu ----------------------------------------------


# ONNX Runtime splits an odd total padding the other way round than the spec and ONNX's
# reference (which the rewrite follows); these cases have an even total or a total of -1.
@pytest.mark.parametrize(
    "strides,output_shape,auto_pad",
    [([3, 2], [10, 8], "NOTSET"), ([2, 2], [5, 5], "SAME_UPPER"), ([2, 3], [5, 9], "NOTSET")],
)
def test_conv_transpose_output_shape(make_model, run_ort, run_host, rng, strides, output_shape, auto_pad):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=strides,
                            output_shape=output_shape, auto_pad=auto_pad)
    w = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    model = make_model([node], [vi("x", T.FLOAT, [1, 1, 3, 3])], [vo("y", T.FLOAT, 4)], [init("w", w)])
    (deconv,) = prepare_onnx(model).graph.node
    assert {a.name for a in deconv.attribute} >= {"pads", "output_padding"}
    assert "output_shape" not in {a.name for a in deconv.attribute}
    x = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    (ref,) = run_ort(model, {"x": x})
    (got,) = run_host(model, [x])
    assert got.shape == ref.shape == (1, 2, *output_shape)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "attrs",
    [
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        dict(kernel_shape=[2, 3], strides=[2, 1], ceil_mode=1),
        dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 1, 2, 2]),
        dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
        dict(kernel_shape=[2, 2], strides=[2, 2], storage_order=1),
    ],
)
def test_maxpool_indices(make_model, run_ort, run_host, rng, attrs):
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], name="pool", **attrs)
    model = make_model([node], [vi("x", T.FLOAT, [2, 3, 7, 6])], [vo("y", T.FLOAT, 4), vo("i", T.INT64, 4)])
    prepared = prepare_onnx(model)
    assert "MaxPool" not in op_types(prepared) and "Where" in op_types(prepared)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    x[0, 0, :2, :2] = 1.5  # ties: the first in window order wins
    ref = run_ort(model, {"x": x})
    got = run_host(model, [x])
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_split_zero_size(make_model, run_ort, run_host, rng):
    node = helper.make_node("Split", ["x", "split"], ["a", "b", "c"], name="split", axis=1)
    outs = [vo(n, T.FLOAT, 2) for n in "abc"]
    model = make_model([node], [vi("x", T.FLOAT, [2, 5])], outs, [init("split", np.int64([0, 5, 0]))])
    assert op_types(prepare_onnx(model)) == ["Slice", "Slice", "Slice"]
    x = rng.standard_normal((2, 5)).astype(np.float32)
    ref = run_ort(model, {"x": x})
    got = run_host(model, [x])
    assert [g.shape for g in got] == [r.shape for r in ref] == [(2, 0), (2, 5), (2, 0)]
    np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("slope_shape", [(4, 1, 1), (1, 4, 1, 1), (5,)])
def test_prelu_per_channel(make_model, run_ort, run_host, rng, slope_shape):
    """TVM 0.27's PRelu converter broadcasts per-channel slopes correctly: no rewrite needed."""
    slope = rng.uniform(0.05, 0.5, slope_shape).astype(np.float32)
    node = helper.make_node("PRelu", ["x", "slope"], ["y"], name="prelu")
    model = make_model([node], [vi("x", T.FLOAT, [2, 4, 3, 5])], [vo("y", T.FLOAT, 4)], [init("slope", slope)])
    x = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    (ref,) = run_ort(model, {"x": x})
    (got,) = run_host(model, [x])
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


# --- exported-model patterns and errors ------------------------------------------------------


def test_shape_subgraph_reshape_is_static(make_model, run_ort, run_host, rng):
    """Reshape whose shape is Shape -> Gather -> Concat of the input (a flatten as exporters
    write it) becomes a constant shape at the fixed input shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus_one"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="reshape"),
    ]
    inits = [init("zero", np.int64(0)), init("axes0", np.int64([0])), init("minus_one", np.int64([-1]))]
    model = make_model(nodes, [vi("x", T.FLOAT, ["N", 3, 4, 4])], [vo("y", T.FLOAT, 2)], inits)
    prepared = prepare_onnx(model, {"x": (2, 3, 4, 4)})
    assert op_types(prepared) == ["Reshape"]
    shape_input = prepared.graph.node[0].input[1]
    assert shape_input in {t.name for t in prepared.graph.initializer}
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    (got,) = run_host(prepared, [x])
    np.testing.assert_array_equal(got, x.reshape(2, -1))


def test_unsupported_ops_listed_in_one_error(make_model):
    nodes = [
        helper.make_node("Celu", ["x"], ["c1"], name="celu_a"),
        helper.make_node("Celu", ["c1"], ["c2"], name="celu_b"),
        helper.make_node("Det", ["c2"], ["y"], name="det_1"),
    ]
    model = make_model(nodes, [vi("x", T.FLOAT, [2, 3, 3])], [vo("y", T.FLOAT, 1)])
    with pytest.raises(UnsupportedOpError) as err:
        prepare_onnx(model)
    message = str(err.value)
    assert "\n" not in message
    assert "Celu (nodes: celu_a, celu_b)" in message
    assert "Det (node: det_1)" in message


def test_rewritten_ops_count_as_supported(make_model, rng):
    from hwcompress.frontend.importer import check_supported

    check_supported(qlinear_conv_model(make_model, rng, 13, True, True))  # raises nothing


def test_dynamic_dim_without_shape_is_a_shape_error(make_model):
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = make_model([node], [vi("x", T.FLOAT, ["batch", 3, 8, 8])], [vo("y", T.FLOAT, 4)])
    with pytest.raises(ShapeError, match=r"input 'x' axis 0 is dynamic \('batch'\)"):
        prepare_onnx(model)


def test_initializers_listed_as_inputs_are_constants(make_model):
    """IR 3 exports list weights as graph inputs too; they are folded like initializers."""
    nodes = [helper.make_node("Add", ["w", "one"], ["w1"], name="add"), helper.make_node("Mul", ["x", "w1"], ["y"], name="mul")]
    inputs = [vi("x", T.FLOAT, [4]), vi("w", T.FLOAT, [4]), vi("one", T.FLOAT, [])]
    model = make_model(nodes, inputs, [vo("y", T.FLOAT, 1)], [init("w", np.float32([1, 2, 3, 4])), init("one", np.float32(1))])
    prepared = prepare_onnx(model)
    assert [i.name for i in prepared.graph.input] == ["x"]
    assert op_types(prepared) == ["Mul"]
