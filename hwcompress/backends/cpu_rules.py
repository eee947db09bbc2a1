"""The rules ``default_cpu_schedule`` (in ``cpu_schedule``) tries, and their loop-nest analysis.

``tiled_reduction``: one multiply-accumulate / max / sum reduction block (conv2d incl.
depthwise and grouped, matmul / dense / GEMV, pooling) with injective producers (padding)
and an elementwise epilogue (bias, BN arithmetic, relu, residual add). The output is
register-tiled (``u`` x ``v``: ``v`` vectorized with the target's lanes, both unrolled),
the reduction loops stay outside the tile, the accumulator is a small ``local`` buffer
(``cache_write``, laid out with ``v`` innermost so LLVM keeps it in registers), the epilogue
is inlined into the write-back, and a weight-like operand that would be read with a stride
along ``v`` is repacked (``cache_read`` + ``transform_layout``) once per call.

``per_block``: inline injective producers (unless ``inline=False``), then parallelize the
outer spatial loops and vectorize the innermost spatial loop of every remaining block
(softmax, mean, transpose, reshape, pad, elementwise).

A rule takes a fresh ``Schedule`` and the ``CpuFacts`` and returns False when it does not fit;
otherwise it yields a schedule equivalent to the input or raises (the primitives check legality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cpu_schedule import CpuFacts

# Below this many loop iterations a parallel region costs more than it saves.
_MIN_PARALLEL_WORK = 4096
# A repacked operand must be reused at least this often, or the copy is not worth it.
_MIN_REPACK_REUSE = 4


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


# ---------------------------------------------------------------------------- rules


def tiled_reduction(sch, facts: CpuFacts) -> bool:
    """Register-tiled schedule of the single reduction block, epilogue fused (see module doc)."""
    from tvm.tirx import IndexMap

    blocks = _root_blocks(sch)
    reductions = [b for b in blocks if _has_reduction(sch.get(b))]
    if len(reductions) != 1:
        return False
    anchor = reductions[0]
    for block in reversed(blocks[: _index(sch, blocks, anchor)]):
        if not _has_select(sch.get(block)):  # padding stays a cheap separate pass
            _attempt(sch.compute_inline, block)
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
        if not _attempt(sch.reverse_compute_inline, consumer):
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


def _attempt(primitive, *args) -> bool:
    try:
        primitive(*args)
        return True
    except Exception:  # ScheduleError: not legal here, the schedule is unchanged
        return False


def per_block(sch, facts: CpuFacts, inline: bool = True) -> bool:
    """Inline injective producers, then parallelize + vectorize each remaining loop nest."""
    if inline:
        for block in reversed(_root_blocks(sch)[:-1]):
            if not _has_reduction(sch.get(block)):
                _attempt(sch.compute_inline, block)
    for block in _root_blocks(sch):
        _schedule_block(sch, block, facts)
    return True


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
