"""Software prefetch for CPU kernels that stream a large operand from memory.

A schedule marks a reduction loop with ``annotate_prefetch(sch, loop, block, buffer,
step_bytes, distance)``: the loop's body reads ``step_bytes`` of ``buffer`` (a weight read once)
contiguously along the buffer's last axis, one step of the loop after the other.
``inject_prefetch`` (a PrimFunc pass in the CPU backend's finalize pipeline, after the
schedules) then starts every iteration with ``llvm.prefetch`` of each cache line that the
iteration ``distance`` bytes ahead will read (``distance_for(target)``: ``DISTANCE``, or none
on CPUs whose hardware prefetchers keep up). The hardware prefetchers alone ramp up per
stream and stop at page boundaries; a batch-1 layer whose weights exceed the last-level
cache (ResNet-18's 512-channel Winograd weights: 37.7 MB) was paced by them.

Prefetching an address past the buffer's end (the last ``ahead`` iterations) is harmless:
x86 ``prefetcht0`` and AArch64 ``prfm`` never fault.
"""

from __future__ import annotations

ATTR = "hwc.prefetch"
# The one switch of every schedule's prefetch (False: ``distance_for`` gives 0 for every target;
# for A/B measurements in one process).
ENABLED = True
# How far ahead weights are prefetched. ResNet-18's 512-channel 7x7 layer as Winograd F(4,3),
# one Zen 1 core, speedup over the direct conv: no prefetch 1.64x, 512 B 1.83x, 1 KB 1.86x,
# 2 KB 1.75x (`tools/bench_winograd.py layers`).
DISTANCE = 1024
LINE = 64  # bytes per cache line (x86, Cortex-A)
# CPUs (LLVM ``mcpu``) whose hardware prefetchers keep up alone, where the software prefetch
# costs: Zen 4, 2:4 GEMV (``cpu_sparse_gemv.lane_kernel``) 2048x2048 one thread 0.366 ms without
# against 0.478 with (weights from DRAM), 0.107 against 0.138 (cached); hwc's dense GEMV
# 0.276 against 0.313 (cached), 0.649 against 0.716 (DRAM); ResNet-18 / -50 / MobileNetV2
# within 3% either way (noise). Zen 1, where the distance was measured, gains (above).
NO_PREFETCH_CPUS = frozenset({"znver4", "znver5"})


def distance_for(target) -> int:
    """Bytes ahead that kernels for ``target`` prefetch streamed weights (0: none)."""
    if not ENABLED:
        return 0
    return 0 if str(target.attrs.get("mcpu", "")) in NO_PREFETCH_CPUS else DISTANCE


def annotate_prefetch(sch, loop, block, buffer, step_bytes: int, distance: int) -> None:
    """Mark ``loop`` (an ancestor of ``block``, which reads ``buffer``, ``step_bytes`` of it per
    iteration along its last axis): each iteration prefetches what the iteration ``distance``
    bytes ahead reads (0: nothing marked; ``distance_for`` gives a target's)."""
    if distance <= 0:
        return
    ahead = max(1, distance // step_bytes)
    elems = LINE * 8 // buffer.dtype.bits  # elements per cache line
    lines = -(-step_bytes // LINE)
    sch.annotate(loop, ATTR, f"{sch.get(block).name_hint}:{buffer.name}:{ahead}:{lines}:{elems}")


def inject_prefetch():
    """``tvm.transform.Pass`` turning ``hwc.prefetch`` loop annotations into prefetches."""
    import tvm

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="hwc.InjectPrefetch")
    def _pass(func, _mod, _ctx):
        return _inject(func)

    return _pass


def _inject(func):
    import tvm_ffi
    from tvm import tirx

    def visit(stmt):
        if ATTR not in stmt.annotations:
            return stmt
        block_name, buffer_name, ahead, lines, elems = str(stmt.annotations[ATTR]).split(":")
        annotations = {k: v for k, v in stmt.annotations.items() if k != ATTR}
        load = _load_ahead(stmt, block_name, buffer_name, int(ahead))
        body = stmt.body
        if load is not None:
            *outer, last = load.indices
            prefetches = [
                tirx.Evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(tirx.BufferLoad(load.source, [*outer, last + j * int(elems)])), 0, 3, 1))
                for j in range(int(lines))
            ]
            body = tirx.SeqStmt([*prefetches, body])
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, annotations, stmt.step)

    body = tvm_ffi.structural_map(func.body, (tirx.For, visit))
    return func if body.same_as(func.body) else func.with_body(body)


def _load_ahead(loop, block_name: str, buffer_name: str, ahead: int):
    """The load of the first ``buffer_name`` element that the block named ``block_name`` under
    ``loop`` reads in iteration ``loop_var + ahead`` (the loops between ``loop`` and the block
    at their first iteration); None if there is no such read."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx

    found = []  # (the loops inside ``loop`` down to the block, the block realize)

    def walk(stmt, inner):
        if found:
            return
        if isinstance(stmt, s_tir.SBlockRealize):
            if stmt.block.name_hint == block_name:
                found.append((inner, stmt))
                return
            walk(stmt.block.body, inner)
        elif isinstance(stmt, tirx.For):
            walk(stmt.body, inner + [stmt])
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                walk(s, inner)
        elif hasattr(stmt, "body"):
            walk(stmt.body, inner)

    walk(loop.body, [])
    if not found:
        return None
    inner, realize = found[0]
    loads = []
    tvm_ffi.structural_walk(realize.block.body, (tvm.ir.TensorLoad, lambda load: loads.append(load) if load.source.name == buffer_name else None))
    if not loads:
        return None
    block_vars = [(iv.var, value) for iv, value in zip(realize.block.iter_vars, realize.iter_values)]
    loop_vars = [(f.loop_var, f.min) for f in inner] + [(loop.loop_var, loop.loop_var + ahead)]
    indices = [_substitute(_substitute(i, block_vars), loop_vars) for i in loads[0].indices]
    return tirx.BufferLoad(loads[0].source, indices)


def _substitute(expr, pairs):
    """``expr`` with each variable of ``pairs`` (``(var, value)``) replaced by its value."""
    import tvm_ffi
    from tvm import tirx

    def replace(var):
        return next((value for key, value in pairs if key.same_as(var)), var)

    return tvm_ffi.structural_map(expr, (tirx.Var, replace))
