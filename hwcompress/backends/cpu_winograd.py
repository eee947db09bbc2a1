"""Default CPU schedule of the Winograd conv kernels that ``passes.winograd`` emits.

A rule of ``backends.cpu_schedule`` (``rule(sch, facts) -> bool``), first in its list: it
returns False for every kernel that holds no Winograd stages. Without it the generic per-block
rule gives these kernels a schedule ~20x slower than the direct conv.
"""

from __future__ import annotations

def schedule_winograd(sch, facts) -> bool:
    """Default CPU schedule of a (fused) Winograd kernel; False if ``sch`` holds none.

    Each stage gets a parallel outer loop: the data transform and the inverse are unrolled over
    the tile (so the constant ``A``/``B`` entries fold away) and vectorized over the channels;
    the batched GEMM is register-tiled (``u`` tiles x ``2 * lanes`` output channels, the
    accumulator in registers, input channels as the reduction outside the tile); the output
    gather takes the epilogue (bias, residual add, activation) inlined.
    """
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(get_root_block(sch))}
    rules = {str(sch.get(b).annotations.get("schedule_rule", "")): b for b in blocks.values()}
    data_pack = next((b for r, b in rules.items() if r.endswith("_winograd_data_pack")), None)
    inverse = next((b for r, b in rules.items() if r.endswith("_winograd_inverse")), None)
    if data_pack is None or inverse is None or "bgemm" not in blocks or "conv2d_winograd" not in blocks:
        return False
    lanes = facts.lanes(32)  # float64 kernels get two vectors per "lane" group: still correct
    for name in ("A", "B", "input_tile"):
        sch.compute_inline(blocks[name])

    # data_pad: a plain parallel copy
    pad_loops = sch.get_loops(blocks["data_pad"])
    sch.parallel(sch.fuse(*pad_loops[:2]))
    _vectorize_tail(sch, pad_loops[-1], lanes)

    # data transform (eps, nu, p, c, r_a, r_b) -> p, c_o | eps, nu, r_a, r_b | c_i
    _schedule_transform(sch, data_pack, lanes)

    # batched GEMM (eps, nu, p, o, k): u x (nv * lanes) register tile
    bgemm = blocks["bgemm"]
    eps, nu, p, o, k = sch.get_loops(bgemm)
    n_p, n_o = _extent(sch, p), _extent(sch, o)
    nv = 2 if n_o % (2 * lanes) == 0 else 1
    v = nv * lanes if n_o % lanes == 0 else 1
    u = _gemm_rows(n_p)
    p_o, p_i = sch.split(p, [None, u])  # may not divide: the last row block is predicated
    o_o, o_m, o_l = sch.split(o, [None, nv if v > 1 else 1, v // nv if v > 1 else 1])
    # o_o outside p_o: the weight column block (CI x v) stays in cache across the tiles
    sch.reorder(eps, nu, o_o, p_o, k, p_i, o_m, o_l)
    write_back = sch.cache_write(bgemm, 0, "local")
    sch.reverse_compute_at(write_back, p_o, preserve_unit_loops=True)
    sch.parallel(sch.fuse(eps, nu, o_o))
    sch.unroll(p_i)
    sch.unroll(o_m)
    (sch.vectorize if v > 1 else sch.unroll)(o_l)
    init = sch.decompose_reduction(bgemm, k)
    for block in (init, write_back):
        loops = sch.get_loops(block)[2:]  # under the parallel loop and p_o
        for loop in loops[:-1]:
            sch.unroll(loop)
        (sch.vectorize if v > 1 else sch.unroll)(loops[-1])

    # inverse transform (vh, vw, p, o, r_a, r_b): the same shape as the data transform
    _schedule_transform(sch, inverse, lanes)

    # output gather + inlined epilogue
    out = blocks["conv2d_winograd"]
    for consumer in list(sch.get_consumers(out)):
        _try(sch.reverse_compute_inline, consumer)
    done = {"A", "B", "input_tile", "data_pad", "data_pack", "bgemm", "inverse"}
    for block in sch.get_child_blocks(get_root_block(sch)):
        if sch.get(block).name_hint not in blocks or sch.get(block).name_hint in done:
            continue  # a stage scheduled above, or a block the scheduling made (init, cache)
        loops = sch.get_loops(block)
        if not loops:
            continue
        sch.parallel(sch.fuse(*loops[: max(len(loops) - 2, 1)]))
        _vectorize_tail(sch, loops[-1], lanes)
    return True


def _schedule_transform(sch, block, lanes: int) -> None:
    """A Winograd transform stage (a, b, p, c, r_a, r_b): tile and reduction loops unrolled
    (the constant matrix entries fold away), channels vectorized, tiles x channel blocks
    parallel."""
    a, b, p, c, r_a, r_b = sch.get_loops(block)
    c_o, c_i = _split_lanes(sch, c, lanes)
    sch.reorder(*_present(p, c_o, a, b, r_a, r_b, c_i))
    sch.parallel(sch.fuse(p, c_o))
    for loop in (a, b, r_a, r_b):
        sch.unroll(loop)
    # vectorize before decompose_reduction: after it the update block is no reduction block
    _vectorize_or_unroll(sch, c_i)
    init = sch.decompose_reduction(block, r_a)
    _vectorize_or_unroll(sch, sch.get_loops(init)[-1] if c_i is not None else None)


def _gemm_rows(tiles: int) -> int:
    """Rows of the GEMM register tile (6 x 2 vectors fill 12 of 16 registers): the size in
    6, 5, 4 that wastes the fewest padded rows (a larger one on ties)."""
    if tiles < 4:
        return tiles
    return min((6, 5, 4), key=lambda u: (-(-tiles // u) * u, -u))


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


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


def _vectorize_or_unroll(sch, *loops) -> None:
    """Vectorize each loop that exists (``_split_lanes`` gives None when it cannot)."""
    for loop in loops:
        if loop is not None:
            sch.vectorize(loop)


def _vectorize_tail(sch, loop, lanes: int) -> None:
    """Vectorize an innermost elementwise loop by ``lanes`` when it divides evenly."""
    n = _extent(sch, loop)
    if n % lanes == 0:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


def _try(primitive, *args) -> bool:
    try:
        primitive(*args)
        return True
    except Exception:  # ScheduleError: not legal here; the schedule is unchanged
        return False
