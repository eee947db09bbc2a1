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

Epilogues (``fuse_epilogues``, run by ``build.legalize`` before ``LegalizeOps`` where the
backend's kernels take them, ``Backend.sparse_epilogue``): a float 2:4 layer's input-channel
permutation (the ``take`` that ``Sparse24(permute=True)`` puts before it) and what follows it
— bias add, residual add, ReLU / clip (``Tail``) — go into its kernel call
(``kernel_for(..., epilogue, perm)``): the permutation into the kernel's copy of ``x`` (or the
``im2col`` patch copy of a 3x3 conv), the rest into its write of ``y``. Unfused, each sparse
layer cost a ``take`` pass before it and an elementwise pass over its output after it, which
the dense conv it replaces does not pay (ResNet-50 on Zen 4: 10.6 ms of a 37 ms model).

INT8 (2:4 INT8): a conv / matmul of uint8 data by a constant 2:4 int8 weight with an int32
result (what the int8 quantizer makes of a 2:4 float layer: zeros stay zeros) goes to
``int8_kernel_for(m, n, k, W) -> (PrimFunc, weights)`` (``cpu_sparse_int8``), which also
packs the weight for its kernel; the requantization after it stays a separate kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..analysis import static_shape

from ..passes.sparsity.mask24 import conv_rows, is_2to4

__all__ = ["Epilogue", "Tail", "const_value", "fuse_epilogues", "gemm_shape", "graph_users", "sparse_legalize", "tail_of"]

KERNEL_NAME = "sparse24_gemm"
OPAQUE = 8  # relay/relax OpPatternKind kOpaque


@dataclass(frozen=True)
class Epilogue:
    """What a sparse kernel does around its product, ``y = clamp(x[:, perm] @ W.T + bias +
    res, lo, hi)`` (each part optional): the layer's input-channel permutation (``perm``), its
    bias, a residual operand of ``y``'s shape, and a clamp (ReLU: ``lo = 0``; ReLU6 also ``hi =
    6``). The operands follow the weights in the kernel's signature in that order."""

    perm: bool = False
    bias: bool = False
    residual: bool = False
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self):
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ValueError(f"bad epilogue clamp: lo {self.lo} > hi {self.hi}")

    @property
    def empty(self) -> bool:
        return self == Epilogue()


def gemm_shape(call) -> tuple[int, int, int]:
    """``(m, n, k)`` of a matmul / NHWC-OHWI conv as the GEMM its sparse kernel computes: ``m``
    rows of the output (batch x positions for a conv), ``n`` outputs, ``k`` the reduction
    (taps x input channels for a conv). Static shapes only."""
    out = [int(d) for d in call.ty.shape]
    w = [int(d) for d in call.args[1].ty.shape]
    k = w[0] if call.op.name == "relax.matmul" else math.prod(w[1:])
    return math.prod(out[:-1]), out[-1], k


def _site(call, int8_too: bool = True) -> tuple[str, np.ndarray, bool] | None:
    """``(kind, W[N, K], int8)`` when ``call`` is a conv / matmul with a constant 2:4 weight
    that a sparse kernel could compute (``int8_too``: uint8 x int8 layers too), else None."""
    import tvm

    if not isinstance(call, tvm.relax.Call) or getattr(call.op, "name", None) not in ("relax.matmul", "relax.nn.conv2d"):
        return None
    data, weight = call.args[:2]
    if not isinstance(weight, tvm.ir.expr.GenericConst) or static_shape(data.ty) is None:
        return None
    dtypes = (str(data.ty.dtype), str(weight.ty.dtype))
    out_dtype = str(call.attrs.out_dtype) if getattr(call.attrs, "out_dtype", None) is not None else ""
    if dtypes == ("float32", "float32") and out_dtype in ("", "float32"):
        int8 = False
    elif dtypes == ("uint8", "int8") and out_dtype == "int32" and int8_too:
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
    return kind, gemm, int8


def _plan(call, kernel_for, int8_kernel_for=None):
    """``(kind, W[N, K], (kernel, weights))`` when ``call`` runs sparse, else None."""
    site = _site(call, int8_kernel_for is not None)
    if site is None:
        return None
    kind, gemm, int8 = site
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


