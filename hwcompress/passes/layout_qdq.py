"""The ops of quantized graphs that block ``ConvertLayout``, and their layout-neutral forms.

TVM 0.27 has no layout inference for ``R.quantize``, ``R.dequantize`` or ``R.nn.pad``, so
``ConvertLayout`` puts a transpose on each side of every one of them: two around each integer
conv of an imported QDQ model (``passes/quantize/qdq.py``: ``quantize -> [pad] -> conv2d ->
dequantize``). The layout pass (``layout.py``) therefore

* splits ``quantize`` / ``dequantize`` into the elementwise ops their legalization
  (``tvm/relax/transform/legalize_ops/qdq.py``) computes, before ``ConvertLayout``::

      quantize(x, s, zp)   = astype(maximum(minimum(round(x / s) + float(zp), hi), lo), dtype)
      dequantize(q, s, zp) = astype(int32(q) - int32(zp), "float32") * s

  with the scale and zero point scalar constants, or (per channel) constants of ``x``'s rank
  that broadcast along ``axis`` (``[1, C, 1, 1]``), so ``ConvertLayout`` moves the channel
  axis of the parameters with the data's; ``lo`` / ``hi`` are the output dtype's range.
  Same operations in the same order and dtypes as the legalization: bit-exact;
* joins them back into ``quantize`` / ``dequantize`` afterwards, the ``axis`` read from the
  broadcast shape (``1`` -> ``3`` under NHWC), because the NPU partition and the reports look
  for the ops themselves;
* moves a ``pad`` that ``ConvertLayout`` left between two inverse transposes inside them
  (``permute(pad(permute(y)))`` -> ``pad(y)`` with the pad widths permuted): the zero-point
  pad before an integer conv whose input has a zero point.

A ``dequantize`` of a constant (a bias) becomes a constant right away, computed by numpy with
the same int32 and float32 operations. Only constant scales and zero points, float32 scales,
float32 data to quantize and integer data to dequantize into float32 are rewritten; any other
(de)quantize keeps its transposes. In blocked layouts (``NCHW{b}c``) the per-channel
parameters are blocked too, and such a (de)quantize stays in its elementwise form (same
arithmetic); a pad there sits between ``layout_transform`` ops and keeps them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dequantize_join", "dequantize_split", "pad_through_transposes", "quantize_join", "quantize_split"]

_INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")


def _rank(expr) -> int | None:
    ndim = getattr(expr.ty, "ndim", -1)
    return None if ndim is None or int(ndim) < 0 else int(ndim)


def _const_array(expr) -> np.ndarray:
    return expr.value.numpy()


def _broadcast(param: np.ndarray, ndim: int, axis: int, dtype: str) -> np.ndarray | None:
    """A quantization parameter as the legalization indexes it: a scalar (one element), or a
    rank-``ndim`` array that broadcasts along ``axis`` (one per channel); None: no such form."""
    if param.size == 1:
        return param.reshape(()).astype(dtype)
    if param.ndim != 1 or ndim == 0:
        return None
    shape = [1] * ndim
    shape[axis] = param.size
    return param.astype(dtype).reshape(shape)


def _channel_axis(ndim: int | None, *params: np.ndarray) -> int | None:
    """The axis along which the parameters of a rank-``ndim`` tensor vary, as ``quantize`` /
    ``dequantize`` take it: -1 when all are scalars; None when they have no such form (another
    rank, more than one axis: not made by ``_broadcast``)."""
    axes = set()
    for p in params:
        if p.size == 1:
            continue
        wide = [a for a, d in enumerate(p.shape) if d != 1]
        if p.ndim != ndim or len(wide) != 1:
            return None
        axes.add(wide[0])
    if len(axes) > 1:
        return None
    return axes.pop() if axes else -1


def _flat(p: np.ndarray, dtype: str):
    from tvm import relax

    return relax.const(p.reshape(()) if p.size == 1 else p.reshape(-1), dtype)


# ---------------------------------------------------------------------------- quantize


def quantize_split():
    """(pattern, rewriter): ``quantize`` with constant parameters -> elementwise ops."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.quantize")(wildcard(), is_const(), is_const()), _split_quantize


def _split_quantize(call, _m):
    from tvm import relax

    x, scale, zero_point = call.args
    ndim, dtype = _rank(x), str(call.attrs.out_dtype)
    if ndim is None or dtype not in _INT_DTYPES or str(x.ty.dtype) != "float32" or str(scale.ty.dtype) != "float32":
        return call
    if not str(zero_point.ty.dtype).startswith(("int", "uint")):
        return call
    axis = int(call.attrs.axis) % max(ndim, 1)
    # the legalization adds the zero point to the rounded float: float32 + int -> float32
    s, z = (_broadcast(_const_array(p), ndim, axis, "float32") for p in (scale, zero_point))
    if s is None or z is None:
        return call
    info = np.iinfo(dtype)
    lo, hi = (relax.const(np.float32(v), "float32") for v in (info.min, info.max))
    t = relax.op.add(relax.op.round(relax.op.divide(x, relax.const(s, "float32"))), relax.const(z, "float32"))
    # clip_cast in the legalization: max(min(v, hi), lo), then the cast
    return relax.op.astype(relax.op.maximum(relax.op.minimum(t, hi), lo), dtype)


