"""ConvTranspose with ``output_shape`` -> explicit ``pads`` and ``output_padding`` (TVM's
importer ignores ``output_shape``)."""

from __future__ import annotations

import onnx

from ..graph import GraphView, NodeBuilder, attrs_of


def transpose_pads(in_size, kernel, strides, dilations, output_padding, output_shape, auto_pad):
    """ONNX's ``total_padding`` split into ``(pads, output_padding)`` as TVM takes them.

    A negative end pad (the output is longer than the full transposed convolution) becomes
    extra ``output_padding``, which is what ONNX Runtime and the reference compute.
    """
    begins, ends, out_pad = [], [], list(output_padding)
    for i in range(len(in_size)):
        total = strides[i] * (in_size[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - output_shape[i]
        if auto_pad == "SAME_UPPER":
            begin, end = total // 2, total - total // 2
        else:
            begin, end = total - total // 2, total // 2
        if end < 0:
            out_pad[i] -= end
            end = 0
        begins.append(begin)
        ends.append(end)
    return begins + ends, out_pad


def _explicit_attrs(node: onnx.NodeProto, view: GraphView) -> dict | None:
    """The node's attributes with ``output_shape`` replaced by pads; None when not expressible."""
    attrs = attrs_of(node)
    in_shape, w_shape = view.shape(node.input[0]), view.shape(node.input[1])
    if "output_shape" not in attrs or in_shape is None:
        return None
    n = len(in_shape) - 2
    kernel = list(attrs["kernel_shape"]) if "kernel_shape" in attrs else (w_shape and list(w_shape[2:]))
    if not kernel:
        return None
    output_shape = list(attrs.pop("output_shape"))[-n:]
    pads, out_pad = transpose_pads(
        list(in_shape[2:]), kernel, attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n),
        attrs.get("output_padding", [0] * n), output_shape, attrs.pop("auto_pad", "NOTSET"),
    )
    if min(pads) < 0:  # a negative begin pad would crop the output's start: no attribute says that
        return None
    attrs.update(pads=pads, output_padding=out_pad)
    return attrs


def match_output_shape(node: onnx.NodeProto, view: GraphView) -> bool:
    return _explicit_attrs(node, view) is not None


def rewrite_output_shape(node: onnx.NodeProto, b: NodeBuilder) -> None:
    b.op("ConvTranspose", list(node.input), outputs=list(node.output), **_explicit_attrs(node, b.view))
