"""`hwc build --target npu-stub --int8`: the MNIST-CNN-shaped model built with its int8 layers on
the simulated NPU, verified against the int8 graph on the host; artifact round trip, offload
report, `hwc inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import make_model

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(3)


def _mnist_like():
    """The digits CNN's layer types at a smaller size: 3 x (conv3x3-relu-maxpool), flatten
    (NCHW order), dense-relu, dense (logits)."""
    def init(name, *shape, scale):
        return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)

    nodes, inits, x = [], [], "input"
    for i, (cin, cout) in enumerate([(1, 8), (8, 16), (16, 32)]):
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
                  helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2])]
        inits += [init(f"w{i}", cout, cin, 3, 3, scale=(2 / (9 * cin)) ** 0.5), init(f"b{i}", cout, scale=0.05)]
        x = f"p{i}"
    nodes += [helper.make_node("Flatten", [x], ["f"]),
              helper.make_node("Gemm", ["f", "wd", "bd"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("Gemm", ["hr", "wo", "bo"], ["logits"], transB=1)]
    inits += [init("wd", 24, 32 * 3 * 3, scale=0.08), init("bd", 24, scale=0.05), init("wo", 10, 24, scale=0.3),
              init("bo", 10, scale=0.05)]
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 1, 28, 28])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 10])], inits)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import hwcompress
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe

    tmp = tmp_path_factory.mktemp("npu")
    model = tmp / "mnist_like.onnx"
    model.write_bytes(_mnist_like().SerializeToString())
    calib = tmp / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", RNG.standard_normal((16, 1, 28, 28)).astype(np.float32))
    art = hwcompress.compile(str(model), "npu-stub", tmp / "artifact", recipe=Recipe((Int8Static(data=str(calib)),)))
    return model, calib, art


def test_build_verifies_against_the_int8_graph(built):
    _, _, art = built
    v = art.manifest["verification"]
    assert v["status"] == "passed" and v["reference"].startswith("compressed graph")
    assert v["cases"][0]["max_abs_err"] <= v["cases"][0]["atol"]  # NPU_TOLERANCE x largest logit


def test_artifact_round_trip_runs_the_simulator(built):
    """``hwcompress.load`` + run gives what the build verified: the same module.so, the NPU
    simulator inside it, against the int8 graph run on the host."""
    import hwcompress
    from hwcompress.api import import_model
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe
    from hwcompress.targets import load_target
    from hwcompress.verify import graph_reference, random_inputs

    model, calib, art = built
    loaded = hwcompress.load(art.path)
    x = random_inputs(loaded.manifest["inputs"], seed=0)  # the build's verification inputs
    out = loaded.run(x)[0]
    np.testing.assert_array_equal(out, art.run(x)[0])
    # calibration is deterministic: the same int8 graph as the build's reference
    int8 = import_model(str(model), load_target("npu-stub"),
                        recipe=Recipe((Int8Static(data=str(calib)),))).mod
    err = float(np.abs(out - graph_reference(int8)(x)[0]).max())
    assert err == pytest.approx(loaded.manifest["verification"]["cases"][0]["max_abs_err"], abs=1e-6)


def test_offload_report(built):
    _, _, art = built
    off = art.manifest["offload"]
    assert off["ops"]["conv2d"] == {"npu": 3, "host": 0}
    assert off["ops"]["max_pool2d"] == {"npu": 3, "host": 0}
    assert off["ops"]["relu"] == {"npu": 4, "host": 0}  # 3 conv + 1 dense, fused as clamps
    dense = off["ops"]["dense"]
    assert dense["npu"] == 1 and dense["host"] == 1  # the logits: float output, host
    assert "no quantize follows it" in dense["host_reasons"][0]["reason"]
    assert 0.95 < off["flops_share"] <= 1.0 and off["flops_npu"] <= off["flops_total"]
    assert off["cycles"] == sum(p["cycles"] for p in off["programs"]) > 0
    assert len(off["programs"]) == 1 and off["programs"][0]["commands"] == 7  # 3 x (conv + pool) + dense
    assert off["pow2_scales"] is True
    assert "power-of-two" in art.manifest["quantization"]["scheme"]


def test_hwc_inspect_shows_offload(built, capsys):
    from hwcompress.cli import main

    _, _, art = built
    assert main(["inspect", str(art.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["offload"]["ops"]["conv2d"]["npu"] == 3 and "flops" in data
    assert main(["inspect", str(art.path)]) == 0
    text = capsys.readouterr().out
    assert "NPU offload:" in text and "estimated" in text and "host" in text


def test_cli_build_for_npu_stub(built, tmp_path):
    from hwcompress.cli import main

    model, calib, _ = built
    out = tmp_path / "cli_artifact"
    assert main(["build", str(model), "--target", "npu-stub", "--int8", "--calib", str(calib), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["offload"]["ops"]["conv2d"]["npu"] == 3
    assert manifest["verification"]["status"] == "passed"


def test_float_build_for_npu_stub_keeps_everything_on_the_host(built, tmp_path):
    """Without --int8 nothing is int8: the NPU gets nothing, and the report says why."""
    import hwcompress

    model, _, _ = built
    art = hwcompress.compile(str(model), "npu-stub", tmp_path / "float")
    off = art.manifest["offload"]
    assert off["flops_npu"] == 0 and off["cycles"] == 0 and off["ops"]["conv2d"]["npu"] == 0
    assert "not quantized" in off["ops"]["conv2d"]["host_reasons"][0]["reason"]
