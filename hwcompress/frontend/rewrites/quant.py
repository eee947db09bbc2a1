"""QOperator ops into QuantizeLinear/DequantizeLinear form (TVM's importer has no QLinearConv,
QLinearMatMul or ConvInteger).

QLinearConv -> DQ(x), DQ(w), DQ(bias) -> float Conv -> Q(y); QLinearMatMul likewise. Float math
on dequantized values reproduces the integer reference up to rounding of the float32 sums: a
requantized output can differ by one where the exact value lies within float error of a .5 tie.

DequantizeLinear's ``axis`` (per-channel scales) exists from opset 13; in older graphs a
per-channel constant operand is dequantized here in numpy instead.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphView, NodeBuilder, attrs_of, node_input

_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _size(view: GraphView, name: str) -> int | None:
    shape = view.shape(name)
    return None if shape is None else int(np.prod(shape, dtype=np.int64))


def _can_dequantize(view: GraphView, x: str, scale: str, zero_point: str) -> bool:
    """A per-tensor DQ works in every opset; a per-axis one needs opset 13 or constants."""
    if view.opset >= 13 or _size(view, scale) == 1:
        return True
    return all(n == "" or view.const(n) is not None for n in (x, scale, zero_point))


def _scalar(b: NodeBuilder, name: str) -> str:
    """``name`` as a 0-d tensor when it holds one element (opset < 13 DQ/Q want scalars)."""
    if not name:
        return name
    value = b.view.const(name)
    if value is not None:
        return name if value.ndim == 0 or value.size != 1 else b.const("scalar", value.reshape(()))
    shape = b.view.shape(name)
    if shape is not None and len(shape) > 0 and int(np.prod(shape)) == 1:
        return b.op("Reshape", [name, b.const("scalar_shape", np.zeros((0,), np.int64))])
    return name


def _dequantize(b: NodeBuilder, x: str, scale: str, zero_point: str, axis: int) -> str:
    """DequantizeLinear of ``x``; per-axis along ``axis`` when the scale has several elements."""
    view = b.view
    if _size(view, scale) == 1:
        inputs = [x, _scalar(b, scale)] + ([_scalar(b, zero_point)] if zero_point else [])
        return b.op("DequantizeLinear", inputs)
    if view.opset >= 13:
        return b.op("DequantizeLinear", [x, scale] + ([zero_point] if zero_point else []), axis=axis)
    xv, sv = view.const(x), view.const(scale)
    zv = view.const(zero_point) if zero_point else np.zeros_like(sv, dtype=np.int64)
    bshape = [1] * xv.ndim
    bshape[axis] = -1
    real = (xv.astype(np.int64) - zv.astype(np.int64).reshape(bshape)) * sv.astype(np.float32).reshape(bshape)
    return b.const("dequantized", real.astype(np.float32))


def _quantize(b: NodeBuilder, y: str, scale: str, zero_point: str, output: str) -> None:
    inputs = [y, _scalar(b, scale)] + ([_scalar(b, zero_point)] if zero_point else [])
    b.op("QuantizeLinear", inputs, outputs=[output])


def match_qlinear_conv(node: onnx.NodeProto, view: GraphView) -> bool:
    return _can_dequantize(view, node.input[3], node.input[4], node.input[5])


def rewrite_qlinear_conv(node: onnx.NodeProto, b: NodeBuilder) -> None:
    """QLinearConv(x, xs, xz, w, ws, wz, ys, yz[, B]) -> Q(Conv(DQ x, DQ w, DQ B), ys, yz)."""
    x, xs, xz, w, ws, wz, ys, yz = node.input[:8]
    bias = node_input(node, 8)
    conv_inputs = [_dequantize(b, x, xs, xz, axis=1), _dequantize(b, w, ws, wz, axis=0)]
    bias_after = None
    if bias:
        # The int32 bias is quantized with scale xs * ws and zero point 0 (ONNX spec).
        xs_v, ws_v = b.view.const(xs), b.view.const(ws)
        if xs_v is not None and ws_v is not None:
            bias_scale = b.const("bias_scale", (xs_v.astype(np.float32) * ws_v.astype(np.float32)).reshape(ws_v.shape))
        else:
            bias_scale = b.op("Mul", [_scalar(b, xs), ws])
        if _size(b.view, bias_scale) == 1 or b.view.opset >= 13:
            conv_inputs.append(_dequantize(b, bias, bias_scale, "", axis=0))
        else:
            # Per-channel before opset 13: DQ with unit scale, times the scales, added after the
            # Conv. A folded float bias would be re-quantized by ONNX Runtime's optimizer with a
            # Round that opset < 11 lacks, and the prepared graph must stay runnable.
            rank = len(b.view.shape(x) or ()) or 4
            unit = b.op("DequantizeLinear", [bias, b.const("unit_scale", np.float32(1.0))])
            real = b.op("Mul", [unit, bias_scale])
            bias_after = b.op("Reshape", [real, b.const("bias_shape", np.array([1, -1] + [1] * (rank - 2), np.int64))])
    attrs = {k: v for k, v in attrs_of(node).items() if k in _CONV_ATTRS}
    y = b.op("Conv", conv_inputs, **attrs)
    if bias_after:
        y = b.op("Add", [y, bias_after])
    _quantize(b, y, ys, yz, node.output[0])


def _per_axis(view: GraphView, operand: str, scale: str, axis_from_end: int) -> int | None:
    """The DQ axis of a matmul operand: its rank minus ``axis_from_end`` (None: rank unknown)."""
    shape = view.shape(operand)
    return None if shape is None else len(shape) - axis_from_end


def match_qlinear_matmul(node: onnx.NodeProto, view: GraphView) -> bool:
    a, a_s, a_z, w, w_s, w_z = node.input[:6]
    for operand, scale, zp in ((a, a_s, a_z), (w, w_s, w_z)):
        if _size(view, scale) != 1 and (view.shape(operand) is None or not _can_dequantize(view, operand, scale, zp)):
            return False
    return True


def rewrite_qlinear_matmul(node: onnx.NodeProto, b: NodeBuilder) -> None:
    """QLinearMatMul(a, as, az, b, bs, bz, ys, yz) -> Q(MatMul(DQ a, DQ b), ys, yz).

    A per-row ``as`` runs along a's rows (axis rank-2), a per-column ``bs`` along b's columns.
    """
    a, a_s, a_z, w, w_s, w_z, ys, yz = node.input[:8]
    af = _dequantize(b, a, a_s, a_z, axis=_per_axis(b.view, a, a_s, 2) or 0)
    wf = _dequantize(b, w, w_s, w_z, axis=_per_axis(b.view, w, w_s, 1) or 0)
    _quantize(b, b.op("MatMul", [af, wf]), ys, yz, node.output[0])


def match_conv_integer(node: onnx.NodeProto, view: GraphView) -> bool:
    w, w_z = node.input[1], node_input(node, 3)
    if not w_z or _size(view, w_z) == 1:
        return True
    return _size(view, w_z) is not None and (view.opset >= 13 or view.const(w) is not None)


def rewrite_conv_integer(node: onnx.NodeProto, b: NodeBuilder) -> None:
    """ConvInteger(x, w[, xz, wz]) -> Cast<int32>(Conv(DQ(x, 1, xz), DQ(w, 1, wz))).

    Exact while every partial sum stays below 2**24 in magnitude (float32's integer range):
    always for K = C/group * prod(kernel) <= 258 terms (|products| <= 255 * 255), and in
    practice far beyond, since real activations rarely sit at the extremes together. Larger
    sums may be off by the float32 rounding of the accumulator.
    """
    x, w = node.input[0], node.input[1]
    x_z, w_z = node_input(node, 2), node_input(node, 3)
    one = b.const("unit_scale", np.float32(1.0))
    xf = _dequantize(b, x, one, x_z, axis=1)
    n_w_z = _size(b.view, w_z) if w_z else 1
    w_scale = one if n_w_z == 1 else b.const("unit_scales", np.ones((n_w_z,), np.float32))
    wf = _dequantize(b, w, w_scale, w_z, axis=0)
    attrs = {k: v for k, v in attrs_of(node).items() if k in _CONV_ATTRS}
    y = b.op("Conv", [xf, wf], **attrs)
    b.op("Cast", [y], outputs=[node.output[0]], to=onnx.TensorProto.INT32)
