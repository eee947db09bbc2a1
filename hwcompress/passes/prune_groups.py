"""Channel dependency groups of a Relax ``main``: which channels must be removed together.

Every channel of every tracked tensor is an *element*; ops that tie channels together unite
elements (union-find), and the connected sets of elements are the units that can be removed.

* ``conv2d`` (``groups=1``, NCHW/OIHW, constant weight) and ``matmul`` with a constant 2D
  weight *create* elements: one per filter / output feature (the *sources*). Their input
  channels are *consumed*: removing an input channel slices the weight's input axis.
* depthwise ``conv2d`` (``groups == in == out``) passes its input's elements through:
  its filter ``i`` goes with input channel ``i``.
* element-wise ops, ``batch_norm``, pooling, reductions over other axes and reshapes that
  keep the channel axis pass elements through; a binary op between two tracked tensors
  unites them channel by channel (residual adds).
* ``concat`` along the channel axis lays its inputs' elements side by side; along another
  axis it unites them like an add.
* a reshape that flattens ``[N, C, H, W]`` to ``[N, C*H*W]`` repeats each element ``H*W``
  times, so the ``matmul`` after ``flatten`` loses all features of a removed channel.

Anything else (grouped convs, non-constant weights, other layouts, unknown ops, the function's
outputs) *locks* the elements it touches, with the reason; a group with a locked element is
reported and left alone. A *group* is the set of components that share a source, so the two
producers of a residual add (and the adds, BNs and depthwise convs between them) form one
group, while the two inputs of a concat stay separate groups.

TVM is imported by the functions that take a module, not at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Analysis", "Group", "Member", "analyze", "format_groups"]

UNARY = {
    "relax.nn.relu", "relax.nn.relu6", "relax.clip", "relax.nn.leakyrelu", "relax.sigmoid", "relax.tanh",
    "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.exp", "relax.sqrt", "relax.negative",
    "relax.abs", "relax.nn.softplus", "relax.nn.prelu", "relax.floor", "relax.ceil", "relax.round",
    "relax.nn.dropout", "relax.astype", "relax.square", "relax.erf", "relax.log",
}  # fmt: skip
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum", "relax.power"}
POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}
REDUCE = {"relax.mean", "relax.sum", "relax.max", "relax.min"}


@dataclass(frozen=True)
class Member:
    """One binding of ``main`` that a group touches.

    ``role``: ``source`` (its filters / output features are removed), ``consumer`` (its
    weight's input axis is sliced), ``depthwise`` (filters removed with their input channel),
    ``follow`` (element-wise, BN, pooling, reshape, concat: shapes shrink).
    """

    var: str
    op: str
    role: str


@dataclass(frozen=True)
class Group:
    """Channels removed together; ``channels`` is the number of removable units."""

    name: str
    channels: int
    members: tuple[Member, ...]
    reason: str | None = None  # why it is locked (None: prunable)

    @property
    def prunable(self) -> bool:
        return self.reason is None and self.channels > 1


@dataclass
class Analysis:
    """The result of :func:`analyze`; the rewrite, importance and masks read it.

    ``chan[var]`` lists the element of each channel of a tracked tensor and ``axis[var]`` its
    channel axis; ``comp(e)`` is an element's component; ``group_of[comp]`` its group index.
    ``sources``: ``(var, weight, out_axis)`` of each conv / matmul that created elements.
    ``consumers``: ``(var, data var, weight, kind)`` of each conv / matmul whose input axis
    is sliced. ``weights``: ``(numel, out var, in var)`` per constant that shrinks.
    """

    func: object
    chan: dict = field(default_factory=dict)
    axis: dict = field(default_factory=dict)
    parent: list = field(default_factory=list)
    locks: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    consts: dict = field(default_factory=dict)  # var -> numpy value of a constant-only expression
    roles: list = field(default_factory=list)  # (var, op, role)
    groups: list = field(default_factory=list)
    group_of: dict = field(default_factory=dict)
    group_comps: list = field(default_factory=list)  # per group: sorted component ids

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def comp(self, e: int) -> int:
        parent = self.parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    def unite(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b):
            rx, ry = self.comp(x), self.comp(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def lock(self, elems, reason: str) -> None:
        self.locks.extend((e, reason) for e in elems)

    def kept(self, var, removed: set[int]) -> list[int]:
        """Indices of ``var``'s channels that survive when components ``removed`` go."""
        return [j for j, e in enumerate(self.chan[var]) if self.comp(e) not in removed]

    def group(self, name: str) -> int:
        for i, g in enumerate(self.groups):
            if g.name == name or any(m.var == name for m in g.members if m.role in ("source", "depthwise")):
                return i
        raise KeyError(name)


# ---------------------------------------------------------------------------- analysis


def _shape(expr):
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _const_value(a: Analysis, expr):
    """numpy value of a constant or of a var bound to a constant-only expression, else None."""
    if type(expr).__name__ == "GenericConst":
        return expr.value.numpy()
    return a.consts.get(expr)


def _const_expr(a: Analysis, value):
    """Evaluate ``reshape`` / ``permute_dims`` of constants (bias reshapes, transposed Gemm
    weights) so later ops can slice the values; None for anything else."""
    from tvm import relax

    if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
        return None
    name = value.op.name
    if name == "relax.reshape":
        src = _const_value(a, value.args[0])
        shape = _shape(value)
        return None if src is None or shape is None else src.reshape(shape)
    if name == "relax.permute_dims":
        src = _const_value(a, value.args[0])
        axes = value.attrs.axes
        return None if src is None else np.transpose(src, None if axes is None else [int(x) for x in axes])
    return None


def analyze(func, mod=None) -> Analysis:
    """Dependency analysis of a Relax function (the module's ``main``).

    Parameters
    ----------
    func : tvm.relax.Function
        As imported, BN folded or not (``batch_norm`` is followed).
    mod : tvm.IRModule, optional
        The module holding ``func`` (unused for now: ``call_tir`` kernels, e.g. the importer's
        ``Clip``, lock their channels, since their shapes are baked into the kernel).

    Returns
    -------
    Analysis
        With ``groups`` filled in; locked groups carry the reason.
    """
    from tvm import relax

    a = Analysis(func)
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                _lock_all(a, binding, "match_cast")
                continue
            _visit(a, binding.var, binding.value)
    _lock_expr(a, body.body, "function output")
    _make_groups(a)
    return a


def _tracked(a: Analysis, expr) -> bool:
    return expr in a.chan


def _lock_expr(a: Analysis, expr, reason: str) -> None:
    from tvm import relax

    if isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _lock_expr(a, f, reason)
    elif expr in a.chan:
        a.lock(a.chan[expr], reason)


def _lock_all(a: Analysis, binding, reason: str) -> None:
    from tvm import relax

    value = binding.value
    args = value.args if isinstance(value, relax.Call) else value.fields if isinstance(value, relax.Tuple) else [value]
    for arg in args:
        _lock_expr(a, arg, reason)


def _set(a: Analysis, var, elems: list[int], axis: int, op: str, role: str) -> None:
    a.chan[var], a.axis[var] = elems, axis
    a.roles.append((var, op, role))


def _visit(a: Analysis, var, value) -> None:
    from tvm import relax

    if isinstance(value, relax.Var):
        if value in a.chan:
            _set(a, var, a.chan[value], a.axis[value], "alias", "follow")
        elif value in a.consts:
            a.consts[var] = a.consts[value]
        return
    if isinstance(value, relax.TupleGetItem):
        tup = value.tuple_value
        if tup in a.chan and value.index == 0:  # batch_norm's normalized output
            _set(a, var, a.chan[tup], a.axis[tup], "batch_norm", "follow")
        elif tup in a.chan and value.index in (1, 2):  # its per-channel statistics, [C]
            _set(a, var, a.chan[tup], 0, "batch_norm", "follow")
        else:
            _lock_expr(a, tup, "tuple item")
        return
    if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
        _lock_all(a, relax.VarBinding(var, value), f"unsupported expression {type(value).__name__}")
        return
    const = _const_expr(a, value)
    if const is not None:
        a.consts[var] = const
        return
    op = value.op.name
    handler = _HANDLERS.get(op)
    if handler is None:
        if op in UNARY:
            handler = _unary
        elif op in BINARY:
            handler = _binary
        elif op in POOLS:
            handler = _pool
        elif op in REDUCE:
            handler = _reduce
    reason = handler(a, var, value) if handler else f"op {op.removeprefix('relax.')} not understood"
    if reason:
        for arg in value.args:
            _lock_expr(a, arg, f"{var.name}: {reason}")


def _conv2d(a: Analysis, var, call):
    data, weight = call.args[0], _const_value(a, call.args[1])
    attrs = call.attrs
    if weight is None:
        return "conv weight is not a constant"
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout or "NCHW") != "NCHW":
        return f"conv layout {attrs.data_layout}/{attrs.kernel_layout} (prune before the layout pass)"
    groups = int(attrs.groups)
    cin, cout = weight.shape[1] * groups, weight.shape[0]
    if groups == 1:
        if _tracked(a, data):
            a.consumers.append((var, data, weight, "conv2d"))
        a.sources.append((var, weight, 0))
        a.weights.append((weight.size, var, data if _tracked(a, data) else None))
        _set(a, var, a.new(cout), 1, "nn.conv2d", "source")
        return None
    if groups == cin == cout and _tracked(a, data) and a.axis[data] == 1:
        a.weights.append((weight.size, var, None))
        _set(a, var, a.chan[data], 1, "nn.conv2d", "depthwise")
        return None
    # grouped convs would have to lose the same number of channels in every group
    elems = a.new(cout)
    a.lock(elems, f"{var.name}: grouped conv (groups={groups})")
    _set(a, var, elems, 1, "nn.conv2d", "source")
    return f"grouped conv (groups={groups})"


