"""The x86 AVX2 permute kernels of ``cpu_sparse`` (GEMV and small ``m``): ``lane_kernel``
(``LANES``, the GEMV default), ``permute_kernel`` (``PERMPS``/``PERMILPS``, one row and one
16-``k`` chunk per vector, described in ``cpu_sparse``) and ``pair_kernel`` (``PAIRS``).

``lane_kernel``: the vector runs across 8 output rows, not along ``k``. For group ``g`` (4
``x``), ``X = x[4g : 4g + 4]`` in both 128-bit lanes (one ``vbroadcastf128``); the 8 rows' first
(second) kept values of the group are one vector ``v``, their positions in ``v``'s own two
low mantissa bits (``mask24.embed_positions``), which are exactly the bits an in-lane
``vpermilps`` reads from its control: ``vpermilps(X, v)`` is the ``x`` under each value, no
metadata load, shift or mask. Per 8 kept values: one load, one permute, one FMA; the stream is
50% of the dense weight (not 53%: no ``meta``), read in order and prefetched
``cpu_prefetch.distance_for(target)`` bytes ahead (none on Zen 4, whose hardware prefetchers
keep up: with it 1.3x slower), and the accumulators need no horizontal sum. Weights
packed by ``pack_lanes``: ``[N / 8R, K / 4, R, 2, 8]`` (``R`` row vectors per block, rows past
``N`` zero). A variable ``vpermilps`` / ``vpermps`` issues once per ~4 cycles on this Zen 1
host (an FMA once per cycle; measured in a loop of independent ops), so the kernel is for
weights that stream from memory: 1.8x over dense there (one core), ~0.5x in L2.

``pair_kernel``: rows ``r0, r1`` of ``W`` and an 8-``x`` window ``X = x[8j : 8j + 8]`` (groups
``2j`` and ``2j + 1``, meta byte ``j`` of each row): the kept values of the pair in that window
are ``[values[r0, 4j : 4j + 4], values[r1, 4j : 4j + 4]]``, and one cross-lane ``vpermps`` of
``X`` with the control ``[i0, i1, 4 + i0', 4 + i1']`` of ``r0``'s byte in lanes 0-3 and of
``r1``'s in lanes 4-7 puts the matching ``x`` under each of them. Per 8 kept values: one
insert for the values, one for the control (``lut``: a 256 x 4 int32 table, 4 KB, built at the
kernel's start), one permute, one FMA; the accumulator's low half is row ``r0``, its high half
``r1``. Without the table the control is computed from the two meta bytes (broadcast, variable
shift, and, or). Fewer vector ops than ``PERMILPS``, yet ~1.5x slower on Zen 3, where
``vpermps`` issues once per ~1.3 cycles and a 128-bit insert from memory once per cycle
(``vpermilps``: twice per cycle); one blocked ``pairs`` of row pairs shares every ``X`` load.
"""

from __future__ import annotations

import math

CHUNK = 16  # k per permute-kernel step: 4 groups, 8 kept values, 2 meta bytes
WINDOW = 8  # k per row-pair step: 2 groups, 4 kept values per row, 1 meta byte
_PERMPS = "llvm.x86.avx2.permps"
_PERMILPS = "llvm.x86.avx.vpermilvar.ps.256"


def pack_lanes(embedded, rows: int):
    """``embed_positions``' ``[N, K/2]`` -> ``lane_kernel``'s ``[ceil(N / 8R), K / 4, R, 2, 8]``
    (``R = rows``): block ``b``, group ``g``, row vector ``r``, kept slot ``s``, lane ``l`` is row
    ``8 (R b + r) + l``'s ``s``-th kept value of group ``g``; rows past ``N`` are zeros."""
    import numpy as np

    n, half = embedded.shape
    groups, width = half // 2, 8 * rows
    blocks = math.ceil(n / width)
    padded = np.zeros((blocks * width, groups, 2), np.float32)
    padded[:n] = embedded.reshape(n, groups, 2)
    return np.ascontiguousarray(padded.reshape(blocks, rows, 8, groups, 2).transpose(0, 3, 1, 4, 2))


