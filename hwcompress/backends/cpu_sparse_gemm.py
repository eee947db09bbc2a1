"""The ``BROADCAST`` 2:4 kernel of ``cpu_sparse`` (``m > 1``): ``x`` transposed, one broadcast
kept weight times the ``x`` row its position selects, vectorized over ``m``.

Per call, ``x`` is copied once into ``xt[mblk, k, MV * lanes]``: for each m-block (``MV``
vectors of ``m``, the last one shifted back to end at the last vector and zero past ``m``)
the ``k`` rows of that block's ``x`` columns, contiguous. A register tile is ``rows`` output
rows x ``MV`` m-vectors; per kept weight ``w = values[n, q]`` at ``k = 4 g + pos``: one
broadcast of ``w`` and ``MV`` FMAs ``acc[r, j] += w * xt[mb, k, 8j : 8j + 8]``, each with its
``xt`` load as the memory operand. No permutes, half of dense's FMAs; but each FMA loads 32
bytes of ``xt`` (positions differ per row: no ``x`` vector is shared between rows), so the
``xt`` rows must come from L1: with ``k_block`` the reduction is cut into chunks of
``k_block`` (``xt`` chunk = ``k_block * MV * 32`` bytes, e.g. 128 x 7 vectors = 28 KB) and the
loop nest is m-block, chunk, n-block: every row of a task sweeps one L1-resident chunk before
the next. The partial sums of a tile go to a scratch ``yt[n, mblk * MV * lanes]`` after every
chunk (``2 * rows * MV`` vector loads/stores per chunk against ``rows * MV * k_block / 2``
FMAs); at the end ``yt`` is transposed into ``y`` (``[m, n]``: a tile is a column of it) in
8x8 register blocks, 64 ``n`` at a time (the ``x`` copy likewise; element loops for the ``k``
and ``n`` past a multiple of 8). Vectors are 8 lanes on AVX-512 hosts too: ``variants`` blocks
``m`` in vectors of 8, and a 16-lane kernel could not be run (tested) on the AVX2 machines this
was built on.

The inner loop's accumulators stay in registers (``vfmadd231ps mem, bcast, acc``; the local
buffer is promoted, the tests check the assembly). What bounds it is loads: ``MV`` FMAs with a
32-byte memory operand plus one broadcast per kept weight, against Zen 3's two vector loads
per cycle, ~4 cycles per kept weight at ``MV = 7`` where the FMAs alone need 3.5.

``Variant.shared`` (weights whose rows ``2i``, ``2i + 1`` keep the same positions,
``Sparse24.pairs``): per kept position and m vector one ``xt`` load into a register feeds the
pair's two FMAs (register operands only; 2 rows x at most 6 vectors of accumulators), so the
loop is FMA-bound rather than load-bound. Measured (Zen 1, 1 thread, kernel alone, interleaved
with hwc's dense): 48x2048x512 1.60x over dense, 196x1024x256 1.62x, where the per-row
kernel gave 1.26x on the same weights.

``Variant.tail`` (shared, ``m % 8 == 1``: every odd square map, 7x7 = 49 the common one): 7
m vectors would need 14 accumulators plus the shared ``x`` and two broadcasts (17 of AVX2's
16 registers), and 4-vector blocks recompute one. Instead the blocks cover ``m - 1`` rows and
the last row rides along: per kept value of a pair, the ``x`` of that row under the pair's
position is copied (a scalar load and store, no register held) into a per-task buffer
``xg``; after the pair's chunk, two 8-wide dot products of the pair's kept values with ``xg``
give the row's two outputs (kept in ``y``'s last row between chunks). Measured (Zen 1, through
the VM, 1 / 2 threads): 49x2048x512 1.59x / 1.61x over dense, 49x512x2048 1.55x / 1.55x, where
4-vector blocks gave 1.34x; the copy costs ~11% over the 48 rows alone (even storing a
constant costs 8%: this loop has no slack for memory operations).

``Variant.by_m``: the parallel tasks are the m-blocks, not ranges of output rows. A task
transposes its block's ``x`` one reduction chunk at a time into a buffer of its own (it stays
in L1: no ``xt`` of all of ``x`` written to and read back from memory), sweeps every row over
it, and at the end transposes its columns of ``yt`` into its rows of ``y``. Rows reuse each
chunk ``n / rows`` times instead of ``per`` times, which is what the narrowing 1x1 convs (128
or 64 outputs, a large map) lacked: with tasks over rows every task streamed all of ``xt``
(784x512: 1.6 MB, more than L2) for 8 row pairs. Each thread takes an equal share of whole
blocks and a row range of each block left over (``by_m_tasks``; a cut block's ranges each
transpose the same chunks: 49x512x2048, one block, 2 threads: 1.56x against 1.66x, so
``variants`` offers it only from 2 blocks and puts it first from ``cpu_sparse.BY_M_FIRST``).
Measured (Zen 1, through the VM, pairs, 1 / 2 threads): 784x128x512 1.55x / 1.66x over dense
where tasks over rows gave 1.31x / 1.04x; 3136x64x256 1.44x / 1.37x against 1.08x / 1.00x.

The weights are chunk-major (``pack_chunks``, ``cpu_sparse.kernel_operands``): chunk ``c``'s
kept values and positions of every row contiguous, ``[chunks, n, kb/2]`` and ``[chunks, n,
kb/8]``. Row-major (``mask24``'s form), the rows' sweep over one chunk read 256 bytes per row
at a row's stride (4 KB at k = 2048: every read a new page, which no hardware prefetcher
follows): fine while the weights sit in L2/L3, slow when they come from memory, as every
layer's do in a model larger than the caches. Measured (Zen 4, pairs, ``tools/bench_sparse.py
--cold``: weights from DRAM, 1 / 2 threads, over dense): 49x512x2048 0.91x / 0.96x row-major,
1.38x / 1.29x chunk-major; 196x1024x256 1.40x / 1.19x -> 1.59x / 1.41x; 196x256x1024 1.24x /
1.14x -> 1.46x / 1.35x; 784x128x512 1.48x -> 1.65x (1 thread).

``Variant.wide`` on Zen 4 (AVX-512 executed as two 256-bit halves: the same FMA rate as 8
lanes): the 8-lane pairs loop issues ~19 instructions per kept value at 4 vectors per block (4
loads, 8 FMAs, 2 broadcasts, the position decode) and runs at the core's instruction rate; 16
lanes halve the vector ones. Measured (1 thread, kernel alone): 3136x64x256 0.613 ms against
0.703 for the same blocks in 8 lanes; where 8-lane blocks are an odd number of vectors (5, at
784 and 196 rows) the even blocks waste more rows and lose (``cpu_sparse.WIDE_COPIES``).

Measured (Zen 3, 1 thread, kernel alone, 49x2048x512, rows 2 x 7 vectors): no chunks 1.57 ms
(``xt``, 114 KB, streams from L2: 0.8 FMA/cycle); chunks of 128 1.29 ms; ``y`` written by
columns straight from the tile suffered L1 set conflicts (``y``'s rows 8 KB apart): written
through ``yt`` and 8x8 transposes, 0.98 ms, and 64 ``n`` per pass (whole lines): 0.88 ms,
1.42 FMA/cycle (dense's packed conv: ~1.95 of its 2).
"""

