import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import make_model
from hwcompress import analysis, import_onnx


def test_conv_and_gemm_counts(tiny_static_model):
    s = analysis.summarize(import_onnx(tiny_static_model))
    convs = [layer for layer in s.layers if layer.op == "nn.conv2d"]
    assert len(convs) == 2
    # conv1: 8 out ch x 16x16 outputs x (3 in ch x 3x3) MACs, x2 for FLOPs
    assert convs[0].flops == 2 * 8 * 16 * 16 * 27 and convs[0].params == 8 * 27
    # conv2: stride 2 -> 8x8 outputs, 16 out ch, 8x3x3 MACs each
    assert convs[1].flops == 2 * 16 * 8 * 8 * 72 and convs[1].params == 16 * 72
    gemm_flops = sum(layer.flops for layer in s.layers if layer.op in ("matmul", "nn.dense", "linear"))
    assert gemm_flops == 2 * 10 * 16
    assert s.params == 8 * 27 + 8 + 16 * 72 + 10 * 16 + 10
    # conv1 reads 3x16x16 input + 8x27 weights and writes 8x16x16, all float32
    assert convs[0].bytes == 4 * (3 * 16 * 16 + 8 * 27 + 8 * 16 * 16)
    assert s.flops == sum(layer.flops for layer in s.layers)


def test_depthwise_counts_per_group():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])],
        [w],
    )
    (layer,) = analysis.summarize(import_onnx(model)).layers
    assert layer.flops == 2 * 8 * 10 * 10 * 9 and layer.params == 72


def test_table_and_dict(tiny_static_model):
    s = analysis.summarize(import_onnx(tiny_static_model))
    table = analysis.format_table(s)
    assert "total" in table and "nn.conv2d" in table
    d = s.to_dict()
    assert {"params", "flops", "bytes", "layers"} <= set(d) and len(d["layers"]) == len(s.layers)