def lane_kernel(n: int, k: int, rows: int, unroll: int, split, prefetch_bytes: int):
    """PrimFunc ``(x[1, k], w, y[1, n])`` of the ``LANES`` GEMV, ``w`` from ``pack_lanes``;
    ``k % 4 == 0``; ``split(blocks) -> (tasks, per)``; ``prefetch_bytes`` ahead (0: none)."""
    from tvm.script import tirx as T

    if k % 4:
        raise ValueError(f"the lane kernel needs k % 4 == 0, got k={k}")
    R, lanes, groups = rows, 8, k // 4
    U = min(unroll, groups)
    full, tail = divmod(groups, U)
    nblk = math.ceil(n / (lanes * R))
    tasks, per = split(nblk)
    ahead = prefetch_bytes // (R * 2 * lanes * 4)  # groups: one group of a block is R 64-byte lines

    def step(acc, x, w, blk, g, r, s):
        xq = x.vload([0, 4 * g], "float32x4")
        v = w.vload([blk, g, r, s, 0], "float32x8")
        return acc + T.call_llvm_pure_intrin("float32x8", _PERMILPS, T.Shuffle([xq, xq], list(range(8))), T.reinterpret("int32x8", v)) * v

    @T.prim_func
    def kernel(x: T.Buffer((1, k), "float32"), w: T.Buffer((nblk, groups, R, 2, lanes), "float32"), y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((2 * R * lanes,), "float32", scope="local")
            for b in range(per):
                if t * per + b < nblk:
                    for a in T.unroll(2 * R):
                        acc[T.Ramp(a * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                    for gc in range(full):
                        if ahead > 0:  # the lines of the group `ahead` groups on; prefetches never fault
                            for u in T.unroll(U):
                                for r in T.unroll(R):
                                    line = T.address_of(w[t * per + b, gc * U + u + ahead, r, 0, 0])
                                    T.evaluate(T.call_intrin("void", "tirx.prefetch", line, 0, 3, 1))
                        for u in T.unroll(U):
                            for r in T.unroll(R):
                                for s in T.unroll(2):  # one accumulator per slot: two FMA chains per row vector
                                    acc[T.Ramp((2 * r + s) * lanes, 1, lanes)] = step(
                                        acc[T.Ramp((2 * r + s) * lanes, 1, lanes)], x, w, t * per + b, gc * U + u, r, s
                                    )
                    for u in T.unroll(tail):
                        for r in T.unroll(R):
                            for s in T.unroll(2):
                                acc[T.Ramp((2 * r + s) * lanes, 1, lanes)] = step(
                                    acc[T.Ramp((2 * r + s) * lanes, 1, lanes)], x, w, t * per + b, full * U + u, r, s
                                )
                    for r in T.unroll(R):
                        if (t * per + b) * R * lanes + (r + 1) * lanes <= n:
                            y[0, T.Ramp((t * per + b) * R * lanes + r * lanes, 1, lanes)] = (
                                acc[T.Ramp(2 * r * lanes, 1, lanes)] + acc[T.Ramp((2 * r + 1) * lanes, 1, lanes)]
                            )
                        else:  # the last block's rows past n are padding
                            for lane in range(lanes):
                                if (t * per + b) * R * lanes + r * lanes + lane < n:
                                    y[0, (t * per + b) * R * lanes + r * lanes + lane] = (
                                        acc[2 * r * lanes + lane] + acc[(2 * r + 1) * lanes + lane]
                                    )

    return kernel


def lut_entry(byte: int) -> list[int]:
    """The ``vpermps`` control of one meta byte: its two groups' positions, the second group
    offset by 4 (it is the upper half of the 8-``x`` window)."""
    return [byte & 3, (byte >> 2) & 3, 4 | ((byte >> 4) & 3), 4 | ((byte >> 6) & 3)]


def pair_kernel(m: int, n: int, k: int, pairs: int, unroll: int, m_rows: int, lut: bool, split):
    """PrimFunc ``(x, values, meta, y)``; ``k % 8 == 0``; ``split(blocks) -> (tasks, per)``."""
    from tvm.script import tirx as T

    if k % WINDOW:
        raise ValueError(f"the row-pair kernel needs k % {WINDOW} == 0, got k={k}")
    P, MR = pairs, min(m_rows, m)
    windows = k // WINDOW
    U = min(unroll, windows)
    full, tail = divmod(windows, U)
    nblk, mblk = math.ceil(math.ceil(n / 2) / P), math.ceil(m / MR)
    tasks, per = split(nblk * mblk)

    upper = ((T.Ramp(0, 1, WINDOW) >> T.Broadcast(1, WINDOW)) & T.Broadcast(1, WINDOW)) << T.Broadcast(2, WINDOW)

    def control(meta, table, r0, r1, j):
        b0, b1 = T.Cast("int32", meta[r0, j]), T.Cast("int32", meta[r1, j])
        if lut:
            return T.Shuffle([table.vload([4 * b0], "int32x4"), table.vload([4 * b1], "int32x4")], list(range(8)))
        word = T.Broadcast(b0 | (b1 << 8), WINDOW) >> T.Ramp(0, 2, WINDOW)  # r1's byte in lanes 4-7
        return (word & T.Broadcast(3, WINDOW)) | upper

    def fold(acc, x, values, meta, table, r0, r1, xrow, j0, count):
        """acc + the pair's products over windows j0..j0+count, one FMA chain."""
        out = acc
        for u in range(count):
            j = j0 + u
            xs = T.call_llvm_pure_intrin("float32x8", _PERMPS, x.vload([xrow, WINDOW * j], "float32x8"), control(meta, table, r0, r1, j))
            vals = T.Shuffle([values.vload([r0, 4 * j], "float32x4"), values.vload([r1, 4 * j], "float32x4")], list(range(8)))
            out = out + xs * vals
        return out

    def half(acc, base):
        return acc[base] + acc[base + 1] + (acc[base + 2] + acc[base + 3])

    A = P * MR  # accumulators per block

    # Rows past n (an odd n's last pair) or m are clamped to the last one: the block computes
    # and writes the same value twice, cheaper than a guarded tail.
    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), "float32"),
        values: T.Buffer((n, k // 2), "float32"),
        meta: T.Buffer((n, (k + 7) // 8), "uint8"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        table = T.alloc_buffer((1024,), "int32")
        if lut:
            for e in range(1024):
                table[e] = ((e // 4) >> (2 * (e % 4)) & 3) | (4 * ((e % 4) // 2))
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((A * WINDOW,), "float32", scope="local")
            for b in range(per):
                if t * per + b < nblk * mblk:
                    for a in T.unroll(A):
                        acc[T.Ramp(a * WINDOW, 1, WINDOW)] = T.Broadcast(T.float32(0), WINDOW)
                    for jc in range(full):
                        for p in T.unroll(P):
                            for i in T.unroll(MR):
                                acc[T.Ramp((p * MR + i) * WINDOW, 1, WINDOW)] = fold(
                                    acc[T.Ramp((p * MR + i) * WINDOW, 1, WINDOW)], x, values, meta, table,
                                    T.min(2 * (((t * per + b) // mblk) * P + p), n - 1),
                                    T.min(2 * (((t * per + b) // mblk) * P + p) + 1, n - 1),
                                    T.min(((t * per + b) % mblk) * MR + i, m - 1),
                                    jc * U, U,
                                )  # fmt: skip
                    if tail > 0:
                        for p in T.unroll(P):
                            for i in T.unroll(MR):
                                acc[T.Ramp((p * MR + i) * WINDOW, 1, WINDOW)] = fold(
                                    acc[T.Ramp((p * MR + i) * WINDOW, 1, WINDOW)], x, values, meta, table,
                                    T.min(2 * (((t * per + b) // mblk) * P + p), n - 1),
                                    T.min(2 * (((t * per + b) // mblk) * P + p) + 1, n - 1),
                                    T.min(((t * per + b) % mblk) * MR + i, m - 1),
                                    full * U, max(tail, 1),
                                )  # fmt: skip
                    for p in T.unroll(P):
                        for i in T.unroll(MR):
                            y[T.min(((t * per + b) % mblk) * MR + i, m - 1), T.min(2 * (((t * per + b) // mblk) * P + p), n - 1)] = half(
                                acc, (p * MR + i) * WINDOW
                            )
                            y[T.min(((t * per + b) % mblk) * MR + i, m - 1), T.min(2 * (((t * per + b) // mblk) * P + p) + 1, n - 1)] = half(
                                acc, (p * MR + i) * WINDOW + 4
                            )

    return kernel


def permute_kernel(m: int, n: int, k: int, v, split):
    """PrimFunc ``(x, values, meta, y)`` of the ``PERMPS``/``PERMILPS`` variant ``v``
    (``cpu_sparse``'s docstring); ``k % 16 == 0``; ``split(blocks) -> (tasks, per)``."""
    from tvm.script import tirx as T

    from .cpu_sparse import Gather

    R, MR, lanes = v.rows, v.m_rows, 8
    chunks = k // CHUNK
    U = min(v.unroll, chunks)
    if U % 2 and U < chunks:
        U += 1  # even: a chunk's parity (which half of its meta word) is known in the loop
    full, tail = divmod(chunks, U)
    nblk, mblk = math.ceil(n / R), math.ceil(m / MR)
    tasks, per = split(nblk * mblk)

    def ctl_of(meta, row, h0, u, lut):
        h = h0 + u
        if v.lut:  # lut[4 b : 4 b + 4] = byte b's 4 two-bit fields (+4 for the odd group: vpermps)
            b0, b1 = T.Cast("int32", meta[row, 2 * h]), T.Cast("int32", meta[row, 2 * h + 1])
            return T.Shuffle([lut.vload([4 * b0], "int32x4"), lut.vload([4 * b1], "int32x4")], list(range(8)))
        if v.gather is Gather.PERMILPS and chunks > 1:
            # The 4 meta bytes of chunks h - p and h - p + 1 (p: h odd), broadcast straight from
            # memory (a load, no vector op); the variable shift then puts each lane's field in
            # its low 2 bits, the only ones vpermilps reads. h0 is a Python int where h can be
            # the last chunk of an odd count, whose aligned word would run past the row.
            p = (h0 + u) % 2 if isinstance(h0, int) else u % 2
            if isinstance(h0, int) and p == 0 and h == chunks - 1:
                p = 1  # read chunks h-1 and h instead
            word = T.reinterpret("int32", meta.vload([row, 2 * h - 2 * p], "uint8x4"))
            return T.Broadcast(word, lanes) >> T.Ramp(16 * p, 2, lanes)
        word = T.Cast("int32", meta[row, 2 * h]) | (T.Cast("int32", meta[row, 2 * h + 1]) << 8)
        shifted = T.Broadcast(word, lanes) >> T.Ramp(0, 2, lanes)
        if v.gather is Gather.PERMILPS:
            return shifted  # vpermilps reads the low 2 bits of each lane only
        odd_group = ((T.Ramp(0, 1, lanes) >> T.Broadcast(1, lanes)) & T.Broadcast(1, lanes)) << T.Broadcast(2, lanes)
        return (shifted & T.Broadcast(3, lanes)) | odd_group

    def gathered(x, meta, lut, row, xrow, h0, u):
        """The 8 x of chunk h that values[row, 8h:8h+8] multiply, in the same lane order."""
        h = h0 + u
        ctl = ctl_of(meta, row, h0, u, lut)
        if regroup:  # x already stored as [g0 | g2], [g1 | g3] per chunk
            g02, g13 = x.vload([xrow, CHUNK * h], "float32x8"), x.vload([xrow, CHUNK * h + 8], "float32x8")
            r0 = T.call_llvm_pure_intrin("float32x8", _PERMILPS, g02, ctl)
            r1 = T.call_llvm_pure_intrin("float32x8", _PERMILPS, g13, ctl)
            return T.Shuffle([r0, r1], [0, 1, 10, 11, 4, 5, 14, 15])
        lo, hi = x.vload([xrow, CHUNK * h], "float32x8"), x.vload([xrow, CHUNK * h + 8], "float32x8")
        if v.gather is Gather.PERMPS:
            r0 = T.call_llvm_pure_intrin("float32x8", _PERMPS, lo, ctl)  # lanes 0-3: groups 0, 1
            r1 = T.call_llvm_pure_intrin("float32x8", _PERMPS, hi, ctl)  # lanes 4-7: groups 2, 3
            return T.Shuffle([r0, r1], [0, 1, 2, 3, 12, 13, 14, 15])
        g02 = T.Shuffle([lo, hi], [0, 1, 2, 3, 8, 9, 10, 11])
        g13 = T.Shuffle([lo, hi], [4, 5, 6, 7, 12, 13, 14, 15])
        r0 = T.call_llvm_pure_intrin("float32x8", _PERMILPS, g02, ctl)  # lanes 0,1 / 4,5
        r1 = T.call_llvm_pure_intrin("float32x8", _PERMILPS, g13, ctl)  # lanes 2,3 / 6,7
        return T.Shuffle([r0, r1], [0, 1, 10, 11, 4, 5, 14, 15])

    def fold(acc_v, x, xg, values, meta, lut, row, xrow, h0, count):
        """acc + gathered x * kept values over chunks h0..h0+count, one FMA chain."""
        out = acc_v
        for u in range(count):
            out = out + gathered(xg if regroup else x, meta, lut, row, xrow, h0, u) * values.vload([row, 8 * (h0 + u)], "float32x8")
        return out

    def hsum(acc, base):
        return sum((acc[base + j] for j in range(1, lanes)), acc[base])

    odd_lane = 4 if v.gather is Gather.PERMPS else 0
    regroup = v.gather is Gather.PERMILPS
    xg_shape = (m, k) if regroup else (1, 4)
    # Rows past n or m are clamped to the last one: the block recomputes and rewrites the same
    # value (same thread, same result), which costs less than a guarded tail block.
    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), "float32"),
        values: T.Buffer((n, k // 2), "float32"),
        meta: T.Buffer((n, (k + 7) // 8), "uint8"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        lut = T.alloc_buffer((1024,), "int32")
        if v.lut:
            for e in range(1024):
                lut[e] = ((e // 4) >> (2 * (e % 4)) & 3) | (odd_lane * ((e % 4) // 2))
        xg = T.alloc_buffer(xg_shape, "float32")
        if regroup:  # groups 0 1 2 3 of each chunk stored as 0 2 1 3
            for i, c in T.grid(m, k // 4):
                xg[i, T.Ramp(4 * c, 1, 4)] = x[i, T.Ramp(16 * (c // 4) + 4 * (2 * (c % 2) + (c % 4) // 2), 1, 4)]
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((R * MR * lanes,), "float32", scope="local")
            for b in range(per):
                if t * per + b < nblk * mblk:
                    for a in T.unroll(R * MR):
                        acc[T.Ramp(a * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                    for hc in range(full):
                        for r in T.unroll(R):
                            for j in T.unroll(MR):
                                acc[T.Ramp((r * MR + j) * lanes, 1, lanes)] = fold(
                                    acc[T.Ramp((r * MR + j) * lanes, 1, lanes)], x, xg, values, meta, lut,
                                    T.min(((t * per + b) // mblk) * R + r, n - 1),
                                    T.min(((t * per + b) % mblk) * MR + j, m - 1),
                                    0 if full == 1 else hc * U, U,
                                )  # fmt: skip
                    if tail > 0:
                        for r in T.unroll(R):
                            for j in T.unroll(MR):
                                acc[T.Ramp((r * MR + j) * lanes, 1, lanes)] = fold(
                                    acc[T.Ramp((r * MR + j) * lanes, 1, lanes)], x, xg, values, meta, lut,
                                    T.min(((t * per + b) // mblk) * R + r, n - 1),
                                    T.min(((t * per + b) % mblk) * MR + j, m - 1),
                                    full * U, max(tail, 1),
                                )  # fmt: skip
                    for r in T.unroll(R):
                        for j in T.unroll(MR):
                            y[T.min(((t * per + b) % mblk) * MR + j, m - 1), T.min(((t * per + b) // mblk) * R + r, n - 1)] = hsum(
                                acc, (r * MR + j) * lanes
                            )

    return kernel