def _matmul(a: Analysis, var, call):
    x, weight = call.args
    w = _const_value(a, weight)
    shape = _shape(var)
    if w is None or w.ndim != 2 or shape is None:
        return "matmul without a constant 2D weight"
    if _tracked(a, x):
        if a.axis[x] != len(_shape(x)) - 1:
            return "matmul input features are not the channel axis"
        a.consumers.append((var, x, w, "matmul"))
    a.sources.append((var, w, 1))
    a.weights.append((w.size, var, x if _tracked(a, x) else None))
    _set(a, var, a.new(w.shape[1]), len(shape) - 1, "matmul", "source")
    return None


def _unary(a: Analysis, var, call):
    x = call.args[0]
    if not _tracked(a, x):
        return None
    for arg in call.args[1:]:
        if type(arg).__name__ in ("IntImm", "FloatImm", "PrimValue"):  # scalar bounds (R.clip)
            continue
        c = _const_value(a, arg)
        if c is None or c.size != 1:  # per-channel PReLU slopes etc.: keep it simple
            if not (c is not None and _slice_axis(c, len(_shape(var)), a.axis[x], len(a.chan[x])) is not None):
                return "op with a per-channel non-constant argument"
    _set(a, var, a.chan[x], a.axis[x], call.op.name.removeprefix("relax."), "follow")
    return None


