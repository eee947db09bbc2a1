"""A read view of an ONNX graph for the rewrites: constants, static shapes, opset, fresh names,
and a builder for the nodes that replace one node. Pure protobuf manipulation."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphView:
    """What the rewrites of one graph may ask: constant values, static shapes, element types.

    Built once per ``apply_rewrites`` call; it also hands out unique names and collects the
    initializers the rewrites add.
    """

    def __init__(self, proto: onnx.ModelProto):
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self._consts[node.output[0]] = node.attribute[0].t
        self._types = {vi.name: vi.type for vi in (*graph.input, *graph.value_info, *graph.output)}
        self._taken = set(self._consts) | set(self._types) | {n.name for n in graph.node}
        self._taken.update(name for n in graph.node for name in (*n.input, *n.output))
        self.new_initializers: list[onnx.TensorProto] = []

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a Constant's output, else None."""
        tensor = self._consts.get(name) if name else None
        return None if tensor is None else numpy_helper.to_array(tensor)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The static shape of ``name``, or None when it is unknown or partly symbolic."""
        if name in self._consts:
            return tuple(self._consts[name].dims)
        ttype = self._types.get(name)
        if ttype is None or not ttype.HasField("tensor_type") or not ttype.tensor_type.HasField("shape"):
            return None
        dims = ttype.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        return tuple(d.dim_value for d in dims)

    def elem_type(self, name: str) -> int | None:
        """The ``onnx.TensorProto`` element type of ``name`` when known."""
        if name in self._consts:
            return self._consts[name].data_type
        ttype = self._types.get(name)
        return ttype.tensor_type.elem_type if ttype is not None and ttype.HasField("tensor_type") else None

    def fresh(self, hint: str) -> str:
        """A value/node name not used anywhere in the graph."""
        base, k = hint or "v", 0
        name = base
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def add_const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self._consts[name] = tensor
        self.new_initializers.append(tensor)
        return name


class NodeBuilder:
    """Collects the nodes that replace ``origin``; names derive from the origin's name."""

    def __init__(self, view: GraphView, origin: onnx.NodeProto):
        self.view = view
        self.origin = origin
        self.prefix = origin.name or f"{origin.op_type}_{origin.output[0]}"
        self.nodes: list[onnx.NodeProto] = []

    def const(self, hint: str, value) -> str:
        return self.view.add_const(f"{self.prefix}/{hint}", np.asarray(value))

    def op(self, op_type: str, inputs, outputs=None, **attrs) -> str:
        """Add a node and return its (first) output name; ``outputs`` defaults to one fresh name."""
        if outputs is None:
            outputs = [self.view.fresh(f"{self.prefix}/{op_type}")]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        name = self.view.fresh(f"{self.prefix}/{op_type}")
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]


def attrs_of(node: onnx.NodeProto) -> dict:
    """The node's attributes as Python values (bytes decoded to str)."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def node_input(node: onnx.NodeProto, i: int) -> str:
    """Input ``i`` of ``node``, or "" when it is absent (optional inputs)."""
    return node.input[i] if i < len(node.input) else ""
