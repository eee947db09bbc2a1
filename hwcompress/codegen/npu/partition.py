"""Which parts of an int8 graph run on the NPU: Relax BYOC partitioning.

Region boundaries are the int8 tensors the INT8 pass already has. One NPU *layer* reads a
uint8 tensor ``q`` and ends at the next ``quantize``::

    q -> [pad] -> conv2d | [flatten] matmul -> dequantize -> [+bias] -> [relu | relu6]
      -> [max_pool2d | avg_pool2d] -> quantize(s_y, zp_y)

that is one CONV2D / DENSE command (requant ``s_x s_w / s_y``, the activation as its clamp)
plus a pool command: ``quantize`` is monotone, so max-pooling after it equals pooling before
(avg pools round once more: within an int8 step). Every layer is a composite function
(``FuseOpsByPattern``), ``MergeCompositeFunctions`` joins neighbouring ones into one NPU
function per connected region, which ``RunCodegen`` turns into one program.

A residual add whose inputs and output the INT8 pass quantized (it does so for targets whose
NPU has ``add``) is a layer of its own, one ADD command::

    dequantize(qa), dequantize(qb) -> add -> [relu | relu6] -> quantize(s_y, zp_y)

Host: the first ``quantize`` (float input), every float op, and layers whose float result
has another use (``has_leaking_intermediate_variables``: e.g. a ReLU output feeding both
the next conv and a float residual add), or whose accumulator leads into anything but the
chains above — residual adds without int8 quantization points (a target without NPU adds),
and the logits (no quantize after them). ``host_reasons`` says why for each.

``prepare`` first moves per-tensor ``quantize`` ops in front of ``permute_dims`` / ``reshape``
(exact: quantize is elementwise), so a flatten before a dense layer runs on uint8 and the
conv before it can end at a quantize.
"""

from __future__ import annotations

import numpy as np

from .layer import NotOnNpu, npu_op_type, op_name, read_add, read_layer

CODEGEN = "npu"
LAYOUT_OPS = ("relax.permute_dims", "relax.reshape")


