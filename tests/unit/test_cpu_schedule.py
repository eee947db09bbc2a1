"""Default CPU schedules: numerics against ONNX Runtime, and the shape of the scheduled TIR."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hwcompress.frontend as fe  # noqa: E402
from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cpu_rules as cr  # noqa: E402
from hwcompress.backends import cpu_schedule as cs  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

# float32 results may differ from ORT by reassociation of the sums only
RTOL = 1e-4  # of the output's largest magnitude


def _model(nodes, inputs, output_shape, inits=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _w(rng, *shape):
    return rng.standard_normal(shape) / np.sqrt(max(np.prod(shape[1:]), 1))


def small_cnn():
    rng = np.random.default_rng(0)
    inits = [
        ("w1", _w(rng, 16, 3, 3, 3)), ("b1", _w(rng, 16)),
        ("w2", _w(rng, 32, 16, 3, 3)), ("b2", _w(rng, 32)),
        ("w3", _w(rng, 32, 1, 3, 3)), ("b3", _w(rng, 32)),
        ("w4", _w(rng, 32, 32, 1, 1)), ("b4", _w(rng, 32)),
        ("wf", _w(rng, 10, 32)), ("bf", _w(rng, 10)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"]),
        helper.make_node("Add", ["c4", "r2"], ["a4"]),
        helper.make_node("MaxPool", ["a4"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p4"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], transB=1),
    ]
    return _model(nodes, [("input", [1, 3, 32, 32])], [1, 10], inits)


def _conv(cin, cout, hw, k, stride=1, pad=0, group=1, relu=True):
    rng = np.random.default_rng(1)
    out = (hw + 2 * pad - k) // stride + 1
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c" if relu else "output"], kernel_shape=[k, k],
                              strides=[stride] * 2, pads=[pad] * 4, group=group)]  # fmt: skip
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["output"]))
    inits = [("w", _w(rng, cout, cin // group, k, k)), ("b", _w(rng, cout))]
    return _model(nodes, [("input", [1, cin, hw, hw])], [1, cout, out, out], inits)


def _gemm(m, k, n, trans_b):
    rng = np.random.default_rng(2)
    w = _w(rng, n, k) if trans_b else _w(rng, k, n)
    node = helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=int(trans_b))
    return _model([node], [("input", [m, k])], [m, n], [("w", w), ("b", _w(rng, n))])


def _unary(op, shape, out_shape, **attrs):
    return _model([helper.make_node(op, ["input"], ["output"], **attrs)], [("input", shape)], out_shape)


def _elementwise():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Mul", ["input", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["output"]),
    ]
    return _model(nodes, [("input", [1, 24, 20, 20])], [1, 24, 20, 20], [("s", _w(rng, 24, 1, 1)), ("t", _w(rng, 24, 1, 1))])


SINGLE_OPS = {
    "conv3x3_pad": lambda: _conv(8, 16, 20, 3, pad=1),
    "conv3x3_stride2": lambda: _conv(16, 32, 21, 3, stride=2, pad=1),
    "conv1x1": lambda: _conv(32, 24, 14, 1),
    "conv5x5_odd_width": lambda: _conv(4, 12, 13, 5, pad=2, relu=False),
    "conv_depthwise": lambda: _conv(32, 32, 16, 3, pad=1, group=32),
    "conv_depthwise_stride2": lambda: _conv(24, 24, 15, 3, stride=2, pad=1, group=24),
    "conv_grouped": lambda: _conv(16, 32, 12, 3, pad=1, group=4),
    "conv_stem_7x7": lambda: _conv(3, 16, 40, 7, stride=2, pad=3),
    "gemm_batch1": lambda: _gemm(1, 96, 100, trans_b=True),
    "gemm_batch5": lambda: _gemm(5, 64, 40, trans_b=False),
    "maxpool": lambda: _unary("MaxPool", [1, 16, 18, 18], [1, 16, 9, 9], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool": lambda: _unary("AveragePool", [1, 8, 16, 16], [1, 8, 8, 8], kernel_shape=[2, 2], strides=[2, 2]),
    "global_avgpool": lambda: _unary("GlobalAveragePool", [1, 64, 7, 7], [1, 64, 1, 1]),
    "softmax": lambda: _unary("Softmax", [4, 1000], [4, 1000], axis=-1),
    "reduce_max": lambda: _unary("ReduceMax", [2, 32, 50], [2, 32, 1], axes=[2]),
    "transpose": lambda: _unary("Transpose", [2, 16, 24, 8], [2, 8, 24, 16], perm=[0, 3, 2, 1]),
    "elementwise": _elementwise,
}


def _build_and_compare(model, scheduled=True):
    spec = load_target("host")
    mod = B.legalize(fe.import_onnx(model), spec)
    if scheduled:
        mod = B.schedule(mod, spec)
    vm = tvm.relax.VirtualMachine(B.build(mod, spec), tvm.cpu())
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * max(np.abs(ref).max(), 1.0))
    return mod


def _loop_kinds(func) -> set:
    import tvm_ffi

    kinds = set()
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda f: kinds.add(int(f.kind))), order="post")
    return kinds


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_small_cnn_matches_onnxruntime():
    _build_and_compare(small_cnn())


@pytest.mark.parametrize("name", sorted(SINGLE_OPS))
def test_single_op_matches_onnxruntime(name):
    _build_and_compare(SINGLE_OPS[name]())


def test_every_kernel_is_scheduled_with_parallel_or_vector_loops():
    spec = load_target("host")
    mod = B.schedule(B.legalize(fe.import_onnx(small_cnn()), spec), spec)
    funcs = _prim_funcs(mod)
    parallel, vectorized = int(tvm.tirx.ForKind.PARALLEL), int(tvm.tirx.ForKind.VECTORIZED)
    for name, func in funcs.items():
        assert func.attrs.get("tirx.is_scheduled"), name
        if "conv2d" in name or "pool" in name:  # enough work for both
            assert vectorized in _loop_kinds(func), name
            if spec.tvm["num-cores"] > 1:
                assert parallel in _loop_kinds(func), name


def test_conv_is_register_tiled_with_local_accumulator():
    spec = load_target("host")
    mod = B.schedule(B.legalize(fe.import_onnx(_conv(16, 32, 16, 3, pad=1)), spec), spec)
    (func,) = [f for n, f in _prim_funcs(mod).items() if "conv2d" in n]
    text = func.script()
    assert 'scope="local"' in text and "_init" in text  # cache_write + decompose_reduction
    assert int(tvm.tirx.ForKind.UNROLLED) in _loop_kinds(func)
    assert "T_add" not in text  # bias + relu computed in the write-back, no extra pass


def test_function_marked_scheduled_is_left_untouched():
    spec = load_target("host")
    mod = B.legalize(fe.import_onnx(_conv(8, 16, 12, 3, pad=1)), spec)
    name = next(n for n in _prim_funcs(mod) if "conv2d" in n)
    gvar = mod.get_global_var(name)
    for attr in ("tirx.is_scheduled", "tir.is_scheduled"):
        marked = mod.clone()
        marked[gvar] = marked[gvar].with_attr(attr, True)
        before = marked[gvar]
        after = B.schedule(marked, spec)
        assert after[gvar].same_as(before), attr
        assert not _loop_kinds(after[gvar]) & {int(tvm.tirx.ForKind.PARALLEL), int(tvm.tirx.ForKind.VECTORIZED)}


def test_input_module_is_not_mutated():
    spec = load_target("host")
    mod = B.legalize(fe.import_onnx(_conv(8, 16, 12, 3, pad=1)), spec)
    before = {n: f for n, f in _prim_funcs(mod).items()}
    B.schedule(mod, spec)
    assert all(_prim_funcs(mod)[n].same_as(f) for n, f in before.items())


def test_failing_rule_falls_back_to_next(monkeypatch):
    def broken(sch, facts):
        sch.vectorize(sch.get_loops(cr._root_blocks(sch)[0])[0])  # may apply, then:
        raise RuntimeError("rule bug")

    monkeypatch.setattr(cs, "_RULES", (("broken", broken),) + cs._RULES[1:])
    mod = _build_and_compare(_conv(8, 16, 12, 3, pad=1))
    assert all(f.attrs.get("tirx.is_scheduled") for f in _prim_funcs(mod).values())
    monkeypatch.setattr(cs, "_RULES", (("broken", broken),))
    mod = _build_and_compare(_conv(8, 16, 12, 3, pad=1))  # nothing applies: left as legalized
    assert not any(f.attrs.get("tirx.is_scheduled") for f in _prim_funcs(mod).values())


def test_vector_width_comes_from_cpu_features():
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 4})
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    facts = cs.CpuFacts.from_target(avx2)
    assert (facts.num_cores, facts.vector_bits) == (4, 256)
    assert cs.CpuFacts.from_target(avx512).lanes(32) == 16


def test_pool_reads_its_input_with_the_padding_inlined():
    """A pool's padding is no separate padded copy (it cost 4x the pool itself); the
    ONNX comparison of the padded maxpool above checks the values."""
    spec = load_target("host")
    mod = B.schedule(B.legalize(fe.import_onnx(SINGLE_OPS["maxpool"]()), spec), spec)
    (func,) = [f for n, f in _prim_funcs(mod).items() if "pool" in n]
    text = func.script()
    assert "pad_temp" not in text and "if_then_else" in text
