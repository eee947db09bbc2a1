"""MaxPool with its ``Indices`` output -> slices and a running argmax (TVM's importer returns
only the values).

The padded input is sliced once per kernel offset; a chain of ``Greater``/``Where`` keeps the
maximum and the offset where it was first seen, which is ONNX Runtime's tie rule (strict ``>``
in window order). The flat index is ``(n * C + c) * prod(spatial)`` plus the window's origin
plus that offset, in row-major order (``storage_order=1``: column-major), all small constants.
Padding reads as -inf (integer inputs: the type's minimum, so a window whose real values all
equal that minimum and that starts in the padding reports the padded position).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper

from ..graph import GraphView, NodeBuilder, attrs_of


def match_maxpool_indices(node: onnx.NodeProto, view: GraphView) -> bool:
    return (
        len(node.output) > 1
        and bool(node.output[1])
        and view.opset >= 11
        and view.shape(node.input[0]) is not None
        and view.shape(node.output[0]) is not None
    )


def _begin_pads(attrs: dict, in_size, out_size, kernel, strides, dilations) -> list[int]:
    n = len(in_size)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((o - 1) * s + (k - 1) * d + 1 - i, 0) for i, o, k, s, d in zip(in_size, out_size, kernel, strides, dilations)]
        return [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
    return list(attrs.get("pads", [0] * (2 * n)))[:n]


def _flat_strides(in_size, column_major: bool) -> list[int]:
    dims = list(in_size)
    if column_major:
        return [int(np.prod(dims[:i], dtype=np.int64)) for i in range(len(dims))]
    return [int(np.prod(dims[i + 1:], dtype=np.int64)) for i in range(len(dims))]


def _pad_value(elem_type: int):
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    return np.array(-np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min, dtype)


def rewrite_maxpool_indices(node: onnx.NodeProto, b: NodeBuilder) -> None:
    view, attrs = b.view, attrs_of(node)
    x = node.input[0]
    n_batch, channels, *in_size = view.shape(x)
    out_size = list(view.shape(node.output[0])[2:])
    n = len(in_size)
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    begin = _begin_pads(attrs, in_size, out_size, kernel, strides, dilations)
    end = [max((o - 1) * s + (k - 1) * d + 1 - (i + p), 0)
           for i, o, k, s, d, p in zip(in_size, out_size, kernel, strides, dilations, begin)]

    pads = b.const("pads", np.array([0, 0, *begin, 0, 0, *end], np.int64))
    padded = b.op("Pad", [x, pads, b.const("pad_value", _pad_value(view.elem_type(x)))], mode="constant")
    axes = b.const("axes", np.arange(2, 2 + n, dtype=np.int64))
    steps = b.const("steps", np.array(strides, np.int64))
    flat = _flat_strides(in_size, attrs.get("storage_order", 0) == 1)

    offsets = list(itertools.product(*(range(k) for k in kernel)))
    best_v = best_off = None
    for k, offset in enumerate(offsets):
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [st + (o - 1) * s + 1 for st, o, s in zip(starts, out_size, strides)]
        value = b.op("Slice", [padded, b.const("starts", np.array(starts, np.int64)),
                               b.const("ends", np.array(ends, np.int64)), axes, steps])
        off = b.const("offset", np.array(sum(st * f for st, f in zip(starts, flat)), np.int64))
        if best_v is None:
            best_v, best_off = value, off
            continue
        last = k == len(offsets) - 1
        better = b.op("Greater", [value, best_v])
        best_v = b.op("Where", [better, value, best_v], outputs=[node.output[0]] if last else None)
        best_off = b.op("Where", [better, off, best_off])
    if len(offsets) == 1:
        b.op("Identity", [best_v], outputs=[node.output[0]])

    origin = np.zeros(out_size, np.int64)
    for axis, (s, p, f) in enumerate(zip(strides, begin, flat)):
        shape = [1] * n
        shape[axis] = -1
        origin = origin + ((np.arange(out_size[axis]) * s - p) * f).reshape(shape)
    plane = int(np.prod(in_size, dtype=np.int64))
    base = (np.arange(n_batch * channels, dtype=np.int64) * plane).reshape(n_batch, channels, *[1] * n)
    index = b.op("Add", [best_off, b.const("window_origin", origin[None, None])])
    b.op("Add", [index, b.const("plane_base", base)], outputs=[node.output[1]])
