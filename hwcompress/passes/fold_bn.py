"""Fold inference BatchNorm into the preceding conv / matmul's weights and bias.

``y = gamma * (W*x + b - mean) / sqrt(var + eps) + beta`` is ``W'*x + b'`` with
``W' = W * s`` (scaled along the output-channel axis) and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``. After the rewrite no ``batch_norm`` and no BN arithmetic is
left for run time.

Matched producers (weights and BN statistics must be constants):

* ``conv1d`` / ``conv2d`` (any groups, so depthwise and grouped too), with or without a bias
  ``add`` (ONNX ``Conv`` with bias imports as ``conv2d -> add(reshape(bias))``; TVM's own
  ``FoldBatchnormToConv2D`` matches only ``conv2d -> batch_norm``);
* ``matmul(x, W)`` / ``matmul(x, permute_dims(W))`` (ONNX MatMul / Gemm), with or without a
  bias ``add``, normalized along the last axis.

A producer whose output is also used elsewhere is left alone: folding would compute it twice.
In hwcompress's usual flow ONNX Runtime's basic optimizations already fold ``Conv + BN`` and
``MatMul + BN`` in the ONNX graph; this pass covers what they leave (``Gemm + BN``) and every
module imported without that normalization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FoldBatchNorm", "FoldBatchNormPass", "bn_scale_shift", "fold_bn", "fold_scale_shift"]


@dataclass(frozen=True)
class FoldBatchNorm:
    """Fold inference BatchNorm into the preceding conv / matmul.

    Parameters
    ----------
    matmul : bool
        Also fold BN after ``matmul`` (ONNX Gemm / MatMul), not only after convolutions.
    """

    matmul: bool = True

    def __post_init__(self):
        if not isinstance(self.matmul, bool):
            raise TypeError(f"FoldBatchNorm.matmul must be a bool, got {self.matmul!r}")


# ---------------------------------------------------------------------------- math (numpy)


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` with ``bn(y) == y * scale + shift`` (float64).

    ``gamma`` / ``beta`` may be None (BN without scale / center).
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    if eps < 0 or np.any(var + eps <= 0):
        raise ValueError("BatchNorm variance + epsilon must be positive")
    scale = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        scale = scale * np.asarray(gamma, dtype=np.float64)
    shift = -mean * scale
    if beta is not None:
        shift = shift + np.asarray(beta, dtype=np.float64)
    return scale, shift


def fold_scale_shift(weight: np.ndarray, bias, scale: np.ndarray, shift: np.ndarray, out_axis: int):
    """Fold ``y * scale + shift`` into a linear layer's ``weight`` and ``bias``.

    Parameters
    ----------
    weight : ndarray
        The weight; ``out_axis`` is its output-channel axis (0 for OIHW convs, whatever the
        groups; -1 for a ``[K, N]`` matmul weight).
    bias : ndarray or None
        Per-output-channel bias of length ``N`` (None: no bias).
    scale, shift : ndarray
        Per-output-channel, length ``N``.

    Returns
    -------
    (weight, bias) : tuple of ndarray
        In ``weight``'s dtype; the bias has length ``N``.
    """
    weight = np.asarray(weight)
    n = weight.shape[out_axis]
    if scale.shape != (n,) or shift.shape != (n,):
        raise ValueError(f"scale/shift must have shape ({n},), got {scale.shape} and {shift.shape}")
    bshape = [1] * weight.ndim
    bshape[out_axis] = n
    w = weight.astype(np.float64) * scale.reshape(bshape)
    b = np.zeros(n) if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64), (n,))
    return w.astype(weight.dtype), (b * scale + shift).astype(weight.dtype)


def _channel_vector(value: np.ndarray, out_ndim: int, axis: int, n: int):
    """``value`` (broadcast against an ``out_ndim`` output) as a length-``n`` vector along
    ``axis``, or None when it varies along another axis."""
    if value.ndim > out_ndim:
        return None
    shape = (1,) * (out_ndim - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, n):
        return None
    return np.broadcast_to(value.reshape(-1), (n,))


# ---------------------------------------------------------------------------- patterns + rewriter


def _bn_pattern(fold_matmul: bool):
    """``batch_norm(producer, 4 consts)[0]``; producer: conv / matmul with a constant weight,
    optionally plus a constant bias. Returns the pattern and its named parts."""
    from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, wildcard

    weight = is_const()
    permuted = None
    anchor = is_op("relax.nn.conv2d")(wildcard(), weight) | is_op("relax.nn.conv1d")(wildcard(), weight)
    if fold_matmul:
        permuted = is_op("relax.permute_dims")(weight)
        anchor = anchor | is_op("relax.matmul")(wildcard(), weight | permuted)
    bias = is_const() | is_op("relax.reshape")(is_const(), wildcard())
    biased = is_op("relax.add")(anchor, bias)
    bn = is_op("relax.nn.batch_norm")(anchor | biased, *(is_const() for _ in range(4)))
    return is_tuple_get_item(bn, 0), {"anchor": anchor, "weight": weight, "permuted": permuted, "bias": bias, "biased": biased, "bn": bn}


def _rewrite_bn(matched, m, parts, single_use):
    """Rewriter of ``_bn_pattern``: the producer with BN folded in, or ``matched`` unchanged
    when it cannot fold (a shared producer, a BN along another axis, training mode).

    ``single_use(var, value)``: ``var`` is bound to ``value`` and has exactly one user.
    """
    from tvm import relax

    bn, anchor = m[parts["bn"]], m[parts["anchor"]]
    biased = m.get(parts["biased"])
    # The matcher looks through bindings: each value between the anchor and the BN must be
    # bound to a variable that only the next op of the chain uses.
    if biased is None:
        shared = not single_use(bn.args[0], anchor)
    else:
        anchor_vars = [a for a in biased.args if isinstance(a, relax.Var)]
        shared = not single_use(bn.args[0], biased) or not any(single_use(v, anchor) for v in anchor_vars)
    if shared or bool(bn.attrs.training):
        return matched

    out_shape = _static_shape(anchor)
    if out_shape is None:
        return matched
    ndim = len(out_shape)
    bn_axis = int(bn.attrs.axis) % ndim
    if anchor.op.name == "relax.matmul":
        weight = _const_value(m[parts["weight"]])
        permute = m.get(parts["permuted"])  # ONNX Gemm(transB=1) imports as matmul(x, permute_dims(W))
        if permute is not None:
            axes = permute.attrs.axes
            weight = np.transpose(weight, None if axes is None else [int(a) for a in axes])
        if weight.ndim != 2 or bn_axis != ndim - 1:
            return matched
        w_axis, n = 1, weight.shape[1]
    else:
        layout = str(anchor.attrs.out_layout or anchor.attrs.data_layout)
        weight = _const_value(m[parts["weight"]])
        w_axis = str(anchor.attrs.kernel_layout).index("O")
        n = weight.shape[w_axis]
        if bn_axis != layout.index("C"):
            return matched
    if not np.issubdtype(weight.dtype, np.floating):
        return matched

    bias = None
    if biased is not None:
        b_expr = m[parts["bias"]]
        b_shape = _static_shape(b_expr)
        if b_shape is None:
            return matched
        bias = _channel_vector(_const_value(_const_of(b_expr)).reshape(b_shape), ndim, bn_axis, n)
        if bias is None:
            return matched
    gamma, beta, mean, var = (_const_value(a) for a in bn.args[1:])
    if np.any(var + float(bn.attrs.epsilon) <= 0):  # not a valid inference BN: leave it as is
        return matched
    scale, shift = bn_scale_shift(
        gamma.reshape(-1) if bool(bn.attrs.scale) else None,
        beta.reshape(-1) if bool(bn.attrs.center) else None,
        mean.reshape(-1),
        var.reshape(-1),
        float(bn.attrs.epsilon),
    )
    if scale.shape != (n,):
        return matched
    new_w, new_b = fold_scale_shift(weight, bias, scale, shift, w_axis)
    b_shape = [1] * ndim
    b_shape[bn_axis] = n
    if anchor.op.name == "relax.matmul":
        new_anchor = relax.op.matmul(anchor.args[0], relax.const(new_w), out_dtype=anchor.attrs.out_dtype)
        b_shape = [n]
    else:
        new_anchor = relax.Call(anchor.op, [anchor.args[0], relax.const(new_w)], anchor.attrs)
    return relax.op.add(new_anchor, relax.const(new_b.reshape(b_shape)))


def _is_const(expr) -> bool:
    return type(expr).__name__ == "GenericConst"


def _const_of(expr):
    """The constant inside ``reshape(const)`` (or ``expr`` itself)."""
    return expr if _is_const(expr) else expr.args[0]


def _const_value(expr) -> np.ndarray:
    return expr.value.numpy()


def _static_shape(expr):
    shape = getattr(expr.ty, "shape", None)
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- pass + verb


class FoldBatchNormPass:
    """Function pass folding BN into conv / matmul (``fold_bn_pass(config)`` builds it)."""

    def __init__(self, config: FoldBatchNorm):
        self.config = config

    def transform_function(self, func, mod, ctx):
        from tvm import relax
        from tvm.relax.dpl import rewrite_call

        from ..analysis import single_use_checker

        if not isinstance(func, relax.Function):
            return func
        single_use = single_use_checker(func)
        pattern, parts = _bn_pattern(self.config.matmul)
        func = rewrite_call(pattern, lambda matched, m: _rewrite_bn(matched, m, parts, single_use), func)
        return relax.analysis.remove_all_unused(func)


def fold_bn_pass(config: FoldBatchNorm = FoldBatchNorm()):
    """``FoldBatchNormPass`` as a ``tvm.transform.Pass`` (for a ``Sequential``)."""
    from tvm import relax

    return relax.transform.function_pass(opt_level=0, name="hwc.FoldBatchNorm")(FoldBatchNormPass)(config)


def fold_bn(mod, config: FoldBatchNorm = FoldBatchNorm()):
    """Fold inference BatchNorm into the preceding conv / matmul of every Relax function.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported (before ``build.legalize``).
    config : FoldBatchNorm

    Returns
    -------
    tvm.IRModule
        A new module; BNs that cannot fold are left for ``DecomposeOpsForInference``.
    """
    return fold_bn_pass(config)(mod)