def _emit(bb, call, kind: str, gemm: np.ndarray, kernel, weights: list[np.ndarray], data=None, perm=None, extra=(), out_shape=None):
    """The sparse kernel's call for ``call`` (its GEMM view: ``x`` reshaped or copied into
    patches), reshaped to ``out_shape`` (default: the call's); ``data``: its input instead of
    ``call``'s; ``perm``: an input-channel permutation the patch copy applies (a kernel that
    reads ``x`` directly takes it among its ``weights``); ``extra``: the epilogue's operands
    (after the weights)."""
    from tvm import relax, topi

    data = call.args[0] if data is None else data
    m, n, k = gemm_shape(call)
    out_shape = static_shape(call.ty) if out_shape is None else out_shape
    out_dtype = "int32" if str(gemm.dtype) == "int8" else "float32"
    if kind == "matmul":
        x = data if len(data.ty.shape) == 2 else bb.emit_te(topi.reshape, data, (m, k), primfunc_name_hint="reshape")
    else:
        attrs = call.attrs
        kh, kw = (int(d) for d in call.args[1].ty.shape.values[1:3])
        pad = [int(p) for p in attrs.padding]
        geometry = (kh, kw, *(int(s) for s in attrs.strides), *(int(d) for d in attrs.dilation), *(pad * 2 if len(pad) == 2 else pad))
        table = None if perm is None else relax.const(np.asarray(perm, np.int32))
        x = bb.emit_te(_im2col, data, geometry, tuple(static_shape(call.ty)), table, primfunc_name_hint="im2col")
    # opaque to FuseOps: a hand-written kernel takes no fused producer or epilogue
    gvar = bb.add_func(kernel.with_attr("op_pattern", OPAQUE), KERNEL_NAME)
    y = relax.call_tir(gvar, [x, *(relax.const(w) for w in weights), *extra], relax.TensorType((m, n), out_dtype))
    if tuple(out_shape) == (m, n):
        return y
    y = bb.emit(y)
    return bb.call_te(topi.reshape, y, out_shape, primfunc_name_hint="reshape")


