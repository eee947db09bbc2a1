"""Conv / matmul epilogue fusion: conv + bias + residual add + activation as one kernel.

What TVM does without this pass (``build.legalize``: ``LegalizeOps``, ``FuseOps``,
``FuseTIR``): its operator-pattern fusion already puts a conv's elementwise consumers (bias,
BN arithmetic, activation, residual add) into the conv's kernel. This pass makes those kernel
boundaries explicit with dpl patterns, so that they do not depend on ``FuseOps``' heuristics
and the residual add can be kept out (``Fuse(residual=False)``) to measure what it brings:

* ``canonicalize_clip``: the ONNX importer lowers ``Clip(x, lo, hi)`` with constant bounds to
  two ``call_tir`` (maximum, minimum) fed by ``where(isnan(c), -+inf, c)``; this rewrites them
  to ``R.clip(x, lo, hi)`` so that ReLU6 is one recognizable op with immediate bounds.
* ``FuseOpsByPattern`` groups ``anchor [+ bias] [+ residual] [+ activation]`` into a private
  ``Primitive`` function; ``LegalizeOps`` + ``FuseTIR`` (in ``build.legalize_passes``) turn each
  group into one PrimFunc.

``build.legalize_passes(fuse)`` is the legalize pass list with fusion switchable: with
``fuse=False`` nothing is fused (every op is its own kernel, the benchmark's baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Fuse", "canonicalize_clip", "epilogue_patterns", "fuse", "order_residual_adds"]


@dataclass(frozen=True)
class Fuse:
    """Fuse conv / matmul + bias + activation (+ residual add) into one kernel.

    Parameters
    ----------
    residual : bool
        Let a residual ``add`` (two computed tensors) join the producing conv's kernel.
    """

    residual: bool = True

    def __post_init__(self):
        if not isinstance(self.residual, bool):
            raise TypeError(f"Fuse.residual must be a bool, got {self.residual!r}")


# ---------------------------------------------------------------------------- Clip -> R.clip


def _clip_pattern():
    """``minimum(maximum(x, where(isnan(lo), -inf, lo)), where(isnan(hi), inf, hi))`` as the
    importer emits ``Clip`` (two ``call_tir``), with constant scalar bounds."""
    from tvm.relax.dpl import is_const, is_op, is_tuple, wildcard

    def bound():
        c = is_const()
        return is_op("relax.where")(is_op("relax.isnan")(c), is_const(), c) | is_const()

    x, lo, hi = wildcard(), bound(), bound()
    lower = is_op("relax.call_tir")(wildcard(), is_tuple([x, lo]))
    upper = is_op("relax.call_tir")(wildcard(), is_tuple([lower, hi]))
    return upper, {"x": x, "lo": lo, "hi": hi, "lower": lower}


def _rewrite_clip(matched, m, parts):
    """Rewriter of ``_clip_pattern``: ``R.clip(x, lo, hi)``, or ``matched`` if it is not a Clip."""
    from tvm import relax

    lower = m[parts["lower"]]
    lo, hi = _bound_value(m[parts["lo"]], -1.0), _bound_value(m[parts["hi"]], 1.0)
    # The importer's PrimFuncs are named after the topi op ("maximum", "maximum1", ...).
    if lo is None or hi is None or _tir_name(lower) != "maximum" or _tir_name(matched) != "minimum":
        return matched
    return relax.op.clip(m[parts["x"]], relax.prim_value(lo), relax.prim_value(hi))


def _tir_name(call) -> str:
    return getattr(call.args[0], "name_hint", "").rstrip("0123456789")


def _bound_value(expr, sign: float):
    """The scalar of ``where(isnan(c), sign*inf, c)`` or of a constant ``c``; None if ``expr``
    is neither or not a scalar."""
    if type(expr).__name__ != "GenericConst":
        fill = expr.args[1].value.numpy()
        if fill.size != 1 or float(fill.reshape(-1)[0]) != sign * math.inf:
            return None
        expr = expr.args[2]
    value = expr.value.numpy()
    if value.size != 1:
        return None
    v = float(value.reshape(-1)[0])
    return sign * math.inf if math.isnan(v) else v


def canonicalize_clip(mod):
    """Rewrite the importer's constant-bound ``Clip`` (maximum + minimum) to ``R.clip``."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    pattern, parts = _clip_pattern()
    out = tvm.IRModule({}, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule({})
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = relax.analysis.remove_all_unused(rewrite_call(pattern, lambda e, m: _rewrite_clip(e, m, parts), func))
        out[gv] = func
    return out


# ---------------------------------------------------------------------------- residual adds


def _add_pattern():
    from tvm.relax.dpl import is_op, wildcard

    return is_op("relax.add")(wildcard(), wildcard())


def _rewrite_add_order(matched, position):
    """Rewriter of ``_add_pattern``: the later-computed operand first.

    The matcher tries ``add``'s operands in the written order, so with the later value first
    ``conv + residual`` takes the conv that feeds the add directly rather than one the
    other operand is computed from (then the group would be its own input).
    """
    from tvm import relax

    a, b = matched.args
    if isinstance(a, relax.Var) and isinstance(b, relax.Var) and position(a) < position(b):
        return relax.op.add(b, a)
    return matched


def order_residual_adds(mod):
    """Put the later-computed operand of every two-variable ``add`` first (exact: float
    addition commutes)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    out = tvm.IRModule({}, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule({})
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            order = {}
            for block in func.body.blocks:
                for binding in block.bindings:
                    order[binding.var] = len(order)
            func = rewrite_call(_add_pattern(), lambda e, m: _rewrite_add_order(e, lambda v: order.get(v, -1)), func)
        out[gv] = func
    return out


# ---------------------------------------------------------------------------- epilogue patterns


def _activations():
    """Activation patterns over an input pattern ``y``, by name, as the importer emits them."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    def clip(y):  # ReLU6 and any other constant-bound Clip (bounds are PrimValues)
        return is_op("relax.clip")(y, wildcard(), wildcard())

    return {
        "relu": lambda y: is_op("relax.nn.relu")(y),
        "clip": clip,
        "leakyrelu": lambda y: is_op("relax.nn.leakyrelu")(y),
        "sigmoid": lambda y: is_op("relax.sigmoid")(y),
        # HardSwish: x * clip(x + 3, 0, 6) / 6 (TVM's importer) ...
        "hardswish": lambda y: is_op("relax.multiply")(
            y, is_op("relax.divide")(clip(is_op("relax.add")(y, is_const())), is_const())
        ),
        # ... or x * HardSigmoid(x) = x * clip(alpha * x + beta, 0, 1) (ONNX Runtime's form).
        "hardswish_hs": lambda y: is_op("relax.multiply")(
            y, clip(is_op("relax.add")(is_op("relax.multiply")(is_const(), y), is_const()))
        ),
    }


def epilogue_patterns(config: Fuse, depends_on, backend_owns=None):
    """``FusionPattern`` list, longest first: anchor [+ bias] [+ residual] [+ activation].

    ``depends_on(expr, var)`` tells whether ``expr`` is computed from ``var``; a residual
    operand computed from the group's own output would make the group its own input.
    ``backend_owns(call)``: the target's backend lowers this anchor itself and needs its
    constant weight (the CPU's packed conv), which a group would turn into a parameter; such
    anchors are left to TVM's FuseOps, which fuses the same epilogue after legalization.
    """
    from tvm.relax.dpl import is_const, is_op, wildcard
    from tvm.relax.transform import FusionPattern

    weight = is_const()
    anchor = (
        is_op("relax.nn.conv2d")(wildcard(), weight)
        | is_op("relax.nn.conv1d")(wildcard(), weight)
        | is_op("relax.matmul")(wildcard(), weight | is_op("relax.permute_dims")(weight))
    )
    bias = is_op("relax.add")(anchor, is_const() | is_op("relax.reshape")(is_const(), wildcard()))

    def check(ctx) -> bool:
        if backend_owns is not None and backend_owns(ctx.annotated_expr["anchor"]):
            return False
        other = ctx.annotated_expr.get("residual")
        if other is None:
            return True
        if type(other).__name__ == "GenericConst":  # x + 3 of HardSwish is not a residual
            return False
        anchor_var = ctx.value_to_bound_var.get(ctx.annotated_expr["anchor"])
        return anchor_var is not None and not depends_on(other, anchor_var)

    patterns = []
    for res in (True, False) if config.residual else (False,):
        for base_name, base in (("conv_bias", bias), ("conv", anchor)):
            other = wildcard()
            body = is_op("relax.add")(base, other) if res else base
            stem = base_name + ("_residual" if res else "")
            annotations = {"anchor": anchor, **({"residual": other} if res else {})}
            for act_name, act in _activations().items():
                patterns.append(FusionPattern(f"hwc.{stem}_{act_name}", act(body), annotations, check))
            if res or base_name == "conv_bias":
                patterns.append(FusionPattern(f"hwc.{stem}", body, annotations, check))
    return patterns


def _backend_owns(spec):
    """``call -> bool`` for the ops ``spec``'s backend legalizes itself, or None."""
    if spec is None:
        return None
    from ..build import backend_legalize_map

    owners = {name: fn.handles for name, fn in (backend_legalize_map(spec, sparse=True) or {}).items() if hasattr(fn, "handles")}
    if not owners:
        return None

    def owns(call) -> bool:
        handles = owners.get(getattr(call.op, "name", ""))
        return bool(handles and handles(call))

    return owns


def _depends_on_fn(mod):
    """``depends_on(expr, var)`` over all Relax functions of ``mod`` (bindings are unique)."""
    from tvm import relax

    var2val = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            var2val.update(relax.analysis.get_var2val(func))

    def depends_on(expr, var) -> bool:
        seen, stack = set(), [expr]
        while stack:
            e = stack.pop()
            if e.same_as(var):
                return True
            if isinstance(e, relax.Var):
                if e in seen or e not in var2val:
                    continue
                seen.add(e)
                e = var2val[e]
            for v in relax.analysis.free_vars(e) if not isinstance(e, relax.Var) else ():
                stack.append(v)
        return False

    return depends_on


# ---------------------------------------------------------------------------- verb + legalize


def fuse(mod, config: Fuse = Fuse(), spec=None):
    """Group conv / matmul + bias (+ residual add) + activation into one kernel each.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported (run ``fold_bn`` first so that BN is in the weights).
    config : Fuse
    spec : TargetSpec or None
        Anchors that the target's backend lowers itself (``Backend.legalize_map`` functions
        with a ``handles(call)`` attribute) are not grouped: see ``epilogue_patterns``.

    Returns
    -------
    tvm.IRModule
        A new module whose groups are private ``Primitive`` functions;
        ``build.legalize_passes`` (``LegalizeOps`` + ``FuseTIR``) makes each one PrimFunc.
    """
    from tvm import relax

    mod = canonicalize_clip(mod)
    if config.residual:
        mod = order_residual_adds(mod)
    patterns = epilogue_patterns(config, _depends_on_fn(mod), _backend_owns(spec))
    return relax.transform.FuseOpsByPattern(patterns, bind_constants=False, annotate_codegen=False)(mod)
