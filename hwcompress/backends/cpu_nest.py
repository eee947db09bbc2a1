"""Loop-nest analysis and the schedule helpers that both CPU rules (``cpu_rules``) use.

``_nest`` describes a block whose loops are exactly its iteration variables (the plain nest that
TE and legalization emit): extents, which loops reduce, which output dimension each loop
indexes, and how each operand is read. ``_schedule_block`` gives one such nest the generic
schedule (parallel outer loops, vectorized innermost loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cpu_schedule import CpuFacts

# Below this many loop iterations a parallel region costs more than it saves.
_MIN_PARALLEL_WORK = 4096


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Load:
    buffer: object
    indices: tuple
    read_index: int  # position of the buffer in the block's reads


@dataclass(frozen=True)
class _Nest:
    """A block whose loops are exactly its iteration variables, in order."""

    block: object
    vars: tuple  # tirx.Var per loop
    extents: tuple  # int per loop
    reduce: tuple  # bool per loop
    out_dims: tuple  # output buffer dimension of each loop (None: not indexed)
    loads: tuple  # _Load per distinct buffer read
    dtype_bits: int


def _root_blocks(sch):
    from tvm.s_tir.dlight.analysis import get_root_block

    return list(sch.get_child_blocks(get_root_block(sch)))


def _collect(node, cls) -> list:
    """Every sub-node of ``node`` that is a ``cls``, in post order."""
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(node, (cls, found.append), order="post")
    return found


def _vars_in(expr) -> set:
    import tvm

    return set(_collect(expr, tvm.tirx.Var))


def _has_reduction(stmt) -> bool:
    return any(int(iv.iter_type) != 0 for iv in stmt.iter_vars)


def _has_select(stmt) -> bool:
    import tvm

    if _collect(stmt.body, tvm.tirx.Select):
        return True
    return any("if_then_else" in str(getattr(c, "op", "")) for c in _collect(stmt.body, tvm.ir.Call))


def _nest(sch, block) -> _Nest | None:
    """Describe ``block`` if its loop nest is the plain one TE/legalization emits."""
    import tvm

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(stmt.iter_vars) or len(stmt.writes) != 1:
        return None
    realize = sch.get(loops[-1]).body
    if not isinstance(realize, tvm.s_tir.SBlockRealize):
        return None
    for loop, value in zip(loops, realize.iter_values):
        if not value.same_as(sch.get(loop).loop_var):
            return None
    if not all(isinstance(iv.dom.extent, tvm.tirx.IntImm) for iv in stmt.iter_vars):
        return None
    store = stmt.body
    out = _source(stmt.writes[0])
    if not isinstance(store, tvm.tirx.BufferStore) or not store.buffer.same_as(out):
        return None
    block_vars = [iv.var for iv in stmt.iter_vars]
    out_dims = []
    for var in block_vars:
        dims = [d for d, idx in enumerate(store.indices) if idx.same_as(var)]
        out_dims.append(dims[0] if len(dims) == 1 else None)
    loads = {}
    loaded = _collect(store.value, tvm.ir.TensorLoad)
    read_bufs = [_source(r) for r in stmt.reads]
    for ld in loaded:
        if _source(ld).same_as(out):
            continue
        pos = [i for i, b in enumerate(read_bufs) if b.same_as(_source(ld))]
        if not pos:
            return None
        prev = loads.get(pos[0])
        if prev is not None and not all(a.same_as(b) for a, b in zip(prev.indices, ld.indices)):
            return None  # one buffer read at two different places: keep it simple
        loads[pos[0]] = _Load(_source(ld), tuple(ld.indices), pos[0])
    return _Nest(
        block=block,
        vars=tuple(block_vars),
        extents=tuple(int(iv.dom.extent) for iv in stmt.iter_vars),
        reduce=tuple(int(iv.iter_type) != 0 for iv in stmt.iter_vars),
        out_dims=tuple(out_dims),
        loads=tuple(loads.values()),
        dtype_bits=out.dtype.bits,
    )


def _source(region_or_load):
    """The buffer of a region or load (``source`` since TVM 0.27, ``buffer`` before)."""
    source = getattr(region_or_load, "source", None)
    return region_or_load.buffer if source is None else source


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def _vector_lanes(extent: int, lanes: int) -> int | None:
    """Lanes for a loop of ``extent``: the target's, else the largest divisor >= 4."""
    if extent % lanes == 0:
        return lanes
    best = [d for d in _divisors(extent, lanes) if d >= 4]
    return best[-1] if best else None


# ---------------------------------------------------------------------------- schedule helpers


def _index(sch, blocks, block) -> int:
    return next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(block)))


def _contains(sch, outer_block, inner_block) -> bool:
    return any(sch.get(b).same_as(sch.get(inner_block)) for b in _all_blocks_under(sch, outer_block))


def _all_blocks_under(sch, block):
    out = []
    for child in sch.get_child_blocks(block):
        out.append(child)
        out.extend(_all_blocks_under(sch, child))
    return out


def _unroll_vectorize(sch, loops, vectorize: bool) -> None:
    """Unroll a small register-tile nest; vectorize its innermost loop when contiguous."""
    if not loops:
        return
    for loop in loops[:-1]:
        sch.unroll(loop)
    if vectorize and _extent(sch, loops[-1]) > 1:
        sch.vectorize(loops[-1])
    else:
        sch.unroll(loops[-1])


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _schedule_block(sch, block, facts: CpuFacts) -> None:
    """Parallel outer spatial loops; spatial blocks also get their innermost loop vectorized."""
    nest = _nest(sch, block)
    loops = sch.get_loops(block)
    if nest is None or not loops:
        return
    work = 1
    for ext in nest.extents:
        work *= ext
    parallel = facts.num_cores > 1 and work >= _MIN_PARALLEL_WORK
    if any(nest.reduce):
        spatial = [lp for lp, r in zip(loops, nest.reduce) if not r]
        sch.reorder(*spatial, *[lp for lp, r in zip(loops, nest.reduce) if r])
        if spatial and parallel:
            sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        return
    lanes = facts.lanes(nest.dtype_bits)
    outer = list(loops)
    if nest.extents[-1] % lanes == 0:
        rest, vec = sch.split(loops[-1], [None, lanes])
        outer = outer[:-1] + [rest]
    elif 2 <= nest.extents[-1] <= 2 * lanes and not _has_select(sch.get(block)):
        vec = loops[-1]
        outer = outer[:-1]
    else:  # leave the innermost loop whole: LLVM vectorizes it better than a fused index
        vec = None
        outer = outer[:-1] if len(outer) > 1 else outer
    if vec is not None and work >= lanes:
        sch.vectorize(vec)
    if parallel and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
