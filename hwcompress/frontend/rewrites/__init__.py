"""Graph rewrites for what TVM's ONNX importer gets wrong or lacks.

Each rewrite is a module-level ``match`` / ``rewrite`` pair for one op type: ``match(node, view)``
says whether it applies, ``rewrite(node, builder)`` adds the replacing nodes (the node's own
output names are kept, so consumers need no change). The rewritten graph stays standard ONNX
that ONNX Runtime runs, so it is still the reference the built module is verified against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from ..graph import GraphView, NodeBuilder
from . import conv, pool, quant, resize, split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewrite:
    """One local rewrite: the op type it applies to, its predicate and its rewriter."""

    name: str
    op_type: str
    match: Callable[[onnx.NodeProto, GraphView], bool]
    rewrite: Callable[[onnx.NodeProto, NodeBuilder], None]


REWRITES: tuple[Rewrite, ...] = (
    Rewrite("qlinearconv-to-qdq", "QLinearConv", quant.match_qlinear_conv, quant.rewrite_qlinear_conv),
    Rewrite("qlinearmatmul-to-qdq", "QLinearMatMul", quant.match_qlinear_matmul, quant.rewrite_qlinear_matmul),
    Rewrite("convinteger-to-float-conv", "ConvInteger", quant.match_conv_integer, quant.rewrite_conv_integer),
    Rewrite("resize-scales-to-sizes", "Resize", resize.match_resize_scales, resize.rewrite_resize_scales),
    Rewrite("convtranspose-output-shape-to-pads", "ConvTranspose", conv.match_output_shape, conv.rewrite_output_shape),
    Rewrite("maxpool-indices", "MaxPool", pool.match_maxpool_indices, pool.rewrite_maxpool_indices),
    Rewrite("split-zero-size-to-slices", "Split", split.match_zero_size_split, split.rewrite_zero_size_split),
)

# Op types TVM's importer lacks that the rewrites above replace in every graph with static
# shapes (which normalize provides). The one gap: per-channel scales on a non-constant
# operand before opset 13 (no DequantizeLinear axis); TVM's importer then names the op.
REWRITTEN_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger"})


def apply_rewrites(proto: onnx.ModelProto, rewrites: Sequence[Rewrite] = REWRITES) -> onnx.ModelProto:
    """Return a copy of ``proto`` with every matching node replaced (one pass, in graph order);
    ``proto`` itself when nothing matched."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    view = GraphView(out)
    by_op: dict[str, list[Rewrite]] = {}
    for rw in rewrites:
        by_op.setdefault(rw.op_type, []).append(rw)
    nodes, changed = [], False
    for node in out.graph.node:
        candidates = by_op.get(node.op_type, []) if node.domain in ("", "ai.onnx") else []
        rw = next((r for r in candidates if r.match(node, view)), None)
        if rw is None:
            nodes.append(node)
            continue
        builder = NodeBuilder(view, node)
        rw.rewrite(node, builder)
        log.debug("%s: %s -> %s", rw.name, builder.prefix, [n.op_type for n in builder.nodes])
        nodes.extend(builder.nodes)
        changed = True
    if not changed:
        return proto
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(view.new_initializers)
    return out


__all__ = ["REWRITES", "REWRITTEN_OPS", "Rewrite", "apply_rewrites"]