from __future__ import annotations

import math


def transpose8(rows: list) -> list:
    """The 8 columns of 8 rows of 8 lanes (``float32x8`` expressions): the usual AVX 8x8
    transpose, unpack pairs of rows, ``shufps`` pairs of those, swap 128-bit halves."""
    from tvm.script import tirx as T

    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = [T.Shuffle([rows[a], rows[a + 1]], idx) for a in range(0, 8, 2) for idx in (lo, hi)]
    even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    # s[4h + c]: rows 4h..4h+3 of columns c (low half) and c + 4 (high half)
    s = [T.Shuffle([t[4 * h + p], t[4 * h + p + 2]], idx) for h in (0, 1) for p in (0, 1) for idx in (even, odd)]
    low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [T.Shuffle([s[c % 4], s[4 + c % 4]], low if c < 4 else high) for c in range(8)]


def m_blocking(m: int, v) -> tuple[int, int, int, int]:
    """How variant ``v`` blocks the ``m`` rows of ``x``: ``(mm, vecs, MV, mblk)``, the rows the
    blocks cover (a tail row rides along outside them), their 8-lane vectors, vectors per block
    and blocks (the last one shifted back to end at the last vector)."""
    mm = m - 1 if v.tail else m
    vecs = math.ceil(mm / 8)
    MV = min(v.m_rows, vecs)
    return mm, vecs, MV, math.ceil(vecs / MV)


