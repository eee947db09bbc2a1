"""The graph side of data-free quantization (``dfq``): which conv / matmul layers of ``main``
follow each other through channel-keeping ops (``_Graph``, ``_Pair``), the BN statistics
carried along them, and the rewrite that puts rescaled weights, biases and clip bounds back
(``_rewrite``); plus the per-channel math these need. The verbs and their reports are in
``dfq``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONV2D, MATMUL = "relax.nn.conv2d", "relax.matmul"

POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}
MEAN_POOLS = {"relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}  # E[pool(x)] = E[x]
BOUNDS = {"relax.nn.relu", "relax.clip", "relax.maximum", "relax.minimum", "relax.call_tir"}  # clip spellings
HOMOGENEOUS = {"relax.nn.relu", "relax.nn.leakyrelu"}  # f(x / s) = f(x) / s for s > 0


def _ncdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x) / math.sqrt(2)))


def _npdf(x):
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)


def clipped_normal_mean(mu, sigma, lo=-np.inf, hi=np.inf) -> np.ndarray:
    """``E[clip(y, lo, hi)]`` for ``y ~ N(mu, sigma^2)``, element-wise (ReLU: ``lo=0``)."""
    mu, sigma, lo, hi = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (mu, sigma, lo, hi)))
    sig = np.where(sigma > 0, sigma, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = (lo - mu) / sig, (hi - mu) / sig
        pa, pb = _ncdf(a), _ncdf(b)
        mean = mu * (pb - pa) + sig * (_npdf(a) - _npdf(b))
        mean = mean + np.where(np.isfinite(lo), lo * pa, 0.0) + np.where(np.isfinite(hi), hi * (1 - pb), 0.0)
    return np.where(sigma > 0, mean, np.clip(mu, lo, hi))


def _in_ranges(w: np.ndarray, groups: int) -> np.ndarray:
    """Range per input channel of a canonical ``[O, I / groups, ...]`` weight."""
    o, ipg = w.shape[:2]
    return np.abs(w).reshape(groups, o // groups, ipg, -1).max(axis=(1, 3)).reshape(-1)


def _scale_inputs(w: np.ndarray, groups: int, f: np.ndarray) -> np.ndarray:
    o, ipg = w.shape[:2]
    return (w.reshape(groups, o // groups, ipg, -1) * f.reshape(groups, 1, ipg, 1)).reshape(w.shape)


# ---------------------------------------------------------------------------- graph analysis


def _is_const(expr) -> bool:
    return type(expr).__name__ == "GenericConst"


def _op(value) -> str | None:
    return getattr(getattr(value, "op", None), "name", None)


def _shape(expr):
    try:
        return tuple(int(d) for d in expr.ty.shape.values)
    except (AttributeError, TypeError, ValueError):
        return None


def _prim(value) -> float:
    """A scalar attribute / argument (``R.clip``'s bounds: FloatImm or PrimValue) as a float."""
    while hasattr(value, "value"):
        value = value.value
    return float(value)


def _reduced(value, axis: int, ndim_in: int, index: np.ndarray):
    """Channel axis and map after ``mean(x, axes)`` (GlobalAveragePool), None when it averages
    the channels."""
    axes = value.attrs.axis
    axes = list(range(ndim_in)) if axes is None else [int(a) % ndim_in for a in axes]
    if axis in axes:
        return None
    return (axis if value.attrs.keepdims else axis - sum(a < axis for a in axes)), index


def _reshaped(src, dst, axis: int, index: np.ndarray):
    """Channel axis and position->channel map after ``reshape(src -> dst)``, or None when it
    splits or mixes the channel axis; a flatten repeats each channel ``rest`` times."""
    if src is None or dst is None:
        return None
    lead, rest, c = math.prod(src[:axis]), math.prod(src[axis + 1 :]), src[axis]
    for b in range(len(dst)):
        if math.prod(dst[:b]) != lead:
            continue
        if dst[b] == c and math.prod(dst[b + 1 :]) == rest:
            return b, index
        if b == len(dst) - 1 and dst[b] == c * rest:
            return b, np.repeat(index, rest)
    return None


@dataclass(eq=False)
class _Layer:
    """A ``conv2d`` / ``matmul`` binding with a constant float weight, kept in the canonical
    form ``[O, I / groups, *kernel]`` (a matmul's ``[K, N]`` as ``[N, K]``), float64."""

    var: object
    call: object
    name: str
    weight: np.ndarray
    dtype: str
    groups: int
    perm: tuple | None  # kernel layout -> canonical axes; None: matmul
    out_axis: int  # channel axis of the output
    in_axis: int  # channel axis of the data input
    bias_var: object = None  # the ``add`` binding of the bias
    bias: np.ndarray | None = None

    @property
    def out_var(self):
        return self.var if self.bias_var is None else self.bias_var

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def native_weight(self) -> np.ndarray:
        w = self.weight.T if self.perm is None else self.weight.transpose(np.argsort(self.perm))
        return np.ascontiguousarray(w).astype(self.dtype)


@dataclass(eq=False)
class _Bound:
    """A clip-like op between an equalized pair whose bounds scale with the channels."""

    var: object
    src: tuple  # where its input is: ("arg", k) or ("tir", k) (call_tir's argument tuple)
    lo: np.ndarray
    hi: np.ndarray
    axis: int
    ndim: int
    index: np.ndarray  # position along axis -> layer 1 channel


@dataclass(eq=False)
class _Pair:
    l1: _Layer
    l2: _Layer
    via: tuple
    bounds: list
    index: np.ndarray  # layer 2 input channel -> layer 1 channel

    def r2(self) -> np.ndarray:
        r = np.zeros(self.l1.weight.shape[0])
        np.maximum.at(r, self.index, _in_ranges(self.l2.weight, self.l2.groups))
        return r

    def apply(self, s: np.ndarray, stats: dict) -> None:
        l1, l2 = self.l1, self.l2
        l1.weight = l1.weight / s.reshape(-1, *[1] * (l1.weight.ndim - 1))
        if l1.bias is not None:
            l1.bias = l1.bias / s
        for b in self.bounds:
            b.lo, b.hi = b.lo / s[b.index], b.hi / s[b.index]
        l2.weight = _scale_inputs(l2.weight, l2.groups, s[self.index])
        name = l1.out_var.name
        if name in stats:
            mean, std, axis = stats[name]
            stats[name] = (mean / s, std / s, axis)


class _Graph:
    """Bindings of a Relax ``main``: values, users (None: the function's result), the
    constant-valued expressions and the conv / matmul layers."""

    def __init__(self, func):
        from tvm import relax

        self.func, self.var2val, self.users, self.order, self._consts = func, {}, {}, [], {}
        for block in func.body.blocks:
            for binding in block.bindings:
                self.var2val[binding.var] = binding.value
                self.order.append(binding.var)
                for v in relax.analysis.free_vars(binding.value):
                    self.users.setdefault(v, []).append(binding.var)
        for v in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(v, []).append(None)
        self.layers = self._find_layers()

    def const(self, expr):
        """numpy value of a constant, or of an expression of constants the importer emits
        (bias ``reshape``, Gemm ``permute_dims``, Clip's ``where(isnan(c), inf, c)``); else None."""
        from tvm import relax

        if _is_const(expr):
            return expr.value.numpy()
        if isinstance(expr, relax.Var):
            if expr not in self._consts:
                value = self.var2val.get(expr)
                self._consts[expr] = None if value is None else self.const(value)
            return self._consts[expr]
        op = _op(expr)
        if op not in ("relax.reshape", "relax.permute_dims", "relax.astype", "relax.isnan", "relax.where"):
            return None
        n = 3 if op == "relax.where" else 1
        args = [self.const(a) for a in expr.args[:n]]
        if any(a is None for a in args):
            return None
        if op == "relax.reshape":
            shape = _shape(expr)
            return None if shape is None else args[0].reshape(shape)
        if op == "relax.permute_dims":
            axes = expr.attrs.axes
            return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
        if op == "relax.astype":
            return args[0].astype(str(expr.attrs.dtype))
        return np.isnan(args[0]) if op == "relax.isnan" else np.where(*args)

    def _find_layers(self) -> list[_Layer]:
        from tvm import relax

        from ..fold_bn import _channel_vector

        layers, counts = [], {CONV2D: 0, MATMUL: 0}
        for var in self.order:
            call = self.var2val[var]
            op = _op(call)
            if op not in counts or not isinstance(call, relax.Call):
                continue
            name = f"{op.rsplit('.', 1)[1]}[{counts[op]}]"  # int8's site names
            counts[op] += 1
            w, out_shape, in_shape = self.const(call.args[1]), _shape(call), _shape(call.args[0])
            if w is None or w.dtype.kind != "f" or out_shape is None or in_shape is None:
                continue
            if op == CONV2D:
                attrs = call.attrs
                kl, dl, ol = str(attrs.kernel_layout), str(attrs.data_layout), str(attrs.out_layout or attrs.data_layout)
                if sorted(kl) != sorted("OIHW") or sorted(dl) != sorted("NCHW") or sorted(ol) != sorted("NCHW"):
                    continue
                perm = tuple(kl.index(c) for c in "OIHW")
                layer = _Layer(var, call, name, w.transpose(perm).astype(np.float64), str(w.dtype), int(attrs.groups), perm, ol.index("C"), dl.index("C"))
            else:
                if w.ndim != 2:
                    continue
                layer = _Layer(var, call, name, w.T.astype(np.float64), str(w.dtype), 1, None, len(out_shape) - 1, len(in_shape) - 1)
            users = self.users.get(var, [])
            add = self.var2val.get(users[0]) if len(users) == 1 and users[0] is not None else None
            if _op(add) == "relax.add" and _shape(add) == out_shape and any(a.same_as(var) for a in add.args):
                c = self.const(add.args[1] if add.args[0].same_as(var) else add.args[0])
                vec = None if c is None else _channel_vector(c, len(out_shape), layer.out_axis, layer.weight.shape[0])
                if vec is not None:
                    layer.bias_var, layer.bias = users[0], np.array(vec, np.float64)
            layers.append(layer)
        return layers

    def bound(self, value, x, axis: int, n: int):
        """``(lo, hi)`` per position if ``value`` is ``clip(x, lo, hi)`` in some spelling (ReLU,
        ReLU6, ``R.clip``, ``maximum`` / ``minimum`` with a constant, the importer's Clip
        ``call_tir``), with where its input sits; else None."""
        from ..fold_bn import _channel_vector

        op, ndim = _op(value), len(_shape(x) or ())
        if op is None:  # not a call (e.g. a variable bound to another)
            return None
        lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
        if op == "relax.nn.relu" and value.args[0].same_as(x):
            return np.zeros(n), hi, ("arg", 0)
        if op == "relax.clip" and value.args[0].same_as(x):
            return np.full(n, _prim(value.args[1])), np.full(n, _prim(value.args[2])), ("arg", 0)
        if op == "relax.call_tir":
            kind = "relax." + str(value.args[0].name_hint).rstrip("0123456789_")
            args, where = list(value.args[1].fields), "tir"
        else:
            kind, args, where = op, list(value.args), "arg"
        if kind not in ("relax.maximum", "relax.minimum") or len(args) != 2 or sum(a.same_as(x) for a in args) != 1:
            return None
        k = 0 if args[0].same_as(x) else 1
        c = self.const(args[1 - k])
        vec = None if c is None else _channel_vector(c, ndim, axis, n)
        if vec is None:
            return None
        vec = np.array(vec, np.float64)
        return (vec, hi, (where, k)) if kind == "relax.maximum" else (lo, vec, (where, k))

    def chain(self, l1: _Layer, layers: dict, rescale_clip: bool):
        """The pair starting at ``l1`` (``_Pair``, None) or (None, why there is none)."""
        cur, axis, index = l1.out_var, l1.out_axis, np.arange(l1.weight.shape[0])
        via, bounds = [], []
        while True:
            users = self.users.get(cur, [])
            if users == [None]:
                return None, "output of the function"
            if len(users) != 1 or users[0] is None:
                return None, f"{cur.name} has {len(users)} users (residual / branch)"
            var = users[0]
            value = self.var2val[var]
            op = _op(value) or type(value).__name__
            if op == "relax.call_tir":  # the importer's Clip: name it by its kernel
                op = str(value.args[0].name_hint)
            l2 = layers.get(var)
            if l2 is not None:
                if not value.args[0].same_as(cur):
                    return None, f"{l2.name} takes it as its weight"
                if axis != l2.in_axis or len(index) != l2.in_channels:
                    return None, f"{l2.name} has its input channels on another axis"
                return _Pair(l1, l2, tuple(via), bounds, index), None
            shape = _shape(var)
            bound = self.bound(value, cur, axis, len(index)) if shape == _shape(cur) else None
            if bound is not None:
                lo, hi, src = bound
                if np.any(np.isfinite(lo) & (lo != 0)) or np.any(np.isfinite(hi)):
                    if not rescale_clip:
                        return None, f"{op} bounds are not scale-invariant (rescale_clip=False)"
                    bounds.append(_Bound(var, src, lo, hi, axis, len(shape), index))
            elif op in HOMOGENEOUS:
                pass
            elif op in POOLS:
                layout = value.attrs.layout
                if str(layout).index("C") != axis or str(value.attrs.out_layout or layout) != str(layout):
                    return None, f"{op} in another layout"
            elif op == "relax.mean":
                moved = _reduced(value, axis, len(_shape(cur)), index)
                if moved is None:
                    return None, "mean over the channels"
                axis, index = moved
            elif op == "relax.reshape":
                moved = _reshaped(_shape(cur), shape, axis, index)
                if moved is None:
                    return None, "reshape that mixes channels"
                axis, index = moved
            else:
                return None, f"{op.removeprefix('relax.')} between"
            via.append(op.removeprefix("relax."))
            cur = var

    def input_mean(self, layer: _Layer, stats: dict):
        """``E[x]`` per input channel of ``layer`` from BN statistics: ``(mean, None)`` or
        ``(None, reason)``."""
        from tvm import relax

        cur, ops = layer.call.args[0], []
        while getattr(cur, "name", None) not in stats:
            value = self.var2val.get(cur)
            op = _op(value)
            if value is None:
                return None, "input is a function parameter"
            if op in ("relax.reshape", "relax.mean") or op in MEAN_POOLS:
                ops.append((cur, value, op, value.args[0]))
                cur = value.args[0]
                continue
            args = list(value.args[1].fields) if op == "relax.call_tir" else list(value.args) if isinstance(value, relax.Call) else []
            src = [a for a in args if isinstance(a, relax.Var) and self.const(a) is None]
            if op in BOUNDS and len(src) == 1 and _shape(src[0]) == _shape(cur):
                ops.append((cur, value, "bound", src[0]))
                cur = src[0]
                continue
            return None, f"input comes from {(op or type(value).__name__).removeprefix('relax.')}"
        mean, std, axis = stats[cur.name]
        lo, hi, index, moved = np.full(len(mean), -np.inf), np.full(len(mean), np.inf), np.arange(len(mean)), False
        for var, value, op, x in reversed(ops):
            if op == "bound":
                bound = None if moved else self.bound(value, x, axis, len(mean))
                if bound is None:
                    return None, f"input comes through {_op(value).removeprefix('relax.')}"
                lo, hi = np.maximum(lo, bound[0]), np.minimum(hi, bound[1])
            elif op in ("relax.reshape", "relax.mean"):
                r = _reshaped(_shape(x), _shape(var), axis, index) if op == "relax.reshape" else _reduced(value, axis, len(_shape(x)), index)
                if r is None:
                    return None, f"{op.removeprefix('relax.')} that mixes channels"
                (axis, index), moved = r, True
            else:
                if str(value.attrs.layout).index("C") != axis:
                    return None, f"{op} in another layout"
                moved = True
        if np.any(lo > hi) or axis != layer.in_axis or len(index) != layer.in_channels:
            return None, "statistics do not match the input channels"
        return clipped_normal_mean(mean, std, lo, hi)[index], None


# ---------------------------------------------------------------------------- rewrite


def _channel_const(values: np.ndarray, axis: int, ndim: int, dtype: str):
    from tvm import relax

    shape = [1] * ndim
    shape[axis] = len(values)
    return relax.const(np.asarray(values).reshape(shape).astype(dtype))


def _rewrite(mod, layers, bounds=()):
    """``mod`` with ``layers``' weights and biases and ``bounds``' constants as they are now
    (a layer that had no bias gets an ``add``); every other binding is kept."""
    from tvm import relax

    from ..prune_rewrite import _emit, _rebuild, _with_main

    by_var = {layer.var: layer for layer in layers}
    by_bias = {layer.bias_var: layer for layer in layers if layer.bias_var is not None}
    by_bound = {b.var: b for b in bounds}

    def emit(bb, var, orig, value):
        if var in by_var:
            layer = by_var[var]
            w = relax.const(layer.native_weight())
            call = relax.op.matmul(value.args[0], w, out_dtype=value.attrs.out_dtype) if layer.perm is None else relax.Call(value.op, [value.args[0], w], value.attrs)
            if layer.bias is None or layer.bias_var is not None:
                return _emit(bb, var, call)
            ndim = len(_shape(orig))
            bias = layer.bias if layer.perm is None else layer.bias.reshape([-1 if a == layer.out_axis else 1 for a in range(ndim)])
            return _emit(bb, var, relax.op.add(bb.emit(call, name_hint=var.name + "_nobias"), relax.const(bias.astype(layer.dtype))))
        if var in by_bias:
            layer = by_bias[var]
            x = value.args[0] if orig.args[0].same_as(layer.var) else value.args[1]
            ndim = len(_shape(orig))
            bias = layer.bias if layer.perm is None else layer.bias.reshape([-1 if a == layer.out_axis else 1 for a in range(ndim)])
            return _emit(bb, var, relax.op.add(x, relax.const(bias.astype(layer.dtype))))
        if var in by_bound:
            b = by_bound[var]
            where, k = b.src
            x = value.args[1].fields[k] if where == "tir" else value.args[k]
            dtype = str(orig.ty.dtype)
            if np.all(b.lo == 0):
                x = relax.op.nn.relu(x)
            elif np.any(np.isfinite(b.lo)):
                x = relax.op.maximum(x, _channel_const(b.lo, b.axis, b.ndim, dtype))
            if np.any(np.isfinite(b.hi)):
                if not isinstance(x, relax.Var):
                    x = bb.emit(x, name_hint=var.name + "_lo")
                x = relax.op.minimum(x, _channel_const(b.hi, b.axis, b.ndim, dtype))
            return _emit(bb, var, x)
        return _emit(bb, var, value)

    return _with_main(mod, _rebuild(mod["main"], emit))