def _slice_axis(c: np.ndarray, out_ndim: int, axis: int, n: int):
    """Axis of constant ``c`` to slice when broadcast against an ``out_ndim`` tensor whose
    channel axis ``axis`` has ``n`` channels; -1: nothing to slice; None: cannot follow."""
    lead = out_ndim - c.ndim
    if lead < 0:
        return None
    if axis < lead or c.shape[axis - lead] == 1:
        return -1
    return axis - lead if c.shape[axis - lead] == n else None


def _binary(a: Analysis, var, call):
    out = _shape(var)
    tracked = [x for x in call.args if _tracked(a, x)]
    if not tracked or out is None:
        return None if not tracked else "unknown output shape"
    first = tracked[0]
    axis, n = a.axis[first], len(a.chan[first])
    for x in call.args:
        if _tracked(a, x):
            if a.axis[x] + len(out) - len(_shape(x)) != axis or len(a.chan[x]) != n:
                return "element-wise op on tensors with different channel layouts"
            continue
        c = _const_value(a, x)
        if c is not None:
            if _slice_axis(c, len(out), axis, n) is None:
                return "constant operand does not broadcast along channels"
            continue
        shape = _shape(x)
        lead = len(out) - len(shape or ())
        if shape is None or (axis >= lead and shape[axis - lead] != 1):
            return "element-wise op with an untracked per-channel operand"
    for x in tracked[1:]:
        a.unite(a.chan[first], a.chan[x])
    for x in call.args:
        c = _const_value(a, x)
        if c is not None and _slice_axis(c, len(out), axis, n) not in (-1, None):
            a.weights.append((c.size, var, None))
    _set(a, var, a.chan[first], axis, call.op.name.removeprefix("relax."), "follow")
    return None


def _batch_norm(a: Analysis, var, call):
    x = call.args[0]
    if not _tracked(a, x):
        return None
    params = [_const_value(a, p) for p in call.args[1:5]]
    if any(p is None for p in params) or int(call.attrs.axis) % len(_shape(x)) != a.axis[x]:
        return "batch_norm with non-constant statistics or along another axis"
    a.weights.append((sum(p.size for p in params), var, None))
    _set(a, var, a.chan[x], a.axis[x], "nn.batch_norm", "follow")
    return None


def _pool(a: Analysis, var, call):
    x = call.args[0]
    if not _tracked(a, x):
        return None
    if str(call.attrs.layout) != "NCHW" or a.axis[x] != 1:
        return "pooling in another layout"
    _set(a, var, a.chan[x], 1, call.op.name.removeprefix("relax."), "follow")
    return None


def _reduce(a: Analysis, var, call):
    x = call.args[0]
    if not _tracked(a, x):
        return None
    ndim = len(_shape(x))
    axes = call.attrs.axis
    axes = list(range(ndim)) if axes is None else [int(v) % ndim for v in axes]
    if a.axis[x] in axes:
        return "reduction over the channel axis"
    axis = a.axis[x] if call.attrs.keepdims else a.axis[x] - sum(1 for v in axes if v < a.axis[x])
    _set(a, var, a.chan[x], axis, call.op.name.removeprefix("relax."), "follow")
    return None


