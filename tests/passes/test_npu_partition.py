"""NPU partitioning of int8 graphs (``codegen/npu/partition.py``): where the regions start and
end, what stays on the host and why, and the offloaded module against the int8 graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import make_model

tvm = pytest.importorskip("tvm")
relax = tvm.relax

RNG = np.random.default_rng(8)
# int8 tolerance of a build (api.INT8_TOLERANCE): NPU and host round biases / ties differently
TOL = 2e-2


def _mixed_model(c_in: int = 4):
    """conv-relu -> conv-relu -> Sigmoid -> conv-relu -> conv-relu -> maxpool -> conv (logits):
    a sigmoid the NPU lacks in the middle."""
    def conv(i, x, y, cin, cout):
        w = numpy_helper.from_array((RNG.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array((RNG.standard_normal(cout) * 0.1).astype(np.float32), f"b{i}")
        return [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[1, 1, 1, 1])], [w, b]

    nodes, inits = [], []
    chain = [("input", "c1", c_in, 16, "Relu"), ("r1", "c2", 16, 16, "Sigmoid"), ("r2", "c3", 16, 16, "Relu"),
             ("r3", "c4", 16, 32, "Relu")]
    for i, (x, y, cin, cout, act) in enumerate(chain, 1):
        n, w = conv(i, x, y, cin, cout)
        nodes += n + [helper.make_node(act, [y], [f"r{i}"])]
        inits += w
    nodes.append(helper.make_node("MaxPool", ["r4"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]))
    n, w = conv(5, "p4", "out", 32, 16)
    return make_model(nodes + n, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c_in, 8, 8])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 4, 4])], inits + w)


def _int8_graph(model, spec):
    from hwcompress.api import import_model
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = RNG.standard_normal((16, *shape[1:])).astype(np.float32)
    return import_model(model, spec, {"input": shape}, recipe=Recipe((Int8Static(data=calib),))).mod


@pytest.fixture(scope="module")
def spec():
    from hwcompress.targets import load_target

    return load_target("npu-stub")


@pytest.fixture(scope="module")
def mixed(spec):
    from hwcompress.codegen.npu.offload import offload

    mod = _int8_graph(_mixed_model(), spec)
    return mod, offload(mod, spec)


def _npu_calls(mod) -> list[str]:
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            calls.append(str(e.args[0].global_symbol))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return calls


def _host_ops(mod) -> list[str]:
    return [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]


def test_sigmoid_splits_the_graph_into_two_npu_regions(mixed):
    from hwcompress.codegen.npu.offload import offload_report

    _, out = mixed
    assert len(_npu_calls(out)) == 2  # conv1 | conv3 + conv4 + maxpool
    host = _host_ops(out)
    assert "relax.sigmoid" in host
    assert host.count("relax.nn.conv2d") == 2  # conv2 (its output goes to the sigmoid), conv5 (logits)
    report = offload_report(out)
    assert report["ops"]["conv2d"]["npu"] == 3 and report["ops"]["conv2d"]["host"] == 2
    assert report["ops"]["max_pool2d"] == {"npu": 1, "host": 0}
    reasons = {h["name"]: h["reason"] for h in report["ops"]["conv2d"]["host_reasons"]}
    assert any("sigmoid" in r for r in reasons.values()), reasons
    assert any("no quantize follows it" in r for r in reasons.values()), reasons
    assert "not in the target's [npu].supported_ops" in report["ops"]["sigmoid"]["host_reasons"][0]["reason"]
    assert 0.3 < report["flops_share"] < 1 and report["cycles"] > 0
    assert [p["commands"] for p in report["programs"]] in ([1, 3], [3, 1])


def test_npu_boundaries_are_int8(mixed):
    """Every NPU call reads and writes int8; the host shifts uint8 <-> int8 around it."""
    _, out = mixed
    for blk in out["main"].body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_dps_packed":
                assert all(str(a.ty.dtype) == "int8" for a in v.args[1].fields)
                assert str(b.var.ty.dtype) == "int8"


def test_offloaded_module_matches_the_int8_graph(mixed, spec):
    from hwcompress.verify import graph_reference, random_inputs

    mod, out = mixed
    vm = relax.VirtualMachine(tvm.compile(out, spec.tvm_target()), tvm.cpu())
    ref = graph_reference(mod)
    for seed in range(3):
        (x,) = random_inputs([{"shape": [1, 4, 8, 8], "dtype": "float32"}], seed=seed)
        got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), ref([x])[0]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_in_channel_constraint_keeps_a_conv_on_the_host_when_hard(spec):
    """3 input channels: not a multiple of in_channel_multiple = 4. npu-stub pays idle lanes
    for it (cost model); a target with strict_channels runs the conv on the host."""
    from hwcompress.codegen.npu.offload import offload, offload_report

    mod = _int8_graph(_mixed_model(c_in=3), spec)
    lenient = offload_report(offload(mod, spec))
    assert lenient["ops"]["conv2d"]["npu"] == 3
    strict = dataclasses.replace(spec, npu=dataclasses.replace(spec.npu, strict_channels=True))
    report = offload_report(offload(mod, strict))
    assert report["ops"]["conv2d"]["npu"] == 2
    reasons = [h["reason"] for h in report["ops"]["conv2d"]["host_reasons"] if h["name"] == "acc"]
    assert reasons and "not multiples of 4" in reasons[0]


def test_target_without_the_op_keeps_it_on_the_host(spec):
    from hwcompress.codegen.npu.offload import offload, offload_report

    mod = _int8_graph(_mixed_model(), spec)
    no_pool = dataclasses.replace(spec, npu=dataclasses.replace(
        spec.npu, supported_ops=tuple(o for o in spec.npu.supported_ops if o != "max_pool2d")))
    report = offload_report(offload(mod, no_pool))
    assert report["ops"]["max_pool2d"] == {"npu": 0, "host": 1, "host_reasons": report["ops"]["max_pool2d"]["host_reasons"]}
    assert report["ops"]["conv2d"]["npu"] == 2  # conv4 feeds the pool: host now


def test_pow2_target_quantizes_with_power_of_two_scales(spec):
    from hwcompress.passes.quantize import int8_report

    layers = int8_report(_int8_graph(_mixed_model(), spec))["layers"]
    scales = np.array([layer["input_scale"] for layer in layers])
    np.testing.assert_array_equal(np.log2(scales), np.round(np.log2(scales)))


def test_pow2_scale_rounds_up():
    from hwcompress.passes.quantize.int8 import pow2_qparams, pow2_scale
    from hwcompress.passes.quantize.observers import asymmetric_qparams

    np.testing.assert_array_equal(pow2_scale([0.3, 0.25, 1e-3]), np.float32([0.5, 0.25, 2.0**-9]))
    qp = pow2_qparams(asymmetric_qparams(-1.0, 3.0))
    assert qp.scale == 2.0**-5 and qp.zero_point == 32  # -1.0 stays exact, 3.0 inside the range
