"""Default CPU schedule of the Winograd conv kernels that ``passes.winograd`` emits.

A rule of ``backends.cpu_schedule`` (``rule(sch, facts) -> bool``), first in its list: it
returns False for every kernel that holds no Winograd stages. Without it the generic per-block
rule gives these kernels a schedule ~20x slower than the direct conv.
"""

from __future__ import annotations

from ..passes.winograd_te import STAGE_ATTR
from .common import attempt
from .cpu_conv import _vectorize_tail
from .cpu_nest import _extent
from .cpu_prefetch import annotate_prefetch

# A weight slice (one (eps, nu) GEMM's I x O) up to this size stays in L2 while every row tile
# runs over all its column blocks; larger ones are walked column block by column block.
_L2_SLICE_BYTES = 256 * 1024


def schedule_winograd(sch, facts) -> bool:
    """Default CPU schedule of a (fused) Winograd kernel; False if ``sch`` holds none.

    Each stage gets a parallel outer loop: the two one-sided products of each transform are
    computed per (tile, channel vector), unrolled over the tile (so the constant ``A``/``B``
    entries fold away) and vectorized over the channels; the batched GEMM is register-tiled
    (``u`` tiles x ``2 * lanes`` output channels, the accumulator in registers, input channels
    as the reduction outside the tile), parallel over the ``alpha^2`` GEMMs; the output gather
    takes the epilogue (bias, residual add, activation) inlined.
    """
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(get_root_block(sch))}
    stages = {str(sch.get(b).annotations[STAGE_ATTR]): b for b in blocks.values() if STAGE_ATTR in sch.get(b).annotations}
    if not {"data_pad", "data_pack_rows", "data_pack", "bgemm", "inverse_rows", "inverse"} <= set(stages) or "conv2d_winograd" not in blocks:
        return False
    lanes = facts.lanes(32)  # float64 kernels get two vectors per "lane" group: still correct
    for name in ("A", "B", "input_tile"):
        sch.compute_inline(blocks[name])

    # data_pad: a plain parallel copy
    pad_loops = sch.get_loops(stages["data_pad"])
    sch.parallel(sch.fuse(*pad_loops[:2]))
    _vectorize_tail(sch, pad_loops[-1], lanes)

    _schedule_transform(sch, stages["data_pack"], stages["data_pack_rows"], lanes)
    _schedule_bgemm(sch, stages["bgemm"], lanes, facts.prefetch_bytes)
    _schedule_transform(sch, stages["inverse"], stages["inverse_rows"], lanes)

    # output gather + inlined epilogue
    out = blocks["conv2d_winograd"]
    for consumer in list(sch.get_consumers(out)):
        attempt(sch.reverse_compute_inline, consumer)
    done = set(stages) | {"A", "B", "input_tile"}
    for block in sch.get_child_blocks(get_root_block(sch)):
        name = sch.get(block).name_hint
        if name not in blocks or name in done:
            continue  # a stage scheduled above, or a block the scheduling made (init, cache)
        loops = sch.get_loops(block)
        if not loops:
            continue
        sch.parallel(sch.fuse(*loops[: max(len(loops) - 2, 1)]))
        _vectorize_tail(sch, loops[-1], lanes)
    return True


