"""The NPU step of a build: ``offload(mod, spec)`` after the recipe, before legalization.

prepare -> partition (FuseOpsByPattern + MergeCompositeFunctions) -> RunCodegen (``relax.ext.npu``)
-> host-side uint8 <-> int8 shifts around each NPU call -> the offload report as a module
attribute (``offload_report``): FLOPs share on the NPU, per op type NPU / host counts and the
host reasons, estimated NPU cycles (``cost.cycles``).
"""

from __future__ import annotations

import json
from collections import Counter

REPORT_ATTR = "hwc.npu_offload"


def offload(mod, spec):
    """``mod`` (an int8 graph) with its NPU regions replaced by calls into the simulator module
    (``external_mods``); the report attached. A module without int8 layers stays as it is,
    with a report that says so."""
    from tvm import relax

    from ...analysis import summarize
    from .codegen import program_from_function, register
    from .cost import cycles
    from .partition import host_reasons, npu_functions, partition, prepare

    npu = spec.npu
    prepared = prepare(mod)
    total_flops = summarize(prepared).flops
    parted = partition(prepared, npu)
    funcs = npu_functions(parted)
    programs = {sym: program_from_function(f, npu.pow2_scales) for sym, f in funcs.items()}
    report = _report(parted, funcs, programs, npu, total_flops, cycles)
    register()
    out = relax.transform.RunCodegen({"npu": {"pow2_scales": npu.pow2_scales}})(parted)
    out = retype_boundaries(out, set(funcs))
    return out.with_attr(REPORT_ATTR, json.dumps(report))


def _report(parted, funcs, programs, npu, total_flops, cycles) -> dict:
    from ...analysis import _layer  # FLOPs per call, the same count as the manifest's
    from .layer import npu_op_type
    from .partition import composite_layers, host_reasons

    npu_flops, on_npu = 0, Counter()
    for func in funcs.values():
        for _name, _var, _args, chain in composite_layers(func):
            for call in chain:
                npu_flops += _layer("npu", call).flops
                kind = npu_op_type(call)
                if kind is not None:
                    on_npu[kind] += 1
    host = host_reasons(parted, npu)
    ops: dict[str, dict] = {}
    for kind in sorted(set(on_npu) | {h["op"] for h in host}):
        mine = [h for h in host if h["op"] == kind]
        ops[kind] = {"npu": on_npu.get(kind, 0), "host": len(mine)}
        if mine:
            ops[kind]["host_reasons"] = [{"name": h["name"], "reason": h["reason"]} for h in mine]
    per_program = {sym: cycles(p, npu) for sym, p in programs.items()}
    return {
        "flops_share": (npu_flops / total_flops) if total_flops else 0.0,
        "flops_npu": int(npu_flops),
        "flops_total": int(total_flops),
        "ops": ops,
        "cycles": int(sum(per_program.values())),
        "programs": [{"symbol": s, "commands": len(p.commands), "cycles": per_program[s]} for s, p in programs.items()],
        "pow2_scales": bool(npu.pow2_scales),
    }


def retype_boundaries(mod, symbols: set):
    """Around each ``call_dps_packed`` of an NPU function in ``main``: uint8 arguments become
    int8 (``u - 128``) and the int8 results uint8 again, on the host, where ``FuseOps`` folds the
    shifts into the neighbouring kernels (the producing ``quantize``, the consuming conv)."""
    import tvm
    from tvm import relax

    call_dps = tvm.ir.Op.get("relax.call_dps_packed")

    @relax.expr_functor.mutator
    class _Retype(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_dps or not isinstance(call.args[0], relax.ExternFunc) or \
                    str(call.args[0].global_symbol) not in symbols:
                return call
            args = [self.builder_.emit(_shift(a, "int8")) for a in call.args[1].fields]
            outs = call.ty_args[0].fields if isinstance(call.ty_args[0], relax.TupleType) else call.ty_args
            new_types = [relax.TensorType(t.shape, "int8") for t in outs]
            res = self.builder_.emit(relax.call_dps_packed(
                call.args[0], relax.Tuple(args), new_types if len(new_types) > 1 else new_types[0]))
            if len(new_types) == 1:
                return _shift(res, "uint8")
            return relax.Tuple([self.builder_.emit(_shift(relax.TupleGetItem(res, i), "uint8"))
                                for i in range(len(new_types))])

    new = mod.copy() if hasattr(mod, "copy") else mod
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new[gv] = _Retype().visit_expr(func)
    return new


def _shift(x, dtype: str):
    """uint8 <-> int8 by +-128 (the same bits with the top one flipped)."""
    from tvm import relax

    wide = relax.op.astype(x, "int16")
    delta = relax.const(-128 if dtype == "int8" else 128, "int16")
    return relax.op.astype(relax.op.add(wide, delta), dtype)


def offload_report(mod) -> dict | None:
    """The report ``offload`` attached to ``mod`` (None: no NPU step ran)."""
    if mod.attrs is None or REPORT_ATTR not in mod.attrs:
        return None
    return json.loads(str(mod.attrs[REPORT_ATTR]))


def format_offload(report: dict) -> str:
    """The offload report as text (``hwc inspect artifact/``)."""
    lines = [f"NPU offload: {100 * report['flops_share']:.1f}% of FLOPs on the NPU "
             f"({report['flops_npu']:,} of {report['flops_total']:,}), estimated {report['cycles']:,} NPU cycles"]
    for op, row in report["ops"].items():
        lines.append(f"  {op:<18} npu {row['npu']:>3}  host {row['host']:>3}")
        for h in row.get("host_reasons", []):
            lines.append(f"      host {h['name']}: {h['reason']}")
    return "\n".join(lines)
