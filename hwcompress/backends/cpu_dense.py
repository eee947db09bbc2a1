"""Float matmuls by a constant weight on the CPU: the packed conv kernel, as a 1x1 conv.

``x[..., K] @ W[K, N]`` is a 1x1 NHWC conv of ``x`` seen as ``[1, 1, M, K]`` (``M`` = the
product of the leading dims) by the OHWI weight ``W.T[:, None, None, :]``, which
``cpu_conv`` packs into output-channel panels read contiguously along ``K``. TVM's own
matmul legalization reads ``W[k, n0:n0+tile]`` for one ``k`` after another, a stride of
``N * 4`` bytes: past 1024 columns every ``k`` touches another page, and GEMV ran at a third
of the memory bandwidth (1x2048x2048: 1.0 ms, the packed panels 0.32 ms, OpenBLAS 0.29 ms,
one Zen 3 core).
"""

from __future__ import annotations

import math

import numpy as np

from ..analysis import static_shape

__all__ = ["legalize_matmul"]


def _as_conv(call):
    """``(x shape, weight [K, N])`` when ``call`` is a float32 matmul by a 2-D constant."""
    import tvm

    data, weight = call.args[:2]
    if not isinstance(weight, tvm.ir.expr.GenericConst) or len(weight.ty.shape) != 2:
        return None
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    if str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32" or out_dtype not in ("", "void", "float32"):
        return None
    shape = static_shape(data.ty)
    if shape is None or len(shape) < 1:
        return None
    return shape, weight


def _padded(n: int) -> int:
    """Output channels rounded up with zero weights: to whole vectors (8 lanes), and for more
    than 64 to a multiple of 32, where the packed tile can take 4 vectors (1000 classes:
    a 1-vector tile spent 8 pixel rows on one row of output, 0.74 ms at 1x2048x1000)."""
    step = 32 if n > 64 else 8
    return -(-n // step) * step


def _crop(y, shape):
    """``[1, 1, M, N']`` -> ``shape`` (``[..., N]``, ``N <= N'``)."""
    from tvm import te

    lead = shape[:-1]

    def row(i):
        flat = 0
        for dim, idx in zip(lead, i):
            flat = flat * dim + idx
        return flat

    return te.compute(shape, lambda *i: y[0, 0, row(i[:-1]), i[-1]], name="crop")


def legalize_matmul(inner, conv_legalize):
    """``LegalizeOps`` function for ``relax.matmul``: float32 by a constant 2-D weight becomes
    ``conv_legalize``'s packed 1x1 conv (when it takes the shape), everything else ``inner``."""
    from tvm import relax, topi

    def plan(bb, call):
        """``(x shape, N, the 1x1 conv of a placeholder [1, 1, M, K] input)``, or None."""
        found = _as_conv(call)
        if found is None:
            return None
        shape, weight = found
        k, n = (int(d) for d in weight.ty.shape)
        w_ohwi = np.zeros((_padded(n), 1, 1, k), np.float32)
        w_ohwi[:n, 0, 0, :] = weight.value.numpy().T
        x = relax.Var("x", relax.TensorType((1, 1, math.prod(shape[:-1]), k), "float32"))
        conv = relax.op.nn.conv2d(x, relax.const(w_ohwi), data_layout="NHWC", kernel_layout="OHWI")
        conv = (bb or relax.BlockBuilder()).normalize(conv)
        return (shape, n, conv) if conv_legalize.handles(conv) else None

    def legalize(bb, call):
        found = plan(bb, call)
        if found is None:
            return inner(bb, call)
        shape, n, conv = found
        x = bb.emit_te(topi.reshape, call.args[0], [int(d) for d in conv.args[0].ty.shape], primfunc_name_hint="reshape")
        y = bb.emit(conv_legalize(bb, bb.normalize(relax.Call(conv.op, [x, conv.args[1]], conv.attrs))))
        return bb.call_te(_crop, y, (*shape[:-1], n), primfunc_name_hint="reshape")

    inner_handles = getattr(inner, "handles", lambda call: False)
    legalize.handles = lambda call: inner_handles(call) or plan(None, call) is not None
    return legalize