def prepare(mod):
    """``quantize(reshape(permute_dims(x)))`` -> ``reshape(permute_dims(quantize(x)))`` in
    ``main`` (and without the permute); per-tensor quantize only, so the results are equal."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    x = wildcard()
    perm = is_op("relax.permute_dims")(x)
    shaped = is_op("relax.reshape")(perm | x, wildcard())
    pattern = is_op("relax.quantize")(shaped, is_const(), is_const())

    def rewriter(expr, matches):
        scale, zp = expr.args[1], expr.args[2]
        if int(np.prod(scale.value.numpy().shape)) != 1 or int(np.prod(zp.value.numpy().shape)) != 1:
            return expr
        inner = matches[x]
        out = relax.op.quantize(inner, scale, zp, axis=-1, out_dtype=str(expr.attrs.out_dtype))
        if perm in matches:
            out = relax.op.permute_dims(out, matches[perm].attrs.axes)
        return relax.op.reshape(out, matches[shaped].args[1])

    new = mod.copy() if hasattr(mod, "copy") else mod
    new["main"] = rewrite_call(pattern, rewriter, mod["main"])
    return new


def _tail(acc):
    from tvm.relax.dpl import is_const, is_op, wildcard

    dq = is_op("relax.dequantize")(acc, is_const(), is_const())
    b = is_op("relax.add")(dq, is_const()) | dq
    act = is_op("relax.nn.relu")(b) | is_op("relax.clip")(b, wildcard(), wildcard()) | b
    pooled = is_op("relax.nn.max_pool2d")(act) | is_op("relax.nn.avg_pool2d")(act) | act
    return is_op("relax.quantize")(pooled, is_const(), is_const())


def _add_tail():
    from tvm.relax.dpl import is_const, is_op, wildcard

    def dq():
        return is_op("relax.dequantize")(wildcard(), is_const(), is_const())

    s = is_op("relax.add")(dq(), dq())
    act = is_op("relax.nn.relu")(s) | is_op("relax.clip")(s, wildcard(), wildcard()) | s
    return is_op("relax.quantize")(act, is_const(), is_const())


def patterns(npu) -> list:
    """The ``FusionPattern`` list of the NPU: ``npu.conv2d``, ``npu.dense`` and ``npu.add``
    layers, each with a check that applies ``read_layer`` / ``read_add`` (the hard constraints
    of ``npu``) and refuses matches whose intermediate values are used outside the match."""
    from tvm.relax.backend.utils import has_leaking_intermediate_variables
    from tvm.relax.dpl import is_const, is_op, wildcard
    from tvm.relax.transform import FusionPattern

    def checker(read, chain_of):
        def check(ctx) -> bool:
            if has_leaking_intermediate_variables(ctx):
                return False
            bindings = {v: e for v, e in ctx.matched_bindings.items()}
            try:
                read(chain_of(ctx.matched_expr, bindings), npu)
            except NotOnNpu:
                return False
            return True

        return check

    check = checker(read_layer, _chain_back)

    x = wildcard()
    conv = is_op("relax.nn.conv2d")(is_op("relax.nn.pad")(x) | x, is_const())
    flat = is_op("relax.reshape")(is_op("relax.permute_dims")(x) | x, wildcard())
    dense = is_op("relax.matmul")(flat | x, is_const())
    return [FusionPattern(f"{CODEGEN}.conv2d", _tail(conv), {}, check),
            FusionPattern(f"{CODEGEN}.dense", _tail(dense), {}, check),
            FusionPattern(f"{CODEGEN}.add", _add_tail(), {}, checker(read_add, _add_chain))]


def _add_chain(root, bindings) -> list:
    """``[dequantize a, dequantize b, add, (activation), quantize]`` ending at ``root`` (the
    output quantize); an input that is no bound dequantize is left out (``read_add`` refuses)."""
    chain = _chain_back(root, bindings)  # dequantize a, add, ..., quantize
    add = next((c for c in chain if op_name(c) == "relax.add"), None)
    second = add.args[1] if add is not None and len(add.args) == 2 else None
    if second is None or second not in bindings:
        return chain
    i = chain.index(add)
    return [*chain[:i], bindings[second], *chain[i:]]


def _chain_back(root, bindings) -> list:
    """The calls from the layer's input to ``root``, following the first argument through
    ``bindings`` (``{var: value}``: the calls of the match / of a composite function)."""
    from tvm import relax

    chain, call = [], root
    while True:
        chain.append(call)
        arg = call.args[0]
        if not isinstance(arg, relax.Var) or arg not in bindings or not isinstance(bindings[arg], relax.Call):
            return chain[::-1]
        call = bindings[arg]


def partition(mod, npu):
    """``mod`` with every NPU region of ``main`` in a function with ``Codegen = "npu"``.

    Parameters
    ----------
    mod : tvm.IRModule
        The int8 graph (after ``prepare``).
    npu : targets.Npu
        Supported ops and constraints.
    """
    from tvm import relax

    seq = [relax.transform.FuseOpsByPattern(patterns(npu), bind_constants=True, annotate_codegen=False),
           relax.transform.MergeCompositeFunctions()]
    for p in seq:
        mod = p(mod)
    return mod


def npu_functions(mod) -> dict:
    """``{global symbol: function}`` of the functions ``partition`` made for the NPU."""
    out = {}
    for gv, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and "Codegen" in attrs and str(attrs["Codegen"]) == CODEGEN:
            out[str(attrs.get("global_symbol", gv.name_hint))] = func
    return out


def composite_layers(func) -> list:
    """``(composite name, output var, [input exprs], chain of calls)`` of each layer inside
    an NPU function, in program order (an add has two inputs, the others one)."""
    from tvm import relax

    local = {}
    layers = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Function):
                local[binding.var] = value
                continue
            if not isinstance(value, relax.Call):
                raise ValueError(f"npu function: unexpected binding {type(value).__name__}")
            callee = local.get(value.op, value.op)
            if not isinstance(callee, relax.Function) or "Composite" not in (callee.attrs or {}):
                raise ValueError("npu function: a call that is no composite layer")
            inner = {b.var: b.value for blk in callee.body.blocks for b in blk.bindings}
            out = callee.body.body
            root = inner[out] if isinstance(out, relax.Var) and out in inner else out
            # the composite's parameters stand for the call's arguments
            params = dict(zip(callee.params, value.args))
            name = str(callee.attrs["Composite"])
            chain = (_add_chain if name == f"{CODEGEN}.add" else _chain_back)(root, inner)
            inputs = [c.args[0] for c in chain[:2]] if name == f"{CODEGEN}.add" else [chain[0].args[0]]
            layers.append((name, binding.var, [params.get(x, x) for x in inputs], chain))
    return layers


def host_reasons(mod, npu) -> list[dict]:
    """Why each compute op left in ``main`` (after ``partition``) runs on the host:
    ``[{"name", "op", "reason"}]``, op being the NPU op type (``conv2d``, ``add``, ...)."""
    from tvm import relax

    bindings, users, order = {}, {}, []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            bindings[b.var] = b.value
            order.append(b.var)
            for arg in getattr(b.value, "args", []):
                for v in _vars(arg):
                    users.setdefault(v, []).append(b.var)
    out = []
    for var in order:
        call = bindings[var]
        if not isinstance(call, relax.Call) or not hasattr(call.op, "name"):
            continue
        kind = npu_op_type(call)
        if kind is None:
            continue
        out.append({"name": var.name, "op": kind, "reason": _why_host(var, call, kind, bindings, users, npu)})
    return out


def _vars(expr):
    from tvm import relax

    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in _vars(f)]
    return []


def _why_host(var, call, kind, bindings, users, npu) -> str:
    if kind not in npu.supported_ops:
        return f"{kind} is not in the target's [npu].supported_ops"
    if kind == "add":
        return _why_add_host(var, call, bindings, users, npu)
    if op_name(call) not in ("relax.nn.conv2d", "relax.matmul"):
        return "float op: not fused into an int8 conv / dense layer (no quantize next to it)"
    if str(call.ty.dtype) != "int32":
        return "float: not quantized by the int8 pass (see quantization.float_fallback)"
    chain = [call]
    arg = call.args[0]
    while arg in bindings and op_name(bindings[arg]) in ("relax.nn.pad", *LAYOUT_OPS):
        chain.insert(0, bindings[arg])
        arg = bindings[arg].args[0]
    v = var
    while op_name(chain[-1]) != "relax.quantize":
        nxt = users.get(v, [])
        if len(nxt) != 1:
            names = ", ".join(op_name(bindings[u]).removeprefix("relax.") for u in nxt) or "the output"
            return f"float intermediate also used by {names} on the host" if nxt else \
                "float result: no quantize follows it, and the NPU only writes int8"
        v = nxt[0]
        chain.append(bindings[v])
        if len(chain) > 8:
            break
    try:
        read_layer(chain, npu)
    except NotOnNpu as e:
        return str(e)
    return "not matched by the NPU patterns"


def _why_add_host(var, call, bindings, users, npu) -> str:
    """Why a residual add left in ``main`` is no ADD command."""
    inputs = [bindings.get(a) for a in call.args]
    chain = [c for c in inputs if c is not None and op_name(c) == "relax.dequantize"]
    if len(chain) != 2:
        return "float residual add: its inputs have no int8 quantization point in the graph"
    shared = [a.name for a in call.args if len(users.get(a, [])) > 1]
    if shared:
        return f"its dequantized input {shared[0]} is also used on the host"
    chain.append(call)
    v = var
    while op_name(chain[-1]) != "relax.quantize" and len(chain) < 5:
        nxt = users.get(v, [])
        if len(nxt) != 1:
            return "float result: no quantize follows it alone, and the NPU only writes int8"
        v = nxt[0]
        chain.append(bindings[v])
    try:
        read_add(chain, npu)
    except NotOnNpu as e:
        return str(e)
    return "not matched by the NPU patterns"
