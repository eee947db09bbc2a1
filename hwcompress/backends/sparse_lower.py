"""Lowering of 2:4-sparse weights to a backend's sparse kernel, at legalization.

A layer runs sparse when its constant float32 weight *is* 2:4 (at most 2 nonzeros in every 4
consecutive reduction elements: what the ``Sparse24`` pass leaves, or an imported model
pruned to 2:4) and the backend has a kernel for its shape; the graph itself stays an
ordinary dense Relax graph, so verification runs it with plain dense kernels as the
reference. Handled:

* ``relax.matmul`` of float32 ``[..., K]`` by a constant ``[K, N]``: ``W = B.T``;
* ``relax.nn.conv2d`` NHWC / OHWI, one group: the GEMM ``[N*OH*OW, KH*KW*I] x W[O, KH*KW*I]``,
  the input as is for 1x1 stride-1 unpadded convs, else copied into patches (``im2col``,
  padding and strides included).

The kernel (``kernel_for(m, n, k, W) -> (PrimFunc, weights)``, signature ``(x[m, k], *weights,
y[m, n])``; the weights numpy arrays made from ``W[n, k]``: the compressed form of
``passes.sparsity.mask24``, ``values[n, k/2]`` and ``meta[n, ceil(k/8)]``, or a kernel's own
packing of it) is the backend's: ``cpu_sparse`` or ``cuda_sparse``; a shape it does not take
raises ValueError and the layer stays dense.

INT8 (2:4 INT8): a conv / matmul of uint8 data by a constant 2:4 int8 weight with an int32
result (what the int8 quantizer makes of a 2:4 float layer: zeros stay zeros) goes to
``int8_kernel_for(m, n, k, W) -> (PrimFunc, weights)`` (``cpu_sparse_int8``), which also
packs the weight for its kernel; the requantization after it stays a separate kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..analysis import static_shape

from ..passes.sparsity.mask24 import conv_rows, is_2to4

__all__ = ["gemm_shape", "sparse_legalize"]

KERNEL_NAME = "sparse24_gemm"
OPAQUE = 8  # relay/relax OpPatternKind kOpaque


def gemm_shape(call) -> tuple[int, int, int]:
    """``(m, n, k)`` of a matmul / NHWC-OHWI conv as the GEMM its sparse kernel computes: ``m``
    rows of the output (batch x positions for a conv), ``n`` outputs, ``k`` the reduction
    (taps x input channels for a conv). Static shapes only."""
    out = [int(d) for d in call.ty.shape]
    w = [int(d) for d in call.args[1].ty.shape]
    k = w[0] if call.op.name == "relax.matmul" else math.prod(w[1:])
    return math.prod(out[:-1]), out[-1], k


def _plan(call, kernel_for, int8_kernel_for=None):
    """``(kind, W[N, K], (kernel, weights))`` when ``call`` runs sparse, else None."""
    import tvm

    data, weight = call.args[:2]
    if not isinstance(weight, tvm.ir.expr.GenericConst) or static_shape(data.ty) is None:
        return None
    dtypes = (str(data.ty.dtype), str(weight.ty.dtype))
    out_dtype = str(call.attrs.out_dtype) if getattr(call.attrs, "out_dtype", None) is not None else ""
    if dtypes == ("float32", "float32") and out_dtype in ("", "float32"):
        int8 = False
    elif dtypes == ("uint8", "int8") and out_dtype == "int32" and int8_kernel_for is not None:
        int8 = True
    else:
        return None
    w = weight.value.numpy()
    name = call.op.name
    if name == "relax.matmul":
        if w.ndim != 2:
            return None
        gemm, kind = np.ascontiguousarray(w.T), "matmul"
        if not is_2to4(gemm):
            return None
    elif name == "relax.nn.conv2d":
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
        if layouts != ("NHWC", "OHWI", "NHWC") or int(attrs.groups) != 1 or not is_2to4(conv_rows(w)):
            return None
        gemm, kind = w.reshape(w.shape[0], -1), "conv2d"
    else:
        return None
    m, n, k = gemm_shape(call)
    try:
        kernel, weights = (int8_kernel_for if int8 else kernel_for)(m, n, k, gemm)
    except ValueError:
        return None
    return kind, gemm, (kernel, weights)


def sparse_legalize(inner: Callable, kernel_for: Callable, int8_kernel_for: Callable | None = None) -> Callable:
    """A ``LegalizeOps`` function: 2:4 layers become ``kernel_for``'s kernel (``int8_kernel_for``'s
    for uint8 x int8 layers), everything else ``inner`` (the backend's legalization of the op)."""

    def legalize(bb, call):
        plan = _plan(call, kernel_for, int8_kernel_for)
        if plan is None:
            return inner(bb, call)
        kind, gemm, operands = plan
        return _emit(bb, call, kind, gemm, *operands)

    inner_handles = getattr(inner, "handles", lambda call: False)
    legalize.handles = lambda call: _plan(call, kernel_for, int8_kernel_for) is not None or inner_handles(call)
    return legalize


def _emit(bb, call, kind: str, gemm: np.ndarray, kernel, weights: list[np.ndarray]):
    from tvm import relax, topi

    data = call.args[0]
    m, n, k = gemm_shape(call)
    out_shape = static_shape(call.ty)
    out_dtype = "int32" if str(gemm.dtype) == "int8" else "float32"
    if kind == "matmul":
        x = data if len(data.ty.shape) == 2 else bb.emit_te(topi.reshape, data, (m, k), primfunc_name_hint="reshape")
    else:
        attrs = call.attrs
        kh, kw = (int(d) for d in call.args[1].ty.shape.values[1:3])
        pad = [int(p) for p in attrs.padding]
        geometry = (kh, kw, *(int(s) for s in attrs.strides), *(int(d) for d in attrs.dilation), *(pad * 2 if len(pad) == 2 else pad))
        x = bb.emit_te(_im2col, data, geometry, tuple(out_shape), primfunc_name_hint="im2col")
    # opaque to FuseOps: a hand-written kernel takes no fused producer or epilogue
    gvar = bb.add_func(kernel.with_attr("op_pattern", OPAQUE), KERNEL_NAME)
    y = relax.call_tir(gvar, [x, *(relax.const(w) for w in weights)], relax.TensorType((m, n), out_dtype))
    if tuple(out_shape) == (m, n):
        return y
    y = bb.emit(y)
    return bb.call_te(topi.reshape, y, out_shape, primfunc_name_hint="reshape")


def _im2col(data, geometry, out_shape):
    """NHWC ``data`` -> ``[N*OH*OW, KH*KW*C]`` patches, columns in OHWI's ``(kh, kw, c)`` order
    (a 1x1 stride-1 unpadded conv: the input itself, reshaped). ``geometry``: kernel size,
    strides, dilation, padding (top, left, bottom, right)."""
    from tvm import te, topi

    n, h, w, ch = (int(d) for d in data.shape)
    _, oh, ow, _ = out_shape
    kh, kw, sh, sw, dh, dw, *pad = geometry
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pad):
        return topi.reshape(data, (n * h * w, ch))
    if any(pad):
        data = topi.nn.pad(data, [0, pad[0], pad[1], 0], [0, pad[2], pad[3], 0], 0.0)

    def patch(r, col):
        b, pix = r // (oh * ow), r % (oh * ow)
        y, x = pix // ow, pix % ow
        tap, c = col // ch, col % ch
        return data[b, y * sh + (tap // kw) * dh, x * sw + (tap % kw) * dw, c]

    return te.compute((n * oh * ow, kh * kw * ch), patch, name="im2col")
