"""Small ONNX graphs for the graph-pass tests: conv / Gemm / MatMul + BatchNormalization, with
activations and residual adds, plus helpers to import them with and without ONNX Runtime's
basic-level folding (which already folds Conv + BN at the ONNX level)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: onnxruntime refuses IR versions newer than 10; opset 17 needs IR >= 8.
IR_VERSION = 8
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid")


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = False, stride: int = 1) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout) * 0.2, "b"))
        pad = k // 2
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)

    def bn(self, x: str, c: int, eps: float = 1e-5) -> str:
        rng = self.rng
        params = [
            rng.uniform(0.5, 1.5, c),  # gamma
            rng.standard_normal(c) * 0.1,  # beta
            rng.standard_normal(c) * 0.2,  # running mean
            rng.uniform(0.5, 2.0, c),  # running var
        ]
        return self.node("BatchNormalization", [x, *(self.const(p, "bn") for p in params)], epsilon=eps)

    def act(self, x: str, kind: str) -> str:
        if kind == "Clip":
            return self.node("Clip", [x, self.const(np.array(0.0), "lo"), self.const(np.array(6.0), "hi")])
        if kind == "LeakyRelu":
            return self.node("LeakyRelu", [x], alpha=0.1)
        return self.node(kind, [x])

    def model(self, x_shape, out: str, out_shape) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        onnx.checker.check_model(model)
        return model


def conv_bn(bias: bool = False, group: int = 1, act: str | None = None, cin: int = 8, cout: int = 8, hw: int = 10, seed: int = 0):
    """Conv (optionally with bias, grouped) + BatchNormalization (+ activation)."""
    g = _Graph(seed)
    y = g.bn(g.conv("input", cin, cout, group=group, bias=bias), cout)
    if act:
        y = g.act(y, act)
    return g.model((1, cin, hw, hw), y, (1, cout, hw, hw))


def residual_block(act: str = "Relu", c: int = 8, hw: int = 10, seed: int = 0):
    """conv+BN+act -> conv(bias)+BN -> add(input) -> act: the ResNet basic block."""
    g = _Graph(seed)
    y = g.act(g.bn(g.conv("input", c, c), c), act)
    y = g.bn(g.conv(y, c, c, bias=True), c)
    y = g.act(g.node("Add", [y, "input"]), act)
    return g.model((1, c, hw, hw), y, (1, c, hw, hw))


def inverted_residual(c: int = 8, expand: int = 3, hw: int = 10, seed: int = 0):
    """MobileNetV2 block: 1x1 expand+BN+ReLU6, depthwise 3x3+BN+ReLU6, 1x1 project+BN, add."""
    g = _Graph(seed)
    e = c * expand
    y = g.act(g.bn(g.conv("input", c, e, k=1), e), "Clip")
    y = g.act(g.bn(g.conv(y, e, e, group=e), e), "Clip")
    y = g.bn(g.conv(y, e, c, k=1), c)
    y = g.node("Add", ["input", y])
    return g.model((1, c, hw, hw), y, (1, c, hw, hw))


def gemm_bn(bias: bool = True, trans_b: bool = True, k: int = 16, n: int = 12, seed: int = 0):
    """Gemm (+ bias) + BatchNormalization on the 2D output."""
    g = _Graph(seed)
    w = g.rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)
    inputs = ["input", g.const(w, "w")]
    if bias:
        inputs.append(g.const(g.rng.standard_normal(n) * 0.2, "b"))
    y = g.bn(g.node("Gemm", inputs, transB=int(trans_b)), n)
    return g.model((2, k), y, (2, n))


def matmul_bn(k: int = 16, n: int = 12, seed: int = 0):
    """MatMul + BatchNormalization on the 2D output."""
    g = _Graph(seed)
    y = g.node("MatMul", ["input", g.const(g.rng.standard_normal((k, n)) / np.sqrt(k), "w")])
    y = g.bn(y, n)
    return g.model((2, k), y, (2, n))


def shared_conv_bn(c: int = 8, hw: int = 10, seed: int = 0):
    """A conv whose output feeds both a BN and an Add: folding would duplicate the conv."""
    g = _Graph(seed)
    conv = g.conv("input", c, c)
    y = g.node("Add", [g.bn(conv, c), conv])
    return g.model((1, c, hw, hw), y, (1, c, hw, hw))


def raw_import(model: onnx.ModelProto, input_shapes=None):
    """Import through TVM's importer *without* ONNX Runtime's folding (BN stays a batch_norm).

    This is what the Relax passes see when the frontend's ORT normalization is skipped (ORT
    cannot load the model) or does not apply.
    """
    from hwcompress.frontend.importer import import_prepared
    from hwcompress.frontend.load import fix_input_shapes, load_model
    from hwcompress.frontend.normalize import infer_shapes

    return import_prepared(infer_shapes(fix_input_shapes(load_model(model), input_shapes)))


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Reference output; graph optimizations off so ORT runs the BN arithmetic as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def mac_kernels(mod) -> list[dict]:
    """Every reduction block of ``mod``'s kernels that multiplies two tensors (a conv or
    matmul; a mean reads one): kernel name, operand and accumulator dtypes, whether it is
    integer (8-bit operands widened at most to 16 bits, int32 sums, the kernel's inputs
    uint8 x int8) and whether it is one of hwc's tiled CPU int8 kernels (``hwc.int8_tile``)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import SBlock

    found = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        blocks = []
        tvm_ffi.structural_walk(func.body, (SBlock, blocks.append), order="post")
        params = [str(getattr(p.ty, "dtype", "")) for p in func.params]
        for block in blocks:
            if not any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in block.iter_vars):
                continue
            written = {w.source.name for w in block.writes}
            operands = [str(r.source.dtype) for r in block.reads if r.source.name not in written]
            if len(operands) < 2:
                continue
            acc = [str(w.source.dtype) for w in block.writes]
            integer = set(operands) <= {"uint8", "int8", "int16"} and acc == ["int32"] and params[:2] == ["uint8", "int8"]
            found.append({"kernel": gv.name_hint, "operands": operands, "acc": acc, "integer": integer,
                          "tiled": "hwc.int8_tile" in func.script()})  # fmt: skip
    return found