def quantize_join():
    """(pattern, rewriter): the elementwise form of ``quantize_split`` -> ``quantize``."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, s, z, hi, lo = wildcard(), is_const(), is_const(), is_const(), is_const()
    t = is_op("relax.add")(is_op("relax.round")(is_op("relax.divide")(x, s)), z)
    pattern = is_op("relax.astype")(is_op("relax.maximum")(is_op("relax.minimum")(t, hi), lo))
    return pattern, lambda call, m: _join_quantize(call, *(m[p] for p in (x, s, z, hi, lo)))


def _join_quantize(call, x, s, z, hi, lo):
    from tvm import relax

    dtype = str(call.ty.dtype)
    if dtype not in _INT_DTYPES or str(x.ty.dtype) != "float32" or any(str(c.ty.dtype) != "float32" for c in (s, z, hi, lo)):
        return call
    info = np.iinfo(dtype)
    bounds = [_const_array(c) for c in (lo, hi)]
    if any(b.ndim != 0 for b in bounds) or [float(b) for b in bounds] != [float(np.float32(v)) for v in (info.min, info.max)]:
        return call
    scale, zero_point = _const_array(s), _const_array(z)
    axis = _channel_axis(_rank(x), scale, zero_point)
    if axis is None or np.any(zero_point != np.round(zero_point)):
        return call
    zp_dtype = dtype if zero_point.min() >= info.min and zero_point.max() <= info.max else "int32"
    return relax.op.quantize(
        x, _flat(scale, "float32"), _flat(zero_point.astype(zp_dtype), zp_dtype), axis=axis, out_dtype=dtype
    )


# ---------------------------------------------------------------------------- dequantize


def dequantize_split():
    """(pattern, rewriter): ``dequantize`` of integers with constant parameters -> elementwise ops."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.dequantize")(wildcard(), is_const(), is_const()), _split_dequantize


def _split_dequantize(call, _m):
    import tvm
    from tvm import relax

    q, scale, zero_point = call.args
    ndim, dtype = _rank(q), str(q.ty.dtype)
    if ndim is None or dtype not in _INT_DTYPES or str(call.attrs.out_dtype) != "float32" or str(scale.ty.dtype) != "float32":
        return call
    if not str(zero_point.ty.dtype).startswith(("int", "uint")):
        return call
    axis = int(call.attrs.axis) % max(ndim, 1)
    s = _broadcast(_const_array(scale), ndim, axis, "float32")
    z = _broadcast(_const_array(zero_point), ndim, axis, "int32")
    if s is None or z is None:
        return call
    # the legalization: (int32(q) - zp) in int32, the difference cast to float32 times the scale
    if isinstance(q, tvm.ir.expr.Constant):  # a bias: numpy computes the same IEEE float32 ops, no kernel to compile
        return relax.const((_const_array(q).astype(np.int32) - z).astype(np.float32) * s, "float32")
    wide = q if dtype == "int32" else relax.op.astype(q, "int32")
    diff = relax.op.subtract(wide, relax.const(z, "int32"))
    return relax.op.multiply(relax.op.astype(diff, "float32"), relax.const(s, "float32"))


def dequantize_join():
    """(pattern, rewriter): the elementwise form of ``dequantize_split`` -> ``dequantize``."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    q, z, s = wildcard(), is_const(), is_const()
    wide = is_op("relax.astype")(q) | q
    diff = is_op("relax.subtract")(wide, z)
    pattern = is_op("relax.multiply")(is_op("relax.astype")(diff), s)
    return pattern, lambda call, m: _join_dequantize(call, m[wide], m[diff], m[z], m[s])


def _join_dequantize(call, wide, diff, z, s):
    from tvm import relax

    dtypes = [str(e.ty.dtype) for e in (call, diff, z, s)]
    if dtypes != ["float32", "int32", "int32", "float32"]:
        return call
    q = wide
    op = getattr(wide, "op", None)
    if getattr(op, "name", None) == "relax.astype" and str(wide.args[0].ty.dtype) in _INT_DTYPES:
        q = wide.args[0]
    if str(q.ty.dtype) not in _INT_DTYPES:
        return call
    scale, zero_point = _const_array(s), _const_array(z)
    axis = _channel_axis(_rank(q), scale, zero_point)
    if axis is None:
        return call
    dtype = str(q.ty.dtype)
    info = np.iinfo(dtype)
    zp_dtype = dtype if zero_point.min() >= info.min and zero_point.max() <= info.max else "int32"
    return relax.op.dequantize(
        q, _flat(scale, "float32"), _flat(zero_point.astype(zp_dtype), zp_dtype), axis=axis, out_dtype="float32"
    )


# ---------------------------------------------------------------------------- pad


def pad_through_transposes():
    """(pattern, rewriter): ``permute(pad(permute(y, p1)), p2)`` with ``p2`` undoing ``p1``
    -> ``pad(y)``: the pad in ``y``'s layout, its widths permuted."""
    from tvm.relax.dpl import is_op, wildcard

    inner = is_op("relax.permute_dims")(wildcard())
    pad = is_op("relax.nn.pad")(inner)
    return is_op("relax.permute_dims")(pad), lambda call, m: _pad_inside(call, m[pad], m[inner])


def _axes(call, ndim: int) -> list[int]:
    axes = call.attrs.axes
    return list(range(ndim))[::-1] if axes is None else [int(a) % ndim for a in axes]


def _pad_inside(call, pad, inner):
    from tvm import relax

    y = inner.args[0]
    ndim = _rank(y)
    if ndim is None:
        return call
    p1, p2 = _axes(inner, ndim), _axes(call, ndim)
    if [p1[p2[j]] for j in range(ndim)] != list(range(ndim)):
        return call
    widths = [int(w) for w in pad.attrs.pad_width]
    moved = [0] * (2 * ndim)
    for i, k in enumerate(p1):  # axis i of the padded tensor is axis p1[i] of y
        moved[2 * k : 2 * k + 2] = widths[2 * i : 2 * i + 2]
    return relax.op.nn.pad(y, moved, pad_value=float(pad.attrs.pad_value), pad_mode=str(pad.attrs.pad_mode))