def chunk_of(k: int, v) -> int:
    """The reduction chunk of broadcast variant ``v``: ``k_block``, or all of ``k``."""
    return k if not v.k_block or v.k_block >= k else v.k_block


def chunk_major(k: int, v) -> bool:
    """Whether ``v``'s kernel takes its weights chunk-major (``pack_chunks``): wherever its
    chunk is whole meta bytes (a multiple of 8 ``k``)."""
    return chunk_of(k, v) % 8 == 0


def pack_chunks(values, meta, k: int, v):
    """``(values [n, k/2], meta [n, k/8])`` (``mask24``'s row-major form) as the broadcast
    kernel of ``v`` reads them: ``[chunks, n, kb/2]`` and ``[chunks, n, kb/8]`` where
    ``chunk_major``, else as they are. The same bytes in another order."""
    import numpy as np

    if not chunk_major(k, v):
        return values, meta
    kb, n = chunk_of(k, v), values.shape[0]
    chunks = k // kb
    return (
        np.ascontiguousarray(values.reshape(n, chunks, kb // 2).transpose(1, 0, 2)),
        np.ascontiguousarray(meta.reshape(n, chunks, kb // 8).transpose(1, 0, 2)),
    )


def by_m_tasks(mblk: int, nblk: int, threads: int, step8: int) -> tuple[int, int, int]:
    """How a ``by_m`` kernel shares ``mblk`` m-blocks of ``nblk`` row blocks among ``threads``:
    ``(whole, cut, piece)``. TVM's parallel loop gives each thread one contiguous, equal
    range of the tasks (``codegen_cpu``: static, no stealing), so the tasks are laid out thread
    by thread: each thread takes ``whole = mblk // threads`` whole m-blocks, then its piece of
    each of the ``cut = mblk % threads`` blocks left over, cut into ``threads`` row ranges of
    ``piece`` row blocks (whole 8-row groups: a task writes its own rows of ``y``). Only the
    cut blocks' ``x`` chunks are transposed by more than one task (by every thread); 196 rows
    (5 blocks) on 2 threads: 6 tasks, one block cut, where cutting all 5 in two made 10."""
    whole, cut = divmod(mblk, threads)
    piece = nblk if not cut else math.ceil(math.ceil(nblk / threads) / step8) * step8
    return whole, cut, piece


def broadcast_kernel(m: int, n: int, k: int, v, split, epilogue=None, threads: int = 1):
    """PrimFunc ``(x, values, meta, [pidx], [bias], [res], y)`` of the ``BROADCAST`` variant
    ``v`` (any ``k % 4 == 0``); ``split(blocks) -> (tasks, per)`` shares the n-blocks among
    parallel tasks (``by_m``: ``by_m_tasks`` shares the m-blocks among ``threads``, the
    target's cores); ``epilogue`` (``sparse_lower.Epilogue``): what the kernel does besides
    the product, each operand only where it asks for it:

    * ``perm``: ``x`` is read through an input-channel permutation, ``pidx`` int32 ``[2, k]``
      (``permutation_operand``: row 0 the permutation, row 1 its inverse): the kernel's
      positions index ``x[:, pidx[0]]``. The copy into ``xt`` stores each column of ``x`` at
      its permuted row: no pass of its own (``by_m``, whose tasks copy one chunk of permuted
      columns at a time, gathers them, or with several chunks permutes ``x`` row by row
      first: the ``take`` it replaces, in the kernel);
    * ``bias`` ``[n]``, ``residual`` ``res [m, n]``, then the clamp ``lo`` / ``hi`` (ReLU:
      ``lo = 0``) applied where ``y`` is written (the 8x8 transposes out of ``yt``), so that
      the layer's epilogue costs no pass over ``y`` either.
    """
    from tvm.script import tirx as T

    R, lanes = v.rows, 8
    VL = 16 if v.wide else 8  # accumulator / FMA vector lanes (16: AVX-512's zmm)
    tail_row = v.tail  # x's last row (m % 8 == 1) rides along in the pairs' loop: blocks cover m - 1
    mm, vecs, MV, mblk = m_blocking(m, v)
    W = MV * lanes  # m columns per block
    if W % VL:
        raise ValueError(f"16-lane vectors need an even number of 8-row vectors per m-block (m={m}, m_rows={v.m_rows})")
    MVv = W // VL  # accumulator vectors of m per row
    vv = f"float32x{VL}"
    kb = chunk_of(k, v)
    if kb % 4 or k % kb or (v.by_m and kb % 8):
        raise ValueError(f"k_block {v.k_block} must be a multiple of {8 if v.by_m else 4} dividing k={k}")
    chunks = k // kb
    kept = kb // 2  # per chunk and row
    shared = v.shared  # rows 2i, 2i + 1 keep the same positions (Variant checks R is even)
    # unroll counts groups (2 kept values each); shared: kept values per step
    U = min(v.unroll if shared else 2 * v.unroll, kept)
    full, tail = divmod(kept, U)
    nblk = math.ceil(n / R)
    # by_m: the tasks are the m-blocks (each task transposes its block's x chunk by chunk into
    # a buffer of its own, L1, instead of all of x into xt first), the blocks left over after
    # an equal share of whole blocks per thread cut into row ranges (by_m_tasks)
    by_m = v.by_m
    if by_m:
        whole, cut, piece = by_m_tasks(mblk, nblk, threads, 8 // math.gcd(8, R))
        slots = whole + cut  # tasks per thread
        tasks, per = threads * slots, nblk if whole else piece  # per: the most row blocks of a task
    else:
        tasks, per = split(nblk)
    vt = f"float32x{lanes}"
    k8, n8 = k // 8, n // 8  # 8x8 register transposes in and out; element loops past them

    # chunk-major weights (chunk_major): chunk c's kept values and positions of all rows are
    # contiguous, so the rows' sweep over a chunk streams them in order (row-major, each row's
    # chunk is a page away from the next row's: no hardware prefetch when they come from memory)
    cm = chunk_major(k, v)

    def decode(byte, q):
        """The k of kept value ``q`` (counted from a meta byte boundary) from its meta byte."""
        g = q // 2
        return 4 * g + ((T.Cast("int32", byte) >> (4 * (g % 2) + 2 * (q % 2))) & 3)

    def kidx(meta, row, q):
        return decode(meta[row, q // 4], q)

    def kpos(meta, row, c, ql, local):
        """The k of kept value ``ql`` of chunk ``c`` of ``row``: within the chunk (``local``)
        or in all of ``k`` (never ``c * kb`` added and taken off again: TVM's region bound
        estimate divides by the zero coefficient that leaves)."""
        if not cm:
            return kidx(meta, row, c * kept + ql) - (c * kb if local else 0)
        loc = decode(meta[c, row, ql // 4], ql)
        return loc if local else c * kb + loc

    def val(values, row, c, ql):
        return values[c, row, ql] if cm else values[row, c * kept + ql]

    def val_vec(values, row, c, ql):  # kept values ql..ql+7 of chunk c of row
        return values.vload([c, row, ql], vt) if cm else values.vload([row, c * kept + ql], vt)

    outer, inner = (MVv, R) if shared else (R, MVv)
    TB = R * MV * lanes  # past the tile: the tail row's two dot-product vectors and two sums
    kv, kr = divmod(kept, lanes)  # the tail dot: vectors and leftover kept values per chunk

    def row_of(t, b, r):  # row r of task t's block b (past n: the last row, computed twice)
        return T.min((n_lo(t) + b) * R + r, n - 1)

    def is_whole(t):  # by_m: task t computes all rows of its m-block
        return t % slots < whole

    def n_lo(t):  # task t's first row block
        if not by_m:
            return t * per
        if not cut:
            return 0
        return T.if_then_else(is_whole(t), 0, t // slots * piece)

    def n_hi(t):  # past task t's last row block
        if not by_m:
            return T.min((t + 1) * per, nblk)
        if not cut:
            return nblk
        return T.if_then_else(is_whole(t), nblk, T.min((t // slots + 1) * piece, nblk))

    def m_task(t):  # by_m: which m-block task t computes (thread t // slots: its whole blocks, then its piece of each cut one)
        if not cut:  # (slots == whole)
            return t
        return T.if_then_else(is_whole(t), t // slots * whole + t % slots, threads * whole + t % slots - whole)

    def pair_rows(t, b, p):
        return row_of(t, b, 2 * p), row_of(t, b, 2 * p + 1)

    def tail_gather(xg, x, meta, t, b, p, c, ql, count):
        """The last row's x under the pair's positions of ``count`` kept values (from ``ql``
        within chunk ``c``) into ``xg``: a scalar load and store each, no register held."""
        r0 = pair_rows(t, b, p)[0]
        for u in range(count):
            src = ops["xl"][kpos(meta, r0, c, ql + u, False)] if perm else x[m - 1, kpos(meta, r0, c, ql + u, False)]
            T.buffer_store(xg, src, [t, p, ql + u])

    def tail_dot(acc, xg, values, y, t, b, p, c):
        """y[m - 1, pair's rows] (+)= their chunk's kept values . the gathered x, 8 at a time."""
        rows = pair_rows(t, b, p)
        for s in range(2):
            T.buffer_store(acc, T.Broadcast(T.float32(0), lanes), [T.Ramp(TB + s * lanes, 1, lanes)])
        with T.serial(0, kv) as jv:
            for s in range(2):
                prod = val_vec(values, rows[s], c, lanes * jv) * xg.vload([t, p, lanes * jv], vt)
                T.buffer_store(acc, acc[T.Ramp(TB + s * lanes, 1, lanes)] + prod, [T.Ramp(TB + s * lanes, 1, lanes)])
        for s in range(2):  # both sums before either store: an odd n's last pair is one row twice
            dot = sum((acc[TB + s * lanes + j] for j in range(1, lanes)), acc[TB + s * lanes])
            for e in range(kr):
                dot = dot + val(values, rows[s], c, lanes * kv + e) * xg[t, p, lanes * kv + e]
            T.buffer_store(acc, T.if_then_else(c == 0, T.float32(0), y[m - 1, rows[s]]) + dot, [TB + 2 * lanes + s])
        for s in range(2):  # y's last row holds partial sums until the last chunk
            out = acc[TB + 2 * lanes + s]
            if ep is not None:
                out = T.if_then_else(c == chunks - 1, finish(out, m - 1, rows[s]), out)
            T.buffer_store(y, out, [m - 1, rows[s]])

    def tail_here(mb):  # with a tail row, in the last m-block only (computed once)
        return tail_row and (True if mblk == 1 else mb == mblk - 1)

    def step(acc, xt, values, meta, t, b, mb, o, i, c, q0, count):
        """Add ``count`` kept weights (from ``q0`` of chunk ``c``) of one row x their ``x`` rows to its
        accumulator of one m vector, as one FMA chain; (row, vector) from the unrolled loops'
        (outer, inner) step: rows innermost for ``shared``, whose positions come from the
        pair's first row."""
        r, j = (i, o) if shared else (o, i)
        row = row_of(t, b, r)
        pos_row = row_of(t, b, r - r % 2) if shared else row
        out = acc[T.Ramp((r * MVv + j) * VL, 1, VL)]
        for u in range(count):
            src = xt.vload([t, kpos(meta, pos_row, c, q0 + u, True), j * VL], vv) if by_m else xt.vload([mb, kpos(meta, pos_row, c, q0 + u, False), j * VL], vv)
            out = out + T.Broadcast(val(values, row, c, q0 + u), VL) * src
        T.buffer_store(acc, out, [T.Ramp((r * MVv + j) * VL, 1, VL)])

    def start(mb):  # first m of block mb; the last block is shifted back (overlapping) to end at vecs
        return T.min(mb * MV, vecs - MV) * lanes

    def block_of(i):
        return T.min(i // W, mblk - 1)

    def x_in(x, mb, i8, kk, at=None):
        """Rows of x for the 8 m of vector i8 of block mb, from k = kk, transposed into xt
        (``by_m``: into task ``at[0]``'s chunk buffer at row ``at[1]``)."""
        gather = at is not None and perm and not permuted  # by_m, one chunk: from x
        src = ops["xp"] if at is not None and permuted else x

        def row(r):
            i = T.min(start(mb) + 8 * i8 + r, mm - 1)
            return x[i, ops["pidx"][0, T.Ramp(kk, 1, 8)]] if gather else src.vload([i, kk], vt)

        rows = [T.if_then_else(start(mb) + 8 * i8 + r < mm, row(r), T.Broadcast(T.float32(0), 8)) for r in range(8)]
        for c, col in enumerate(transpose8(rows)):
            T.buffer_store(xt_ref[0], col, [at[0], at[1] + c, T.Ramp(8 * i8, 1, 8)] if at else [mb, xk(kk + c), T.Ramp(8 * i8, 1, 8)])

    def y_store8(y, yt, n0, src, dst, keep):
        """y[dst + c, n0 : n0 + 8] = column c of the 8x8 transpose of yt[n0 : n0 + 8, src : src + 8],
        for the c where ``keep(c)`` holds (None: every row, no test)."""
        cols = transpose8([yt.vload([n0 + r, src], vt) for r in range(8)])
        for c, col in enumerate(cols):
            col = finish(col, dst + c, n0, 8)
            if keep(c) is None:
                T.buffer_store(y, col, [dst + c, T.Ramp(n0, 1, 8)])
            else:
                with T.If(keep(c)):
                    with T.Then():
                        T.buffer_store(y, col, [dst + c, T.Ramp(n0, 1, 8)])

    def y_out(y, yt, n0, v8):
        """y[8 v8 : 8 v8 + 8, n0 : n0 + 8] from yt's rows n0..n0+7 (the m vector's columns);
        only the last vector's columns can pass mm."""
        mb = block_of(8 * v8)
        y_store8(y, yt, n0, mb * W + 8 * v8 - start(mb), 8 * v8, lambda c: None if 8 * (vecs - 1) + c < mm else 8 * v8 + c < mm)

    def owns(mb, i):  # row start(mb) + i of y is block mb's to write (not past mm, and the
        # last block, shifted back over the one before it, leaves that block's rows to it)
        return T.And(start(mb) + i < mm, start(mb) + i >= mb * W)

    def y_rows(y, yt, mb, n0, v8):
        """y's rows of vector v8 of block mb, columns n0..n0+7, from yt's rows n0..n0+7."""
        y_store8(y, yt, n0, mb * W + 8 * v8, start(mb) + 8 * v8, lambda c: owns(mb, 8 * v8 + c))

    ep = epilogue
    perm = ep is not None and ep.perm  # x read through the layer's input permutation (pidx)
    ops = {}  # the epilogue's buffers, for the helpers (filled as the script is parsed)

    def finish(value, row, col, lanes_: int = 1):
        """``value`` of ``y[row, col]`` (``lanes_ > 1``: the vector ``y[row, col : col + lanes_]``)
        with the epilogue applied."""
        if ep is None:
            return value
        load = (lambda buf, idx: buf.vload(idx, f"float32x{lanes_}")) if lanes_ > 1 else (lambda buf, idx: buf[tuple(idx)])
        const = (lambda c: T.Broadcast(T.float32(c), lanes_)) if lanes_ > 1 else T.float32
        if ep.bias:
            value = value + load(ops["bias"], [col])
        if ep.residual:
            value = value + load(ops["res"], [row, col])
        if ep.lo is not None:
            value = T.max(value, const(ep.lo))
        if ep.hi is not None:
            value = T.min(value, const(ep.hi))
        return value

    def xk(kk):  # the xt row of x's column kk (its place in the permuted order)
        return ops["pidx"][1, kk] if perm else kk

    # by_m with a permutation and several chunks: x permuted row by row first (each row's reads
    # stay in the row); a chunk's permuted columns gathered straight from x read a new line per
    # element (2.1x the kernel's time at 196x256x1024, one thread). With one chunk (all of
    # k) the gather reads whole rows anyway and costs less than the extra pass (3136x64x64:
    # 1.17x against 1.36x the kernel without a permutation)
    permuted = by_m and perm and chunks > 1
    xt_ref = []  # the xt buffer, for x_in (T.buffer_store needs the buffer object)

    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), "float32"),
        values: T.Buffer((chunks, n, kept) if cm else (n, k // 2), "float32"),
        meta: T.Buffer((chunks, n, kb // 8) if cm else (n, (k + 7) // 8), "uint8"),
        pidx: T.Buffer((2, k), "int32"),
        bias: T.Buffer((n,), "float32"),
        res: T.Buffer((m, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        ops.update(pidx=pidx, bias=bias, res=res)
        xt = T.alloc_buffer((tasks, kb, W) if by_m else (mblk, k, W), "float32")  # m columns past mm: zeros
        yt = T.alloc_buffer((n, mblk * W), "float32")
        xt_ref.append(xt)
        xg = T.alloc_buffer((tasks, R // 2, kept) if tail_row else (1, 1, 1), "float32")  # the tail's gathered x
        # the tail row of x in the permuted order, once (its gather then reads it as it reads x)
        xl = T.alloc_buffer((k if tail_row and perm else 1,), "float32")
        ops.update(xl=xl)
        if tail_row and perm:
            for j in range(k):
                xl[j] = x[m - 1, pidx[0, j]]
        xp = T.alloc_buffer((m, k) if permuted else (1, 1), "float32")
        ops.update(xp=xp)
        if permuted:  # (by_m has k % 8 == 0)
            for i in T.parallel(mm):
                for j8 in range(k // 8):
                    xp[i, T.Ramp(8 * j8, 1, 8)] = x[i, pidx[0, T.Ramp(8 * j8, 1, 8)]]
        if not by_m:  # all of x into xt first (by_m: each task its own chunks)
            for kc in T.parallel(k8):
                for mb, i8 in T.grid(mblk, MV):
                    x_in(x, mb, i8, kc * 8)
            for kk in T.parallel(k - 8 * k8):
                for mb, i in T.grid(mblk, W):
                    xt[mb, xk(8 * k8 + kk), i] = T.if_then_else(start(mb) + i < mm, x[T.min(start(mb) + i, mm - 1), 8 * k8 + kk], T.float32(0))
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((TB + (2 * lanes + 2 if tail_row else 0),), "float32", scope="local")
            for mi, c, b in T.grid(1 if by_m else mblk, chunks, per):
                mb = m_task(t) if by_m else mi
                if by_m:
                    if b == 0:  # the block's x of this chunk, transposed into the task's buffer
                        for i8, k8c in T.grid(MV, kb // 8):
                            x_in(x, mb, i8, c * kb + 8 * k8c, (t, 8 * k8c))
                if n_lo(t) + b < n_hi(t):
                    for r in T.unroll(R):
                        for j in T.unroll(MVv):
                            if chunks == 1:
                                acc[T.Ramp((r * MVv + j) * VL, 1, VL)] = T.Broadcast(T.float32(0), VL)
                            else:
                                acc[T.Ramp((r * MVv + j) * VL, 1, VL)] = T.if_then_else(
                                    c == 0, T.Broadcast(T.float32(0), VL),
                                    yt.vload([row_of(t, b, r), mb * W + j * VL], vv),
                                )  # fmt: skip
                    # shared: per kept value and m vector one x load feeds the pair's two FMAs
                    # (rows innermost; rows outermost measured 1.22x over dense, not 1.60x)
                    for qc in range(full):
                        for o in T.unroll(outer):
                            for i in T.unroll(inner):
                                step(acc, xt, values, meta, t, b, mb, o, i, c, qc * U, U)
                        if tail_here(mb):
                            for p in T.unroll(R // 2):
                                tail_gather(xg, x, meta, t, b, p, c, qc * U, U)
                    if tail > 0:
                        for o in T.unroll(outer):
                            for i in T.unroll(inner):
                                step(acc, xt, values, meta, t, b, mb, o, i, c, full * U, max(tail, 1))
                        if tail_here(mb):
                            for p in T.unroll(R // 2):
                                tail_gather(xg, x, meta, t, b, p, c, full * U, max(tail, 1))
                    for r in T.unroll(R):
                        for j in T.unroll(MVv):
                            yt[row_of(t, b, r), T.Ramp(mb * W + j * VL, 1, VL)] = acc[T.Ramp((r * MVv + j) * VL, 1, VL)]
                    if tail_here(mb):
                        for p in T.unroll(R // 2):  # y's last row holds its partial sums between chunks
                            tail_dot(acc, xg, values, y, t, b, p, c)
            if by_m:  # the task's columns of yt (in L2 still) into its part of y
                for q, v8 in T.grid(n8, MV):
                    if n_lo(t) * R + 8 * q + 8 <= T.min(n_hi(t) * R, n):
                        y_rows(y, yt, m_task(t), n_lo(t) * R + 8 * q, v8)
                if n_hi(t) == nblk and n_lo(t) < nblk:  # the rows past the last 8 (in the last range)
                    for nn, i in T.grid(n - 8 * n8, W):
                        if owns(m_task(t), i):
                            y[start(m_task(t)) + i, 8 * n8 + nn] = finish(yt[8 * n8 + nn, m_task(t) * W + i], start(m_task(t)) + i, 8 * n8 + nn)
        # y is [m, n]: a tile is a column of it, and y's rows are often 2^j floats apart, so
        # column writes conflict in L1 sets: yt is transposed in 8x8 blocks instead
        if not by_m:  # (by_m: each task its own rows of y, above)
            for nc in T.parallel((n8 + 7) // 8):  # 64 columns of 8 rows: whole lines of y at once
                for v8, nb in T.grid(vecs, 8):
                    if nc * 8 + nb < n8:
                        y_out(y, yt, (nc * 8 + nb) * 8, v8)
            for nn in T.parallel(n - 8 * n8):
                for i in range(mm):
                    y[i, 8 * n8 + nn] = finish(yt[8 * n8 + nn, block_of(i) * W + i - start(block_of(i))], i, 8 * n8 + nn)

    used = {"pidx": perm, "bias": ep is not None and ep.bias, "res": ep is not None and ep.residual}
    return without_params(kernel, [name for name, use in used.items() if not use])


def without_params(func, names: list[str]):
    """``func`` without the parameters called ``names`` (which its body does not use)."""
    import tvm

    if not names:
        return func
    keep = [p for p in func.params if p.name not in names]
    return tvm.tirx.PrimFunc(keep, func.body, ret_type=func.ret_type, attrs=func.attrs)


def permutation_operand(perm):
    """The broadcast kernel's ``pidx`` operand for the input-channel permutation ``perm`` (the
    kernel's position ``j`` reads ``x[:, perm[j]]``): int32 ``[2, k]``, ``perm`` and its inverse."""
    import numpy as np

    perm = np.asarray(perm, np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return np.stack([perm, inv]).astype(np.int32)
