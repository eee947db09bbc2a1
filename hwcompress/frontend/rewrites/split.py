"""Split with zero-size parts -> one Slice per output (TVM's split needs strictly increasing
split points and fails to legalize ``split=[0, 0, 0]``)."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphView, NodeBuilder, attrs_of, node_input


def _split_sizes(node: onnx.NodeProto, view: GraphView) -> list[int] | None:
    attrs = attrs_of(node)
    if "split" in attrs:
        return list(attrs["split"])
    sizes = view.const(node_input(node, 1))
    return None if sizes is None or sizes.size == 0 else [int(s) for s in sizes.reshape(-1)]


def match_zero_size_split(node: onnx.NodeProto, view: GraphView) -> bool:
    sizes = _split_sizes(node, view)
    return view.opset >= 10 and sizes is not None and 0 in sizes


def rewrite_zero_size_split(node: onnx.NodeProto, b: NodeBuilder) -> None:
    sizes = _split_sizes(node, b.view)
    axis = b.const("axis", np.array([attrs_of(node).get("axis", 0)], np.int64))
    begin = 0
    for size, out in zip(sizes, node.output):
        starts = b.const("starts", np.array([begin], np.int64))
        ends = b.const("ends", np.array([begin + size], np.int64))
        if out:
            b.op("Slice", [node.input[0], starts, ends, axis], outputs=[out])
        begin += size
