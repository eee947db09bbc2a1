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
    # its own generator: the same calibration (so the same int8 graph) whichever tests ran before
    calib = np.random.default_rng(9).standard_normal((16, *shape[1:])).astype(np.float32)
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


def _residual_model(c: int = 16):
    """conv-relu (stem) -> conv-relu -> conv -> add(stem output) -> relu -> 1x1 conv (logits):
    one ResNet basic block with an identity skip."""
    rng = np.random.default_rng(11)  # the same weights whichever tests ran before

    def conv(i, x, y, cin, cout, k=3):
        w = (rng.standard_normal((cout, cin, k, k)) * (2 / (k * k * cin)) ** 0.5).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        return (helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[k // 2] * 4),
                [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")])

    nodes, inits = [], []
    for i, (x, y, cin, cout, k) in enumerate([("input", "c1", 4, c, 3), ("r1", "c2", c, c, 3),
                                              ("r2", "c3", c, c, 3), ("r3", "out", c, 8, 1)], 1):
        node, w = conv(i, x, y, cin, cout, k)
        nodes.append(node)
        inits += w
        if i in (1, 2):
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
        if i == 3:
            nodes += [helper.make_node("Add", ["c3", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r3"])]
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 8, 8])], inits)


@pytest.fixture(scope="module")
def residual(spec):
    from hwcompress.codegen.npu.offload import offload

    mod = _int8_graph(_residual_model(), spec)
    return mod, offload(mod, spec)


def _uint8_tensors(mod, x):
    """The int8 graph's first quantize (the NPU region's input) and the quantize after the
    residual add + relu (its output), run on the host."""
    from hwcompress.passes.quantize.int8_graph import emit_main, module_with_main
    from hwcompress.verify import host_vm

    func = mod["main"]
    quantizes = [b.var for blk in func.body.blocks for b in blk.bindings
                 if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.quantize"]
    bindings = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}

    def feeds_from_add(v):
        relu = bindings[v].args[0]
        return relu in bindings and getattr(bindings[relu].op, "name", "") == "relax.nn.relu" and \
            getattr(bindings[bindings[relu].args[0]].op, "name", "") == "relax.add" and \
            all(isinstance(a, relax.Var) for a in bindings[bindings[relu].args[0]].args)

    wanted = [quantizes[0], next(v for v in quantizes if feeds_from_add(v))]

    def outputs(bb):
        _, vmap = emit_main(bb, func, func.params)
        return [vmap[v] for v in wanted]

    vm = host_vm(module_with_main(mod, func, outputs, as_tuple=True))
    res = vm["main"](tvm.runtime.tensor(x))
    return [r.numpy() for r in res]


def test_host_target_keeps_float_residual_adds():
    """No NPU with ``add``: the int8 pass adds no quantization points (today's graph)."""
    from hwcompress.passes.quantize import int8_report
    from hwcompress.targets import load_target

    mod = _int8_graph(_residual_model(), load_target("host"))
    assert "npu_add_points" not in int8_report(mod)
    dq_of_uint8 = [b for blk in mod["main"].body.blocks for b in blk.bindings if isinstance(b.value, relax.Call)
                   and getattr(b.value.op, "name", "") == "relax.dequantize" and str(b.value.args[0].ty.dtype) == "uint8"]
    assert not dq_of_uint8


def test_add_producing_the_network_output_stays_float(spec):
    """conv(x) + x as the model's output: no quantization points (the output keeps float)."""
    from hwcompress.passes.quantize import int8_report

    w = numpy_helper.from_array((RNG.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Add", ["c", "input"], ["out"])]
    model = make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    assert "npu_add_points" not in int8_report(_int8_graph(model, spec))


def test_residual_block_runs_as_one_npu_program(residual, spec):
    from hwcompress.codegen.npu import Add, Conv2D, run_reference
    from hwcompress.codegen.npu.codegen import program_from_function
    from hwcompress.codegen.npu.offload import offload_report
    from hwcompress.codegen.npu.partition import npu_functions, partition, prepare
    from hwcompress.passes.quantize import int8_report

    mod, out = residual
    points = int8_report(mod)["npu_add_points"]
    assert [p["name"] for p in points] == ["add[0] input a", "add[0] input b", "add[0] output"]
    assert len(_npu_calls(out)) == 1
    host = _host_ops(out)
    assert "relax.nn.relu" not in host and "relax.dequantize" in host  # only the logits' conv is left
    assert host.count("relax.nn.conv2d") == 1
    report = offload_report(out)
    assert report["ops"]["add"] == {"npu": 1, "host": 0}
    assert report["ops"]["conv2d"]["npu"] == 3 and report["ops"]["relu"] == {"npu": 3, "host": 0}
    assert report["flops_share"] > 0.95

    (func,) = npu_functions(partition(prepare(mod), spec.npu)).values()
    program = program_from_function(func, spec.npu.pow2_scales)
    assert [type(c) for c in program.commands] == [Conv2D, Conv2D, Conv2D, Add]
    add = program.commands[-1]
    assert add.act_min == program.tensors[add.output].zero_point  # the relu is the ADD's clamp
    t = program.tensors
    scales = {p["name"]: p["scale"] for p in points}
    sa, sb, sy = scales["add[0] input a"], scales["add[0] input b"], scales["add[0] output"]
    with_inputs = dataclasses.replace(program, outputs=[add.input_a, add.input_b, add.output])
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)
        q_in, q_out = _uint8_tensors(mod, x)
        x_int8 = (q_in.astype(np.int16) - 128).astype(np.int8)
        a, b, got = (v.astype(np.int64) for v in run_reference(with_inputs, [x_int8]))
        # the ADD command against the int8 graph's float math on the same int8 inputs: equal but
        # for ties (ADD rounds half up, the host's quantize half to even), 1 step there
        real = (sa * (a - t[add.input_a].zero_point) + sb * (b - t[add.input_b].zero_point)) / sy
        want = np.clip(np.round(real) + t[add.output].zero_point, add.act_min, add.act_max)
        off = got != want
        assert np.abs(got - want).max() <= 1 and np.all(real[off] - np.floor(real[off]) == 0.5)
        # the whole program against the int8 graph's own uint8 output: each conv also rounds its
        # int32 bias and requant ties its own way (1 step), which three layers and the sum
        # compound; NPU_TOLERANCE covers this on the logits (next test)
        diff = np.abs(got + 128 - q_out.astype(np.int64))
        assert diff.max() <= 3 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_offloaded_residual_block_matches_the_int8_graph(residual, spec):
    from hwcompress.verify import graph_reference, random_inputs

    mod, out = residual
    vm = relax.VirtualMachine(tvm.compile(out, spec.tvm_target()), tvm.cpu())
    ref = graph_reference(mod)
    for seed in range(3):
        (x,) = random_inputs([{"shape": [1, 4, 8, 8], "dtype": "float32"}], seed=seed)
        got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), ref([x])[0]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_target_without_npu_add_keeps_the_add_on_the_host(spec):
    from hwcompress.codegen.npu.offload import offload, offload_report
    from hwcompress.passes.quantize import int8_report
    from hwcompress.verify import graph_reference, random_inputs

    no_add = dataclasses.replace(spec, npu=dataclasses.replace(
        spec.npu, supported_ops=tuple(o for o in spec.npu.supported_ops if o != "add")))
    mod = _int8_graph(_residual_model(), no_add)
    assert "npu_add_points" not in int8_report(mod)  # the float add, as on a host target
    out = offload(mod, no_add)
    report = offload_report(out)
    assert report["ops"]["add"]["npu"] == 0 and report["ops"]["add"]["host"] == 1
    assert "not in the target's [npu].supported_ops" in report["ops"]["add"]["host_reasons"][0]["reason"]
    # the NPU region now has two outputs (the stem's relu for the skip, the block's conv)
    vm = relax.VirtualMachine(tvm.compile(out, spec.tvm_target()), tvm.cpu())
    (x,) = random_inputs([{"shape": [1, 4, 8, 8], "dtype": "float32"}], seed=0)
    got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), graph_reference(mod)([x])[0]
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def _depthwise_model(c: int = 16):
    """conv-relu -> depthwise 3x3-relu -> pointwise 1x1-relu -> 1x1 conv (logits): a
    MobileNet block."""
    specs = [("input", "c1", 4, c, 3, 1), ("r1", "c2", 1, c, 3, c), ("r2", "c3", c, c, 1, 1), ("r3", "out", c, 8, 1, 1)]
    nodes, inits = [], []
    for i, (x, y, cin, cout, k, groups) in enumerate(specs, 1):
        w = (RNG.standard_normal((cout, cin, k, k)) * (2 / (k * k * cin)) ** 0.5).astype(np.float32)
        b = (RNG.standard_normal(cout) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[k // 2] * 4, group=groups))
        if i < 4:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 8, 8])], inits)


