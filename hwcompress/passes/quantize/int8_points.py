"""Where the INT8 pass puts extra int8 quantization points for an NPU (``int8.quantize`` asks
only when the target's ``[npu].supported_ops`` has ``add``): around residual adds, so that a
ResNet block runs conv -> requant -> ADD -> relu on the NPU without a float tensor in between.
The points are float tensors that pass through uint8 (``Int8Emitter.point``), calibrated by the
same observers as the convs' inputs (``int8_calib.calibrate``).
"""

from __future__ import annotations

from .int8_graph import static_shape

__all__ = ["residual_points"]


def residual_points(func) -> dict:
    """``{var: name}`` of the float tensors around ``main``'s residual adds that get an int8
    quantization point when an NPU runs ``add`` (``int8.quantize``): both inputs of every add
    of two same-shape float32 tensors (the NPU's ADD does not broadcast) and its output, after
    the ReLU / clip when that is the add's only user (the clamp fuses into ADD, and the output
    then uses all 256 levels). The inputs are usually a conv's output and the block input,
    which the next convs quantize anyway: those share the point's uint8 tensor. An add whose
    output is the network's output keeps float (as the logits do: no int8 output resolution)."""
    from tvm import relax

    bound, users, order, alias = {}, {}, [], {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Var):
                alias[b.var] = b.value  # gv1 = gv, as the importer ends main
            if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
                bound[b.var] = b.value
                order.append(b.var)
                for arg in b.value.args:
                    if isinstance(arg, relax.Var):
                        users.setdefault(arg, []).append(b.var)
    body = func.body.body
    results = set()
    for r in body.fields if isinstance(body, relax.Tuple) else [body]:
        while r in alias:
            results.add(r)
            r = alias[r]
        results.add(r)
    points, n = {}, 0
    for var in order:
        call = bound[var]
        if getattr(call.op, "name", None) != "relax.add" or len(call.args) != 2:
            continue
        a, b = call.args
        shapes = {static_shape(x.ty) if isinstance(x, relax.Var) else None for x in (a, b, var)}
        if not all(x in bound for x in (a, b)) or len(shapes) != 1 or None in shapes:
            continue  # a bias add (constant), a broadcast or a function input: stays as it is
        if {str(a.ty.dtype), str(b.ty.dtype)} != {"float32"}:
            continue
        out, after = var, users.get(var, [])
        if len(after) == 1 and getattr(bound[after[0]].op, "name", None) in ("relax.nn.relu", "relax.clip"):
            out = after[0]
        if _is_output(out, results, users, bound):
            continue  # the network's output stays float, as the logits do
        for x, role in ((a, "input a"), (b, "input b"), (out, "output")):
            points.setdefault(x, f"add[{n}] {role}")
        n += 1
    return points


def _is_output(var, results: set, users: dict, bound: dict) -> bool:
    """``var`` is a result of the function, maybe through layout ops (NCHW out of an NHWC graph)."""
    while var not in results:
        after = users.get(var, [])
        if len(after) != 1 or getattr(bound[after[0]].op, "name", None) not in ("relax.permute_dims", "relax.reshape"):
            return False
        var = after[0]
    return True
