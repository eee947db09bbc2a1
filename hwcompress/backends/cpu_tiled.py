"""``tiled_reduction``, the CPU rule for one reduction block with its producers and epilogue
(the rule's behaviour is described in ``cpu_rules``): tile planning and the schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import attempt
from .cpu_nest import (
    _MIN_PARALLEL_WORK,
    _contains,
    _divisors,
    _extent,
    _has_reduction,
    _has_select,
    _index,
    _Load,
    _Nest,
    _nest,
    _root_blocks,
    _schedule_block,
    _source,
    _unroll_vectorize,
    _vars_in,
    _vector_lanes,
)

if TYPE_CHECKING:
    from .cpu_schedule import CpuFacts

# A repacked operand must be reused at least this often, or the copy is not worth it.
_MIN_REPACK_REUSE = 4


# ---------------------------------------------------------------------------- tile planning


@dataclass(frozen=True)
class _TilePlan:
    v: int  # loop vectorized
    lanes: int
    nv: int  # vectors along v in the register tile
    u: int | None  # second, unrolled loop of the register tile
    ut: int
    repack: tuple  # _Load operands to repack so that v is their innermost dimension


def _classify(load: _Load, nest: _Nest, v: int) -> str:
    """How ``load`` is accessed along loop ``v``: bcast, contig, strided, repack or bad."""
    import tvm
    from tvm.sym.pattern import detect_linear_equation

    var = nest.vars[v]
    uses = [var in _vars_in(idx) for idx in load.indices]
    if not any(uses):
        return "bcast"
    if uses[-1] and not any(uses[:-1]):
        coef = detect_linear_equation(load.indices[-1], [var])
        if len(coef) == 2 and isinstance(coef[0], tvm.tirx.IntImm):
            return "contig" if int(coef[0]) == 1 else "strided"
        return "bad"
    if sum(uses) != 1 or not any(idx.same_as(var) for idx in load.indices):
        return "bad"
    used = set().union(*(_vars_in(idx) for idx in load.indices))
    allowed = {var} | {nest.vars[i] for i, r in enumerate(nest.reduce) if r}
    if not used <= allowed:
        return "bad"
    reuse = 1
    for i, r in enumerate(nest.reduce):
        if not r and nest.vars[i] not in used:
            reuse *= nest.extents[i]
    return "repack" if reuse >= _MIN_REPACK_REUSE else "bad"


def _plan(nest: _Nest, facts: CpuFacts) -> _TilePlan | None:
    lanes_max = facts.lanes(nest.dtype_bits)
    best = None
    for v, (ext, red) in enumerate(zip(nest.extents, nest.reduce)):
        if red or ext < 4 or nest.out_dims[v] is None:
            continue
        lanes = _vector_lanes(ext, lanes_max)
        if lanes is None:
            continue
        kinds = [_classify(ld, nest, v) for ld in nest.loads]
        if "bad" in kinds:
            continue
        cost = 2 * kinds.count("strided") + kinds.count("repack") + (lanes != lanes_max)
        key = (cost, -v)  # ties: the later loop, usually the contiguous one
        if best is None or key < best[0]:
            best = (key, v, lanes, kinds)
    if best is None:
        return None
    _, v, lanes, kinds = best
    u, u_reuse = None, 0
    for i, (ext, red) in enumerate(zip(nest.extents, nest.reduce)):
        if red or i == v or ext < 2 or nest.out_dims[i] is None:
            continue
        reused = sum(
            1 for ld, k in zip(nest.loads, kinds) if k != "bcast" and nest.vars[i] not in set().union(*(_vars_in(x) for x in ld.indices))
        )
        if reused and reused >= u_reuse:
            u, u_reuse = i, reused
    candidates = []
    for nv in _divisors(nest.extents[v] // lanes, 4):
        for ut in _divisors(nest.extents[u], facts.acc_regs) if u is not None else [1]:
            if nv * ut <= facts.acc_regs:
                candidates.append((nv * ut / (nv + ut), nv * ut, nv, ut))
    _, _, nv, ut = max(candidates)
    repack = tuple(ld for ld, k in zip(nest.loads, kinds) if k == "repack")
    return _TilePlan(v=v, lanes=lanes, nv=nv, u=u if ut > 1 else None, ut=ut, repack=repack)


# ---------------------------------------------------------------------------- the rule


def tiled_reduction(sch, facts: CpuFacts) -> bool:
    """Register-tiled schedule of the single reduction block, epilogue fused (see module doc)."""
    from tvm.tirx import IndexMap

    blocks = _root_blocks(sch)
    reductions = [b for b in blocks if _has_reduction(sch.get(b))]
    if len(reductions) != 1:
        return False
    anchor = reductions[0]
    pooling = _operand_count(sch.get(anchor)) == 1
    for block in reversed(blocks[: _index(sch, blocks, anchor)]):
        # a conv's padding stays a cheap separate pass (a select in its multiply-add loop
        # costs more than the copy); a pool reads each input a few times only, and the padded
        # copy cost 4x the pool itself (max_pool2d 1x112x112x64: 0.44 -> 0.09 ms inlined)
        if pooling or not _has_select(sch.get(block)):
            attempt(sch.compute_inline, block)
    nest = _nest(sch, anchor)
    plan = _plan(nest, facts) if nest is not None else None
    if plan is None:
        return False
    blocks = _root_blocks(sch)
    consumers = blocks[_index(sch, blocks, anchor) + 1 :]

    for ld in plan.repack:
        p = next(d for d, idx in enumerate(ld.indices) if idx.same_as(nest.vars[plan.v]))
        cache = sch.cache_read(anchor, ld.read_index, "global")
        lanes = plan.lanes
        ndim = len(ld.indices)
        sch.transform_layout(
            cache,
            ("write", 0),
            IndexMap.from_func(lambda *i: (*i[:p], i[p] // lanes, *i[p + 1 :], i[p] % lanes), ndim=ndim),
        )

    loops = sch.get_loops(anchor)
    v_o, v_m, v_l = sch.split(loops[plan.v], [None, plan.nv, plan.lanes])
    u_i = None
    outer = []
    for i, loop in enumerate(loops):
        if nest.reduce[i]:
            continue
        if i == plan.v:
            outer.append(v_o)
        elif i == plan.u:
            u_o, u_i = sch.split(loop, [None, plan.ut])
            outer.append(u_o)
        else:
            outer.append(loop)
    reduce_loops = [loop for i, loop in enumerate(loops) if nest.reduce[i]]
    sch.reorder(*outer, *reduce_loops, *([u_i] if u_i is not None else []), v_m, v_l)

    # accumulator in registers: a local tile with v innermost, u next to it
    write_back = sch.cache_write(anchor, 0, "local")
    ndim = len(sch.get(anchor).body.indices)
    tile_dims = ([nest.out_dims[plan.u]] if plan.u is not None else []) + [nest.out_dims[plan.v]]
    order = [d for d in range(ndim) if d not in tile_dims] + tile_dims
    sch.transform_layout(anchor, ("write", 0), IndexMap.from_func(lambda *i: tuple(i[d] for d in order), ndim=ndim))
    for consumer in consumers:  # bias / BN / relu / residual add, computed on the registers
        if not attempt(sch.reverse_compute_inline, consumer):
            break
    sch.reverse_compute_at(write_back, outer[-1], preserve_unit_loops=True)
    if u_i is not None:
        sch.unroll(u_i)
    sch.unroll(v_m)
    sch.vectorize(v_l)
    v_is_contiguous = nest.out_dims[plan.v] == ndim - 1
    _unroll_vectorize(sch, sch.get_loops(write_back)[len(outer) :], vectorize=v_is_contiguous)

    work = 1
    for ext in nest.extents:
        work *= ext
    if facts.num_cores > 1 and work >= _MIN_PARALLEL_WORK:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        outer = _parallel_chunks(sch, fused, facts)
    if reduce_loops:  # last: the update block without init no longer passes loop-kind checks
        init = sch.decompose_reduction(anchor, reduce_loops[0])
        _unroll_vectorize(sch, sch.get_loops(init)[len(outer) :], vectorize=True)
    for block in _root_blocks(sch):  # padding, repacked operands, epilogues left over
        if not sch.get(block).same_as(sch.get(anchor)) and not _contains(sch, block, anchor):
            _schedule_block(sch, block, facts)
    return True


def _operand_count(block) -> int:
    """Buffers a reduction block reads besides its own output: 1 for a pool, 2 for a product
    (conv, matmul)."""
    written = [_source(region) for region in block.writes]
    return len({_source(region) for region in block.reads if not any(_source(region).same_as(w) for w in written)})


def _parallel_chunks(sch, loop, facts: CpuFacts) -> list:
    """Parallelize ``loop`` as a few tasks per core, each a serial loop over its chunk: a
    parallel loop of many tiny iterations keeps its tile accumulators in memory."""
    extent = _extent(sch, loop)
    tasks = [d for d in _divisors(extent, 16 * facts.num_cores) if d >= facts.num_cores]
    if not tasks or tasks[-1] == extent:
        sch.parallel(loop)
        return [loop]
    chunks = sch.split(loop, [tasks[-1], None])
    sch.parallel(chunks[0])
    return list(chunks)