def test_depthwise_conv_is_int8_only_for_an_npu_that_runs_it(spec):
    from hwcompress.codegen.npu.offload import offload, offload_report
    from hwcompress.passes.quantize import int8_report
    from hwcompress.targets import load_target
    from hwcompress.verify import graph_reference, random_inputs

    host = int8_report(_int8_graph(_depthwise_model(), load_target("host")))
    assert [f["name"] for f in host["float_fallback"]] == ["conv2d[1]"]  # no int8 depthwise kernel on the host
    mod = _int8_graph(_depthwise_model(), spec)
    assert int8_report(mod)["float_fallback"] == []
    out = offload(mod, spec)
    report = offload_report(out)
    assert report["ops"]["depthwise_conv2d"] == {"npu": 1, "host": 0}
    assert len(_npu_calls(out)) == 1 and report["flops_share"] > 0.8  # all but the logits conv
    vm = relax.VirtualMachine(tvm.compile(out, spec.tvm_target()), tvm.cpu())
    ref = graph_reference(mod)
    for seed in range(2):
        (x,) = random_inputs([{"shape": [1, 4, 8, 8], "dtype": "float32"}], seed=seed)
        got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), ref([x])[0]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_add_multipliers_share_one_shift():
    from hwcompress.codegen.npu.codegen import add_multipliers

    assert add_multipliers(1.0, 0.5, pow2=True) == (2, 1, 1)
    assert add_multipliers(4.0, 2.0, pow2=True) == (4, 2, 0)
    ma, mb, shift = add_multipliers(0.3, 0.7)
    assert 2**30 <= mb < 2**31  # the larger ratio keeps 31 bits
    assert abs(ma / 2**shift - 0.3) < 1e-9 and abs(mb / 2**shift - 0.7) < 1e-9