def _im2col(data, geometry, out_shape, perm=None):
    """NHWC ``data`` -> ``[N*OH*OW, KH*KW*C]`` patches, columns in OHWI's ``(kh, kw, c)`` order
    (a 1x1 stride-1 unpadded conv: the input itself, reshaped). ``geometry``: kernel size,
    strides, dilation, padding (top, left, bottom, right); ``perm`` (a tensor): the patches'
    channel ``c`` is ``data``'s channel ``perm[c]`` (the layer's input-channel permutation)."""
    from tvm import te, topi

    n, h, w, ch = (int(d) for d in data.shape)
    _, oh, ow, _ = out_shape
    kh, kw, sh, sw, dh, dw, *pad = geometry
    channel = (lambda c: c) if perm is None else (lambda c: perm[c])
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pad) and perm is None:
        return topi.reshape(data, (n * h * w, ch))
    if any(pad):
        data = topi.nn.pad(data, [0, pad[0], pad[1], 0], [0, pad[2], pad[3], 0], 0.0)

    def patch(r, col):
        b, pix = r // (oh * ow), r % (oh * ow)
        y, x = pix // ow, pix % ow
        tap, c = col // ch, col % ch
        return data[b, y * sh + (tap // kw) * dh, x * sw + (tap % kw) * dw, channel(c)]

    return te.compute((n * oh * ow, kh * kw * ch), patch, name="im2col")



# ---------------------------------------------------------------------------- epilogue fusion


@dataclass
class Tail:
    """What follows a conv / matmul that its kernel can do as it writes ``y``: a bias ``add`` of
    a constant over the output channels, then an ``add`` of another tensor of ``y``'s shape (a
    residual), then ReLU or a constant clip, each optional, each the only user of the one
    before. ``last``: the var that ends it (the layer's own var where nothing follows);
    ``residual_add``: the var the residual ``add`` binds (None: none)."""

    last: object
    bias: object = None  # the constant as the graph holds it
    residual: object = None  # the other operand of the residual add
    residual_add: object = None
    lo: float | None = None
    hi: float | None = None

    def bias_vector(self) -> np.ndarray | None:
        return None if self.bias is None else const_value(self.bias).reshape(-1)


def graph_users(func) -> dict:
    """``{var: [(var bound, value), ...]}``: the bindings of ``func`` that read each var (the
    function's result as ``(None, result)``)."""
    from tvm import relax

    users = {}
    for var, value in [*relax.analysis.get_var2val(func).items(), (None, func.body.body)]:
        for used in [value] if isinstance(value, relax.Var) else relax.analysis.free_vars(value):
            users.setdefault(used, []).append((var, value))
    return users


def tail_of(var, call, users: dict, residual: bool = True) -> Tail:
    """The ``Tail`` after the layer ``call`` bound to ``var`` (``users``: ``graph_users``);
    ``residual=False``: ends before an ``add`` that is not a bias, with no clamp after."""
    n, out = int(call.ty.shape[-1]), static_shape(call.ty)
    tail = Tail(var)

    def next_op(*names):
        after = users.get(tail.last, [])
        if len(after) != 1 or getattr(getattr(after[0][1], "op", None), "name", None) not in names:
            return None
        return after[0]

    def other_of(add):
        other = add.args[1] if add.args[0].same_as(tail.last) else add.args[0]
        return None if other.same_as(tail.last) else other

    step = next_op("relax.add")
    if step is not None:
        bias = const_value(other_of(step[1]))
        if bias is not None and bias.size == n and bias.shape[-1:] == (n,) and str(bias.dtype) == "float32":
            tail.bias, tail.last = other_of(step[1]), step[0]
            step = next_op("relax.add")
    if step is not None:
        if not residual:
            return tail  # the add (another layer's residual) and what follows it stay outside
        other = other_of(step[1])
        if other is not None and const_value(other) is None and static_shape(other.ty) == out and str(other.ty.dtype) == "float32":
            tail.residual, tail.last = other, step[0]
            tail.residual_add = tail.last
    step = next_op("relax.nn.relu", "relax.clip")
    if step is not None:
        if step[1].op.name == "relax.nn.relu":
            tail.lo = 0.0
        else:
            tail.lo, tail.hi = (float(getattr(a.value, "value", a.value)) for a in step[1].args[1:3])
        tail.last = step[0]
    return tail


@dataclass
class _Chain:
    """One sparse layer, the input permutation before it (a ``take`` of a constant index on the
    channel axis) and its ``Tail``: what its kernel absorbs."""

    anchor: object  # the conv / matmul call
    kind: str
    gemm: np.ndarray
    data: object  # the input the kernel reads (the take's input where the permutation is folded)
    tail: Tail
    perm: np.ndarray | None = None

    def epilogue(self, into_kernel: bool) -> Epilogue:
        t = self.tail
        return Epilogue(self.perm is not None and into_kernel, t.bias is not None, t.residual is not None, t.lo, t.hi)


def const_value(expr) -> np.ndarray | None:
    """The value of a Relax constant, None for anything else."""
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def _permutation(take, channels: int) -> np.ndarray | None:
    """The index of ``take(x, const, axis=last)`` when it is a permutation of ``channels``."""
    idx = const_value(take.args[1])
    axis = int(take.attrs.axis) % len(take.args[0].ty.shape)
    if idx is None or idx.ndim != 1 or axis != len(take.args[0].ty.shape) - 1 or idx.size != channels:
        return None
    return idx if np.array_equal(np.sort(idx), np.arange(channels)) else None


def _chain(var, call, var2val, users, residual: bool = True) -> _Chain | None:
    """The chain of the float 2:4 layer ``call`` bound to ``var`` (None: not one)."""
    site = _site(call, int8_too=False)
    if site is None:
        return None
    kind, gemm, _ = site
    chain = _Chain(call, kind, gemm, call.args[0], tail_of(var, call, users, residual))
    producer = var2val.get(call.args[0])
    if getattr(getattr(producer, "op", None), "name", None) == "relax.take":
        perm = _permutation(producer, int(call.args[0].ty.shape[-1]))
        if perm is not None:
            chain.perm, chain.data = perm, producer.args[0]
    return chain


def fuse_epilogues(kernel_for: Callable):
    """A module pass: every float 2:4 layer whose kernel takes an epilogue (``kernel_for(m, n,
    k, W, epilogue, perm) -> (PrimFunc, weights)``, ValueError where it cannot) becomes one
    call of that kernel with its input permutation, bias, residual add and ReLU / clamp
    folded in (``_Chain``), instead of a ``take`` pass before the kernel and an elementwise
    pass over its output after it (the dense conv fuses the same epilogue into its
    write-back). Layers without any of these, or whose kernel refuses them, are left to
    ``sparse_legalize``."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Fuser(relax.PyExprMutator):
        def __init__(self, mod, plans):
            super().__init__(mod)
            self.plans = plans
            self.flat = {}  # a fused layer's var -> its kernel's [m, n] output

        def visit_var_binding_(self, binding):
            from tvm import topi

            plan = self.plans.get(binding.var)
            if plan is None:
                return super().visit_var_binding_(binding)
            chain, kernel, weights, into_kernel = plan
            bb, tail = self.builder_, chain.tail
            extra = [] if tail.bias is None else [relax.const(tail.bias_vector())]
            m, n, _ = gemm_shape(chain.anchor)
            if tail.residual is not None:
                # another fused layer's output is taken as its kernel wrote it (a reshape back
                # and forth would be a copy: FuseOps joins the two reshapes into one kernel)
                res = self.flat.get(tail.residual)
                extra.append(res if res is not None else bb.emit(relax.op.reshape(self.visit_expr(tail.residual), (m, n))))
            y = bb.emit(_emit(
                bb, chain.anchor, chain.kind, chain.gemm, kernel, weights, data=self.visit_expr(chain.data),
                perm=None if into_kernel else chain.perm, extra=extra, out_shape=(m, n),
            ))  # fmt: skip
            self.flat[binding.var] = y
            out = y if static_shape(binding.var.ty) == (m, n) else bb.normalize(bb.call_te(topi.reshape, y, static_shape(binding.var.ty), primfunc_name_hint="reshape"))
            bb.emit_normalized(relax.VarBinding(binding.var, out))

    def plans_of(func):
        var2val, users = relax.analysis.get_var2val(func), graph_users(func)
        plans, res_adds = {}, set()
        for var, value in var2val.items():
            chain = _chain(var, value, var2val, users)
            if chain is not None and chain.tail.residual_add in res_adds:
                # the add of two sparse layers' outputs: the first chain took it, this one
                # ends before it (its output is that chain's residual operand)
                chain = _chain(var, value, var2val, users, residual=False)
            if chain is None:
                continue
            epi = chain.epilogue(into_kernel=True)
            if epi.empty:
                continue
            m, n, k = gemm_shape(chain.anchor)
            direct = chain.kind == "matmul" or _is_pointwise(chain.anchor)
            if not direct:  # a patch copy reads x: the permutation goes there
                epi = chain.epilogue(into_kernel=False)
            try:
                kernel, weights = kernel_for(m, n, k, chain.gemm, epi, chain.perm if epi.perm else None)
            except ValueError:
                continue
            plans[chain.tail.last] = (chain, kernel, weights, direct)
            if chain.tail.residual_add is not None:
                res_adds.add(chain.tail.residual_add)
        return plans

    @tvm.transform.module_pass(opt_level=0, name="hwc.SparseEpilogues")
    def transform(mod, _ctx):
        fuser, changed = None, False
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            plans = plans_of(func)
            if not plans:
                continue
            fuser = Fuser(mod if fuser is None else fuser.builder_.get(), plans)
            new = relax.analysis.remove_all_unused(fuser.visit_expr(func))
            fuser.builder_.update_func(gv, new)
            changed = True
        return fuser.builder_.get() if changed else mod

    return transform


def _is_pointwise(conv) -> bool:
    """A 1x1, stride-1, unpadded conv: its GEMM reads the input as it is."""
    attrs = conv.attrs
    kh, kw = (int(d) for d in conv.args[1].ty.shape.values[1:3])
    return (kh, kw) == (1, 1) and all(int(s) == 1 for s in attrs.strides) and not any(int(p) for p in attrs.padding)
