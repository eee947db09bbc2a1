"""The cut: rebuild ``main`` with the removed channels sliced out of every weight constant
(``apply_removal``), or with them multiplied by zero at the original shapes (``mask_channels``,
what the pruned module must compute; calibration reuses the same rebuilding)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

__all__ = ["apply_removal", "mask_channels"]



def _map(vmap, expr):
    from tvm import relax

    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_map(vmap, f) for f in expr.fields])
    return vmap.get(expr, expr)


def _rebuild(func, emit_binding, extra_params=(), extra_outputs=()):
    """A copy of ``func`` whose bindings are re-emitted through ``emit_binding(bb, var,
    original value, value) -> new var`` (``value``: the original with its arguments mapped).

    ``extra_params`` are appended to the parameters; the values of the original variables
    ``extra_outputs`` are returned after the original result, as a tuple.
    """
    from tvm import relax

    bb = relax.BlockBuilder()
    vmap = {}
    attrs = {k: v for k, v in (func.attrs or {}).items() if not (extra_params and k == "num_input")}
    with bb.function("main", [*func.params, *extra_params], attrs=attrs or None, private=False):
        blocks = func.body.blocks
        extras = []
        for i, block in enumerate(blocks):
            dataflow = isinstance(block, relax.DataflowBlock)
            with bb.dataflow() if dataflow else contextlib.nullcontext():
                for binding in block.bindings:
                    value = binding.value
                    if isinstance(value, relax.Call):
                        value = relax.Call(value.op, [_map(vmap, x) for x in value.args], value.attrs, value.ty_args)
                    elif isinstance(value, relax.TupleGetItem):
                        value = relax.TupleGetItem(_map(vmap, value.tuple_value), value.index)
                    else:
                        value = _map(vmap, value)
                    vmap[binding.var] = emit_binding(bb, binding.var, binding.value, value)
                if i == len(blocks) - 1:
                    extras = [bb.emit_output(vmap[v]) if dataflow else vmap[v] for v in extra_outputs]
        result = _map(vmap, func.body.body)
        bb.emit_func_output(relax.Tuple([result, *extras]) if extra_outputs else result)
    return bb.get()["main"]


def _emit(bb, var, value):
    from tvm import relax

    return bb.emit(value, name_hint=var.name) if isinstance(var, relax.DataflowVar) else bb.emit_output(value, name_hint=var.name)


def _with_main(mod, func):
    import tvm
    from tvm import relax

    new = tvm.IRModule({gv: f for gv, f in mod.functions.items()}, attrs=mod.attrs)
    new["main"] = relax.analysis.remove_all_unused(func)
    return new


def apply_removal(mod, a, removed: set, refit: Mapping | None = None):
    """Rewrite ``mod["main"]`` without the channel components ``removed``.

    Parameters
    ----------
    mod : tvm.IRModule
    a : prune_groups.Analysis
        ``analyze(mod["main"], mod)``.
    removed : set of int
        Components (``a.comp(element)``) to cut; they must belong to prunable groups.
    refit : mapping of binding name to ndarray, optional
        Replacement full-size weights (conv ``OIHW``, matmul ``[K, N]``) before slicing.
    """
    from tvm import relax

    from .prune_groups import _const_value, _slice_axis

    refit = refit or {}
    weight_of = {var: w for var, w, _axis in a.sources}

    def kept(var):
        return np.array(a.kept(var, removed), dtype=np.int64)

    def emit(bb, var, orig, value):
        if not isinstance(value, relax.Call) or var not in a.chan or not hasattr(value.op, "name"):
            return _emit(bb, var, value)
        op, args = value.op.name, list(value.args)
        out = kept(var)
        data, src = args[0], orig.args[0]
        if op == "relax.nn.conv2d":
            attrs = value.attrs
            w = refit.get(var.name, weight_of.get(var))
            if w is None:  # depthwise: its filters follow the channels
                w, groups = _const_value(a, orig.args[1])[out], len(out)
            else:
                w, groups = w[out], 1
                if src in a.chan:
                    w = w[:, kept(src)]
            value = relax.op.nn.conv2d(
                data, relax.const(np.ascontiguousarray(w)), strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=groups, data_layout=attrs.data_layout, kernel_layout=attrs.kernel_layout,
                out_layout=attrs.out_layout, out_dtype=attrs.out_dtype,
            )  # fmt: skip
        elif op == "relax.matmul":
            w = refit.get(var.name, weight_of[var])[:, out]
            if src in a.chan:
                w = w[kept(src)]
            value = relax.op.matmul(data, relax.const(np.ascontiguousarray(w)), out_dtype=value.attrs.out_dtype)
        elif op == "relax.nn.batch_norm":
            params = [relax.const(np.ascontiguousarray(_const_value(a, p)[out])) for p in orig.args[1:5]]
            value = relax.Call(value.op, [data, *params], value.attrs, value.ty_args)
        elif op == "relax.reshape":
            shape = list(var.ty.shape.values)
            shape[a.axis[var]] = len(out)
            value = relax.op.reshape(data, shape)
        else:
            ndim = len(var.ty.shape.values)
            n = len(a.chan[var])
            new_args = []
            for x0, x in zip(orig.args, args):
                c = _const_value(a, x0)
                ax = None if c is None else _slice_axis(c, ndim, a.axis[var], n)
                new_args.append(relax.const(np.ascontiguousarray(np.take(c, out, axis=ax))) if ax not in (None, -1) else x)
            value = relax.Call(value.op, new_args, value.attrs, value.ty_args)
        return _emit(bb, var, value)

    return _with_main(mod, _rebuild(mod["main"], emit))


def mask_channels(mod, a, removed: set):
    """``mod`` with the channels ``removed`` multiplied by zero in every tensor that carries
    them: what the pruned module computes, at the original shapes (for checking a rewrite)."""
    from tvm import relax

    def emit(bb, var, orig, value):
        new = _emit(bb, var, value)
        if var not in a.chan or not isinstance(var, relax.DataflowVar) or not isinstance(var.ty, relax.TensorType):
            return new  # tuples (batch_norm): their items are masked
        keep = np.ones(len(a.chan[var]), dtype="float32")
        drop = [j for j in range(len(keep)) if j not in set(a.kept(var, removed))]
        if not drop:
            return new
        keep[drop] = 0.0
        shape = [1] * len(var.ty.shape.values)
        shape[a.axis[var]] = len(keep)
        return bb.emit(relax.op.multiply(new, relax.const(keep.reshape(shape).astype(str(var.ty.dtype)))), name_hint=var.name + "_mask")

    return _with_main(mod, _rebuild(mod["main"], emit))