def _schedule_bgemm(sch, bgemm, lanes: int, prefetch_bytes: int) -> None:
    """Batched GEMM (eps, nu, p, o, k): ``u x (nv * lanes)`` register tile, parallel over the
    GEMMs (and the column blocks when a weight slice is too large to stay in L2); weights
    prefetched ``prefetch_bytes`` ahead (0: not)."""
    eps, nu, p, o, k = sch.get_loops(bgemm)
    n_p, n_o, n_k = _extent(sch, p), _extent(sch, o), _extent(sch, k)
    nv = 2 if n_o % (2 * lanes) == 0 else 1
    v = nv * lanes if n_o % lanes == 0 else 1
    u = _gemm_rows(n_p)
    p_o, p_i = sch.split(p, [None, u])  # may not divide: the last row block is predicated
    o_o, o_m, o_l = sch.split(o, [None, nv if v > 1 else 1, v // nv if v > 1 else 1])
    # The write-back tiles are "global" (stack arrays, which LLVM keeps in registers), not
    # "local" (workspace memory in TVM 0.27): around the prefetch call LLVM stored "local"
    # accumulators back every iteration (tests/unit/test_cpu_prefetch.py).
    if n_k * n_o * 4 <= _L2_SLICE_BYTES:
        # the whole weight slice stays in cache: a row tile's inputs stay in L1 over the columns
        sch.reorder(eps, nu, p_o, o_o, k, p_i, o_m, o_l)
        write_back = sch.cache_write(bgemm, 0, "global")
        sch.reverse_compute_at(write_back, o_o, preserve_unit_loops=True)
        sch.parallel(sch.fuse(eps, nu))
        depth = 3  # parallel, p_o, o_o
    else:
        # a column block (I x v weights) stays in cache across the row tiles
        sch.reorder(eps, nu, o_o, p_o, k, p_i, o_m, o_l)
        write_back = sch.cache_write(bgemm, 0, "global")
        sch.reverse_compute_at(write_back, p_o, preserve_unit_loops=True)
        sch.parallel(sch.fuse(eps, nu, o_o))
        depth = 2  # parallel, p_o
    sch.unroll(p_i)
    sch.unroll(o_m)
    (sch.vectorize if v > 1 else sch.unroll)(o_l)
    init = sch.decompose_reduction(bgemm, k)
    if depth == 2 or n_p <= u:
        # the weights come from memory once (a column block at a time, or all of them for
        # the only row block): prefetch them ahead of the reads
        weight = sch.get(bgemm).reads[-1].source
        annotate_prefetch(sch, sch.get_loops(bgemm)[depth], bgemm, weight, v * weight.dtype.bits // 8, prefetch_bytes)
    for block in (init, write_back):
        loops = sch.get_loops(block)[depth:]
        for loop in loops[:-1]:
            sch.unroll(loop)
        (sch.vectorize if v > 1 else sch.unroll)(loops[-1])


def _schedule_transform(sch, second, first, lanes: int) -> None:
    """A Winograd transform: ``second`` (a, j, p, c, r) reads ``first`` (i, b, p, c, r), the two
    one-sided products. Per (tile, channel vector) in parallel, ``first`` is computed into a
    local buffer, both unrolled over the tile and vectorized over the channels."""
    a, j, p, c, r = sch.get_loops(second)
    c_o, c_i = _split_lanes(sch, c, lanes)
    sch.reorder(*_present(p, c_o, a, j, r, c_i))
    sch.parallel(sch.fuse(p, c_o) if c_o is not None else p)
    anchor = sch.get_loops(second)[0]
    sch.set_scope(first, 0, "local")
    sch.compute_at(first, anchor, preserve_unit_loops=True)
    *spatial, first_r = sch.get_loops(first)[1:]  # i, b, p (1), c | r: under the parallel loop
    first_c = spatial[-1] if c_i is not None else None
    if first_c is not None:
        sch.reorder(first_r, first_c)
    # per block: the loops unrolled, its reduction loop, its channel loop (None: not vectorized)
    for block, unrolled, red, channels in ((second, (a, j), r, c_i), (first, spatial[:-1], first_r, first_c)):
        for loop in (*unrolled, red):
            sch.unroll(loop)
        if channels is None:
            sch.decompose_reduction(block, red)
            continue
        sch.vectorize(channels)  # before decompose_reduction: after it the update is no reduction
        init = sch.decompose_reduction(block, red)
        sch.vectorize(sch.get_loops(init)[-1])


def _gemm_rows(tiles: int, sizes=(6, 5, 4)) -> int:
    """Rows of the GEMM register tile (6 x 2 vectors fill 12 of 16 registers): the size in
    ``sizes`` that wastes the fewest padded rows (a larger one on ties); all rows when there
    are fewer than the smallest size."""
    if tiles < min(sizes):
        return tiles
    return min(sizes, key=lambda u: (-(-tiles // u) * u, -u))


def _split_lanes(sch, loop, lanes: int):
    """``loop`` split into ``(outer, lanes)`` when it divides, else ``(loop, None)``."""
    if _extent(sch, loop) % lanes == 0 and _extent(sch, loop) > lanes:
        return tuple(sch.split(loop, [None, lanes]))
    if _extent(sch, loop) == lanes:
        outer = sch.add_unit_loop(loop)
        return outer, loop
    return loop, None


def _present(*loops) -> list:
    return [loop for loop in loops if loop is not None]