def _reshape(a: Analysis, var, call):
    x = call.args[0]
    if not _tracked(a, x):
        return None
    src, dst = _shape(x), _shape(var)
    if src is None or dst is None:
        return "reshape with a dynamic shape"
    ax, c = a.axis[x], src[a.axis[x]]
    lead, rest = math.prod(src[:ax]), math.prod(src[ax + 1 :])
    for b in range(len(dst)):
        if math.prod(dst[:b]) != lead:
            continue
        if dst[b] == c and math.prod(dst[b + 1 :]) == rest:
            _set(a, var, a.chan[x], b, "reshape", "follow")
            return None
        if dst[b] == c * rest and b == len(dst) - 1:  # flatten: channel-major features
            _set(a, var, [e for e in a.chan[x] for _ in range(rest)], b, "reshape", "follow")
            return None
    return "reshape that splits or merges the channel axis"


def _concat(a: Analysis, var, call):
    fields = call.args[0].fields if hasattr(call.args[0], "fields") else None
    out = _shape(var)
    if fields is None or out is None or not all(_tracked(a, f) for f in fields):
        return "concat of untracked tensors"
    axis = int(call.attrs.axis) % len(out)
    first = fields[0]
    if any(a.axis[f] != a.axis[first] for f in fields):
        return "concat of tensors with different channel axes"
    if axis == a.axis[first]:
        _set(a, var, [e for f in fields for e in a.chan[f]], axis, "concat", "follow")
        return None
    if any(len(a.chan[f]) != len(a.chan[first]) for f in fields):
        return "concat of tensors with different channel counts"
    for f in fields[1:]:
        a.unite(a.chan[first], a.chan[f])
    _set(a, var, a.chan[first], a.axis[first], "concat", "follow")
    return None


_HANDLERS = {
    "relax.nn.conv2d": _conv2d,
    "relax.matmul": _matmul,
    "relax.nn.batch_norm": _batch_norm,
    "relax.reshape": _reshape,
    "relax.concat": _concat,
}


def _make_groups(a: Analysis) -> None:
    """Group components by shared source; lock groups touched by a lock."""
    locked: dict[int, str] = {}
    for e, reason in a.locks:
        locked.setdefault(a.comp(e), reason)
    # union-find over components, linked by sharing a source
    link = {}

    def find(c):
        while link.get(c, c) != c:
            c = link[c]
        return c

    for var, op, role in a.roles:
        if role == "source":
            comps = [a.comp(e) for e in a.chan[var]]
            roots = {find(c) for c in comps}
            top = min(roots)
            for r in roots:
                link[r] = top
                link.setdefault(top, top)
    by_group: dict[int, set[int]] = {}
    for var, op, role in a.roles:
        if role == "source":
            for e in a.chan[var]:
                c = a.comp(e)
                by_group.setdefault(find(c), set()).add(c)
    for i, root in enumerate(sorted(by_group)):
        comps = sorted(by_group[root])
        comp_set = set(comps)
        members, seen = [], set()
        for var, op, role in a.roles:
            if var in seen or not any(a.comp(e) in comp_set for e in a.chan[var]):
                continue
            seen.add(var)
            members.append(Member(var.name, op, role))
        for var, data, _w, kind in a.consumers:
            if any(a.comp(e) in comp_set for e in a.chan[data]):
                members.append(Member(var.name, kind, "consumer"))
        reason = next((locked[c] for c in comps if c in locked), None)
        a.groups.append(Group(f"g{i}", len(comps), tuple(members), reason))
        a.group_comps.append(comps)
        for c in comps:
            a.group_of[c] = i


def format_groups(groups, sensitivity: dict | None = None) -> str:
    """The groups as printed by ``hwc inspect --prune-groups``; ``sensitivity`` (``{group name:
    {width: output error}}``, from ``prune.prune_sensitivity``) adds a line per group."""
    lines = []
    for g in groups:
        state = "prunable" if g.prunable else f"locked: {g.reason or 'a single channel'}"
        lines.append(f"{g.name}: {g.channels} channels, {state}")
        curve = (sensitivity or {}).get(g.name)
        if curve:
            lines.append("  output err  " + "  ".join(f"{w}ch {err:.2e}" for w, err in curve.items()))
        for role in ("source", "depthwise", "follow", "consumer"):
            names = [f"{m.var}({m.op})" for m in g.members if m.role == role]
            if names:
                label = {"source": "cut filters", "depthwise": "depthwise", "follow": "follow", "consumer": "cut inputs"}[role]
                lines.append(f"  {label:11s} {', '.join(names)}")
    return "\n".join(lines)
