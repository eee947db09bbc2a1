"""2:4 sparse GEMM on NVIDIA sparse tensor cores (``mma.sp``, sm_80+: A100, Jetson Orin sm_87).

``y[m, n] = sum_k x[m, k] W[n, k]`` with ``W[N, K]`` 2:4 sparse along ``K`` and stored in
``mask24``'s compressed form (``values`` ``[N, K/2]`` float32, ``meta`` ``[N, ceil(K/8)]``
uint8, nibble ``i0 | i1 << 2`` per group of 4). The tensor-core operation is
``C[16, 8] += A[16, KS] B[KS, 8]`` with ``A`` the sparse operand, so ``A`` is ``W`` (16 output
channels), ``B`` is ``x^T`` (8 rows of ``x``) and ``C = y^T``. Operands are converted from
float32 to float16 as they are loaded into registers; sums are float32.

Fragments (PTX ISA, "Matrix fragments for sparse mma.m16n8k16 / m16n8k32 with .f16"; lane
``= 4 * g + t``): the compressed ``A`` fragment is the dense ``m16n8k{KS/2}`` one (half ``i``
at row ``g + 8 * (i % 4 // 2)``, compressed column ``8 * (i // 4) + 2 t + i % 2``), ``B`` the
dense ``m16n8k{KS}`` one (``k = 8 * (i // 2) + 2 t + i % 2``, column ``g``), ``C`` row
``g + 8 * (i // 2)``, column ``2 t + i % 2``. The metadata register (sparsity selector 0) holds
16 2-bit indices (4 bits per group of 4 ``k``, ``i0`` in the low 2): bits 0-15 for row ``g``,
16-31 for row ``g + 8``; lane ``t = 0`` of a quad supplies them for the step's first 16 ``k``
and, at k32, lane ``t = 1`` for the next 16. Those are exactly ``meta``'s nibbles, so a
register is two little-endian 16-bit words of ``meta``: no repacking of the weights.

The kernel keeps no shared memory: every thread loads its fragments straight from global
memory (L1/L2 serve the reuse across warps). Rows of a partial tile read as zero with valid
metadata and are not stored. ``emulate`` replays the kernel's thread indexing in numpy with
``mma_sp_reference``, the ISA's fragment description, in place of the tensor core: the check
this module gets on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SparseTile", "choose_tile", "dense_f16_kernel_cuda", "emulate", "emulate_gemv", "gemv_k", "mma_k", "mma_sp_reference",
    "sparse24_gemv_cuda", "sparse24_kernel_cuda",
]

# Metadata of a group outside the matrix (padding rows): positions 0 and 1, a valid pattern
# (0b0000, 0b0101, 0b1010, 0b1111 are undefined behaviour in mma.sp), with zero values.
_PAD_NIBBLES = 0x4444
MIN_ARCH = 80


@dataclass(frozen=True)
class SparseTile:
    """Per warp ``tn x tm`` MMA tiles (``16 tn`` output channels x ``8 tm`` rows of ``x``);
    ``wn x wm`` warps per thread block."""

    tn: int = 2
    tm: int = 2
    wn: int = 2
    wm: int = 2

    def __post_init__(self):
        if min(self.tn, self.tm, self.wn, self.wm) < 1 or self.wn * self.wm > 32:
            raise ValueError(f"{self}: need positive tiles and at most 32 warps per block")

    @property
    def block_n(self) -> int:
        return 16 * self.tn * self.wn

    @property
    def block_m(self) -> int:
        return 8 * self.tm * self.wm


def choose_tile(m: int, n: int) -> SparseTile:
    """The tile of an ``m x n`` output, from tiles timed on an H100 (``tools/bench_gpu_sparse.py
    --tiles``): up to 8 rows of ``x`` (a GEMV pads ``m`` to 8), one MMA tile per warp and 4
    warps along ``n`` (more blocks: 1.2-1.9x faster than 2 x 2 tiles); large outputs (``m x n``
    >= 2^20) 4 x 4 MMA tiles per warp (the operands' reuse in registers: 1.8-2.2x at 256 and
    1024 x 4096); else 2 x 2 MMA tiles and 2 x 2 warps, fewer where the output is narrower."""
    if m <= 8:
        return SparseTile(tn=1, tm=1, wn=min(4, -(-n // 16)), wm=1)
    if m >= 64 and n >= 128 and m * n >= 1 << 20:
        return SparseTile(tn=4, tm=4, wn=2, wm=2)
    tm = 2
    wm = 1 if m <= 8 * tm else 2
    return SparseTile(tn=2 if n > 16 else 1, tm=tm, wn=2 if n > 32 else 1, wm=wm)


def mma_k(k: int) -> int:
    """The ``K`` of the MMA shape used for a reduction of ``k``: 32 (``m16n8k32``, one
    instruction per 32 k) where ``k`` allows, else 16; ``ValueError`` if ``k % 16``."""
    if k <= 0 or k % 16:
        raise ValueError(f"the 2:4 sparse CUDA kernel needs K to be a multiple of 16, got K={k}")
    return 32 if k % 32 == 0 else 16


def _arch_number(target) -> int:
    arch = str(target.attrs.get("arch", "")) if target is not None else ""
    digits = arch[3:].rstrip("af") if arch.startswith("sm_") else ""
    return int(digits) if digits.isdigit() else 0


def sparse24_kernel_cuda(m: int, n: int, k: int, target=None, tile: SparseTile | None = None):
    """The scheduled CUDA PrimFunc ``(x, values, meta, y)`` of a 2:4 sparse GEMM.

    Parameters
    ----------
    m, n, k : int
        ``x`` is ``[m, k]`` float32, ``values`` ``[n, k // 2]`` float32, ``meta``
        ``[n, (k + 7) // 8]`` uint8 (``mask24.compress``), ``y`` ``[m, n]`` float32 (written).
        ``k`` must be a multiple of 16; ``m`` and ``n`` are any (guarded).
    target : tvm.target.Target, optional
        A CUDA target; ``ValueError`` for another kind or an arch below sm_80 (no sparse
        tensor cores).
    tile : SparseTile, optional
        Default ``choose_tile(m, n)``.

    Returns
    -------
    tvm.tirx.PrimFunc
        Bound to threads, ``tirx.is_scheduled`` set (default GPU schedules leave it alone).
    """
    if target is not None and (target.kind.name != "cuda" or _arch_number(target) < MIN_ARCH):
        raise ValueError(f"mma.sp needs sm_{MIN_ARCH} or newer, target arch is {target.attrs.get('arch')!r}")
    if m < 1 or n < 1:
        raise ValueError(f"empty GEMM: m={m}, n={n}")
    ks = mma_k(k)
    tile = tile or choose_tile(m, n)
    return _build(m, n, k, ks, tile)


# ---------------------------------------------------------------------------- thread indexing
# One set of index functions for the TIR (arguments are PrimExprs) and for ``emulate`` (ints or
# numpy arrays), so that the emulator replays the kernel's own indexing.


def _w_row(tile: SparseTile, bn, warp, lane, i_n, half):
    """Output channel (row of ``W``) of MMA tile ``i_n``'s row ``lane // 4 + 8 * half``."""
    return bn * tile.block_n + warp // tile.wm * (16 * tile.tn) + 16 * i_n + lane // 4 + 8 * half


def _x_row(tile: SparseTile, bm, warp, lane, i_m, pair: int = 0):
    """Row of ``x`` (column of ``C``) that a lane's B fragment holds in MMA tile ``i_m``:
    ``lane // 4``; with ``pair = 1`` the first of the two its C fragment holds, ``2 (lane % 4)``."""
    col = 2 * (lane % 4) if pair else lane // 4
    return bm * tile.block_m + warp % tile.wm * (8 * tile.tm) + 8 * i_m + col


def _values_col(ks: int, step, lane, i):
    """Compressed column of A half ``i`` (the dense m16n8k{ks/2} A fragment)."""
    return step * (ks // 2) + 8 * (i // 4) + 2 * (lane % 4) + i % 2


def _x_col(ks: int, step, lane, i):
    """``k`` of B half ``i`` (the m16n8k{ks} B fragment)."""
    return step * ks + 8 * (i // 2) + 2 * (lane % 4) + i % 2


def _meta_byte(ks: int, step, lane):
    """First of the two ``meta`` bytes (16 ``k``) in this lane's metadata register:
    with selector 0 lane ``t`` of a quad supplies the ``t``-th 16 ``k`` of the step (one word
    for k16, two lanes for k32; the other lanes' registers are ignored)."""
    sub = ks // 16
    return (step * sub + lane % 4 % sub) * 2


# ---------------------------------------------------------------------------- the kernel


def _pack_f16x2(lo, hi):
    """The b32 register of two f16 operands, ``lo`` in the low half (the MMA's order).

    Built with bit operations rather than a ``uint32`` view of a ``float16`` local array: TVM's
    storage rewrite does not see reads through such a view and merged two same-sized operand
    arrays into one (the dense twin at tile (2, 4, 2, 2) multiplied A by itself, found on an
    H100)."""
    from tvm.script import tirx as T

    return T.Cast("uint32", T.reinterpret("uint16", lo)) | (T.Cast("uint32", T.reinterpret("uint16", hi)) << T.uint32(16))


def _f16(buf, row, col, rows: int, guard: bool):
    """``buf[row, col]`` as f16; with ``guard``, zero for rows of a partial tile (``row >= rows``)."""
    from tvm.script import tirx as T

    if not guard:
        return T.Cast("float16", buf[row, col])
    return T.if_then_else(row < rows, T.Cast("float16", buf[T.min(row, rows - 1), col]), T.float16(0))


def _inside(row, col, n: int, m: int, guarded: bool):
    """Whether output ``y[col, row]`` exists (always, unless a tile can be partial)."""
    from tvm.script import tirx as T

    return T.And(row < n, col < m) if guarded else T.bool(True)


def _acc_regs(acc, c: int) -> list:
    """The 4 accumulator registers of an MMA tile starting at ``c``."""
    return [acc[c + i] for i in range(4)]


def _build(m: int, n: int, k: int, ks: int, tile: SparseTile):
    from tvm.script import tirx as T

    tn, tm, wn, wm = tile.tn, tile.tm, tile.wn, tile.wm
    words = ks // 8  # per thread per step: b32 registers of A (and of B), two f16 each
    steps, grid_n, grid_m = k // ks, -(-n // tile.block_n), -(-m // tile.block_m)
    guard_n, guard_m = grid_n * tile.block_n != n, grid_m * tile.block_m != m
    # ordered_metadata: the two indices of a group increasing, which mask24 guarantees; PTX
    # recommends it over plain mma.sp (which may be slower on newer GPUs)
    mma = f"mma.sp::ordered_metadata.sync.aligned.m16n8k{ks}.row.col.f32.f16.f16.f32"

    def w_row(bn, warp, lane, i_n, half):
        return _w_row(tile, bn, warp, lane, i_n, half)

    def x_row(bm, warp, lane, i_m, pair=0):
        return _x_row(tile, bm, warp, lane, i_m, pair)

    def meta_word(buf, row, byte):  # 16 2-bit indices of 16 k: two meta bytes, little-endian
        r = T.min(row, n - 1) if guard_n else row
        word = T.Cast("uint32", buf[r, byte]) | (T.Cast("uint32", buf[r, byte + 1]) << T.uint32(8))
        return T.if_then_else(row < n, word, T.uint32(_PAD_NIBBLES)) if guard_n else word

    def inside(row, col):
        return _inside(row, col, n, m, guard_n or guard_m)

    @T.prim_func(s_tir=True)
    def kernel(
        x: T.Buffer((m, k), "float32"),
        values: T.Buffer((n, k // 2), "float32"),
        meta: T.Buffer((n, (k + 7) // 8), "uint8"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bn = T.launch_thread("blockIdx.y", grid_n)
        bm = T.launch_thread("blockIdx.x", grid_m)
        warp = T.launch_thread("threadIdx.y", wn * wm)
        lane = T.launch_thread("threadIdx.x", 32)
        # operands converted to f16 in registers, two per b32 register (what mma.sp takes)
        a_word = T.decl_buffer([tn * words], "uint32", scope="local")
        b_word = T.decl_buffer([tm * words], "uint32", scope="local")
        e = T.decl_buffer([tn], "uint32", scope="local")
        acc = T.decl_buffer([tn * tm * 4], "float32", scope="local")
        for i in T.unroll(tn * tm * 4):
            acc[i] = T.float32(0)
        for step in T.serial(steps):
            for i_n in T.unroll(tn):
                for j in T.unroll(words):  # halves 2j, 2j + 1: one row, adjacent columns
                    a_word[i_n * words + j] = _pack_f16x2(*[
                        _f16(values, w_row(bn, warp, lane, i_n, i % 4 // 2), _values_col(ks, step, lane, i), n, guard_n)
                        for i in (2 * j, 2 * j + 1)
                    ])  # fmt: skip
                e[i_n] = meta_word(meta, w_row(bn, warp, lane, i_n, 0), _meta_byte(ks, step, lane)) | (
                    meta_word(meta, w_row(bn, warp, lane, i_n, 1), _meta_byte(ks, step, lane)) << T.uint32(16)
                )
            for i_m in T.unroll(tm):
                for j in T.unroll(words):
                    b_word[i_m * words + j] = _pack_f16x2(*[
                        _f16(x, x_row(bm, warp, lane, i_m), _x_col(ks, step, lane, i), m, guard_m) for i in (2 * j, 2 * j + 1)
                    ])  # fmt: skip
            for i_n in T.unroll(tn):
                for i_m in T.unroll(tm):
                    if ks == 32:
                        T.ptx[mma](
                            *_acc_regs(acc, (i_n * tm + i_m) * 4),
                            a_word[i_n * 4], a_word[i_n * 4 + 1], a_word[i_n * 4 + 2], a_word[i_n * 4 + 3],
                            b_word[i_m * 4], b_word[i_m * 4 + 1], b_word[i_m * 4 + 2], b_word[i_m * 4 + 3],
                            *_acc_regs(acc, (i_n * tm + i_m) * 4),
                            e[i_n], 0,
                        )  # fmt: skip
                    else:
                        T.ptx[mma](
                            *_acc_regs(acc, (i_n * tm + i_m) * 4),
                            a_word[i_n * 2], a_word[i_n * 2 + 1], b_word[i_m * 2], b_word[i_m * 2 + 1],
                            *_acc_regs(acc, (i_n * tm + i_m) * 4),
                            e[i_n], 0,
                        )  # fmt: skip
        for i_n in T.unroll(tn):
            for i_m in T.unroll(tm):
                for i in T.unroll(4):  # C fragment: row g + 8 (i // 2), column 2 t + i % 2
                    if inside(w_row(bn, warp, lane, i_n, i // 2), x_row(bm, warp, lane, i_m, 1) + i % 2):
                        y[x_row(bm, warp, lane, i_m, 1) + i % 2, w_row(bn, warp, lane, i_n, i // 2)] = acc[
                            (i_n * tm + i_m) * 4 + i
                        ]

    return kernel


# ---------------------------------------------------------------------------- one-row GEMV
# An MMA is 8 rows of ``x`` wide: at one row it wastes 7/8 of its work and, with a warp walking
# all of ``K``, too few warps stream the weight (0.24-0.74x of the dense float32 GEMV on an
# H100). The GEMV reads the compressed weight on CUDA cores instead: a warp per output
# channel, each lane 4 kept values (a float4, 2 groups) and their meta byte per step, lanes
# on consecutive values (512 coalesced bytes per warp and step), x gathered by position
# (it stays in L1), the warp's partial sums added by shuffles.

GEMV_ROWS = 4  # output channels (warps) per thread block


def gemv_k(q, i, byte):
    """``k`` of the ``i``-th (0..3) kept value of quad ``q`` (values ``4q .. 4q + 3``, groups
    ``2q`` and ``2q + 1``), ``byte`` the quad's meta byte: 2 bits per kept value, in order."""
    return 8 * q + 4 * (i // 2) + ((byte >> (2 * i)) & 3)


def sparse24_gemv_cuda(m: int, n: int, k: int, rows: int = GEMV_ROWS):
    """The scheduled CUDA PrimFunc ``(x, values, meta, y)`` of a 2:4 GEMV (float32 FMAs on
    CUDA cores, the operands of ``sparse24_kernel_cuda``); ``m`` rows of ``x`` (one in
    builds), ``k`` a multiple of 8 (whole meta bytes), else ``ValueError``."""
    if m < 1 or n < 1 or k <= 0 or k % 8:
        raise ValueError(f"the 2:4 GEMV kernel needs m, n >= 1 and K a multiple of 8, got {m}x{n}x{k}")
    from tvm.script import tirx as T

    quads, blocks = k // 8, -(-n // rows)
    steps = -(-quads // 32)
    guard_n, guard_q = blocks * rows != n, steps * 32 != quads

    @T.prim_func(s_tir=True)
    def kernel(
        x: T.Buffer((m, k), "float32"),
        values: T.Buffer((n, k // 2), "float32"),
        meta: T.Buffer((n, k // 8), "uint8"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bx = T.launch_thread("blockIdx.x", blocks)
        ty = T.launch_thread("threadIdx.y", rows)
        lane = T.launch_thread("threadIdx.x", 32)
        acc = T.decl_buffer([m], "float32", scope="local")
        v4 = T.decl_buffer([4], "float32", scope="local")
        for r in T.unroll(m):
            acc[r] = T.float32(0)
        if not guard_n or bx * rows + ty < n:
            for step in T.serial(steps):
                if not guard_q or step * 32 + lane < quads:
                    q = step * 32 + lane
                    byte = T.Cast("int32", meta[bx * rows + ty, q])
                    for i in T.vectorized(4):  # one 16-byte load (k % 8 == 0: rows stay aligned)
                        v4[i] = values[bx * rows + ty, 4 * q + i]
                    for i in T.unroll(4):
                        for r in T.unroll(m):
                            acc[r] = acc[r] + v4[i] * x[r, gemv_k(q, i, byte)]
        mask = T.tvm_warp_activemask()
        for r in T.unroll(m):
            for d in T.unroll(5):
                acc[r] = acc[r] + T.tvm_warp_shuffle_down(mask, acc[r], 16 >> d, 32, 32)
            if lane == 0 and (not guard_n or bx * rows + ty < n):
                y[r, bx * rows + ty] = acc[r]

    return kernel


def emulate_gemv(x: np.ndarray, values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """``y`` as ``sparse24_gemv_cuda`` computes it, from its own ``gemv_k`` (all lanes and
    quads at once; the shuffle sum is a plain sum)."""
    n, k = values.shape[0], x.shape[1]
    q = np.arange(k // 8)
    byte = meta[:, q].astype(np.int64)  # [n, quads]
    y = np.zeros((x.shape[0], n), np.float64)
    for i in range(4):
        kk = gemv_k(q[None, :], i, byte)  # [n, quads]
        y += np.einsum("nq,mnq->mn", values[:, 4 * q + i].astype(np.float64), x.astype(np.float64)[:, kk])
    return y.astype(np.float32)


def dense_f16_kernel_cuda(m: int, n: int, k: int, tile: SparseTile | None = None):
    """The dense twin of ``sparse24_kernel_cuda``: the same tiles, threads, f16 conversion in
    registers and f32 sums, with ``w [n, k]`` float32 dense and ``mma.sync.m16n8k16`` in place
    of ``mma.sp``. Not used by builds: it is the baseline that isolates what 2:4 gains on tensor
    cores (hwc's dense CUDA build runs float32 on CUDA cores). ``k`` a multiple of 16."""
    if m < 1 or n < 1 or k <= 0 or k % 16:
        raise ValueError(f"dense f16 twin needs m, n >= 1 and k a multiple of 16, got {m}x{n}x{k}")
    return _build_dense(m, n, k, tile or choose_tile(m, n))


def _build_dense(m: int, n: int, k: int, tile: SparseTile):
    from tvm.script import tirx as T

    tn, tm, wn, wm = tile.tn, tile.tm, tile.wn, tile.wm
    steps, grid_n, grid_m = k // 16, -(-n // tile.block_n), -(-m // tile.block_m)
    guard_n, guard_m = grid_n * tile.block_n != n, grid_m * tile.block_m != m
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"

    def inside(row, col):
        return _inside(row, col, n, m, guard_n or guard_m)

    @T.prim_func(s_tir=True)
    def kernel(x: T.Buffer((m, k), "float32"), w: T.Buffer((n, k), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bn = T.launch_thread("blockIdx.y", grid_n)
        bm = T.launch_thread("blockIdx.x", grid_m)
        warp = T.launch_thread("threadIdx.y", wn * wm)
        lane = T.launch_thread("threadIdx.x", 32)
        a_word = T.decl_buffer([tn * 4], "uint32", scope="local")
        b_word = T.decl_buffer([tm * 2], "uint32", scope="local")
        acc = T.decl_buffer([tn * tm * 4], "float32", scope="local")
        for i in T.unroll(tn * tm * 4):
            acc[i] = T.float32(0)
        for step in T.serial(steps):
            for i_n in T.unroll(tn):  # dense m16n8k16 A: the compressed k32 fragment's layout
                for j in T.unroll(4):
                    a_word[i_n * 4 + j] = _pack_f16x2(*[
                        _f16(w, _w_row(tile, bn, warp, lane, i_n, i % 4 // 2), _values_col(32, step, lane, i), n, guard_n)
                        for i in (2 * j, 2 * j + 1)
                    ])  # fmt: skip
            for i_m in T.unroll(tm):
                for j in T.unroll(2):
                    b_word[i_m * 2 + j] = _pack_f16x2(*[
                        _f16(x, _x_row(tile, bm, warp, lane, i_m), _x_col(16, step, lane, i), m, guard_m) for i in (2 * j, 2 * j + 1)
                    ])  # fmt: skip
            for i_n in T.unroll(tn):
                for i_m in T.unroll(tm):
                    T.ptx[mma](
                        *_acc_regs(acc, (i_n * tm + i_m) * 4),
                        a_word[i_n * 4], a_word[i_n * 4 + 1], a_word[i_n * 4 + 2], a_word[i_n * 4 + 3],
                        b_word[i_m * 2], b_word[i_m * 2 + 1],
                        *_acc_regs(acc, (i_n * tm + i_m) * 4),
                    )  # fmt: skip
        for i_n in T.unroll(tn):
            for i_m in T.unroll(tm):
                for i in T.unroll(4):
                    row, col = _w_row(tile, bn, warp, lane, i_n, i // 2), _x_row(tile, bm, warp, lane, i_m, 1) + i % 2
                    if inside(row, col):
                        y[col, row] = acc[(i_n * tm + i_m) * 4 + i]

    return kernel


# ---------------------------------------------------------------------------- numpy emulation


def mma_sp_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray, e: np.ndarray, ks: int) -> np.ndarray:
    """One warp's ``mma.sp::ordered_metadata.m16n8k{ks}.row.col.f32.f16.f16.f32``, selector 0,
    from the registers of its 32 lanes, as the PTX ISA describes the fragments.

    ``a``, ``b``: ``[32, ks // 4]`` float16 (a lane's A / B halves in register order), ``c``:
    ``[32, 4]`` float32, ``e``: ``[32]`` uint32 metadata. Returns ``d`` like ``c``. Written
    from the ISA's per-fragment tables (groupID / threadID_in_group), independently of the
    kernel's indexing, which ``emulate`` checks against it.
    """
    a_dense = np.zeros((16, ks), np.float32)
    b_full = np.zeros((ks, 8), np.float32)
    c_full = np.zeros((16, 8), np.float32)
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(4):  # C/D: c0, c1 at row groupID, c2, c3 at groupID + 8
            c_full[group + (8 if i >= 2 else 0), tig * 2 + (i & 1)] = c[lane, i]
        for i in range(ks // 4):  # B: rows threadID_in_group * 2 + (i & 1), + 8 per pair
            b_full[tig * 2 + (i & 1) + 8 * (i // 2), group] = b[lane, i]
        # A: a0, a1 (and a4, a5 at k32) in row groupID, a2, a3 (a6, a7) in row groupID + 8;
        # each pair is the two non-zeros of one chunk of 4 k: chunk threadID_in_group (k16),
        # and threadID_in_group + 4 for a4..a7 (k32)
        for i in range(ks // 4):
            row = group + (8 if i % 4 >= 2 else 0)
            chunk = tig + (4 if i >= 4 else 0)
            # metadata, selector 0: lane 4 * groupID (+ 1 for chunks 4..7 at k32) holds the
            # chunks' indices, 4 bits per chunk, row groupID in bits 0..15, groupID + 8 in 16..31
            owner = 4 * group + chunk // 4
            nibble = (int(e[owner]) >> (16 * (row >= 8) + 4 * (chunk % 4))) & 0xF
            pos = (nibble >> (2 * (i & 1))) & 3
            if nibble & 3 >= nibble >> 2:
                raise ValueError(f"metadata nibble {nibble:#x} is not two increasing positions")
            a_dense[row, 4 * chunk + pos] = a[lane, i]
    d_full = a_dense.astype(np.float64) @ b_full.astype(np.float64) + c_full
    d = np.zeros_like(c)
    for lane in range(32):
        for i in range(4):
            d[lane, i] = d_full[(lane >> 2) + (8 if i >= 2 else 0), (lane % 4) * 2 + (i & 1)]
    return d


def emulate(x: np.ndarray, values: np.ndarray, meta: np.ndarray, tile: SparseTile | None = None) -> np.ndarray:
    """``y`` as ``sparse24_kernel_cuda`` computes it: every thread's loads, metadata words,
    guards and stores replayed with the kernel's own index functions, each warp's MMA by
    ``mma_sp_reference``. Outputs no thread writes stay NaN."""
    m, k = x.shape
    n = values.shape[0]
    ks = mma_k(k)
    tile = tile or choose_tile(m, n)
    halves = ks // 4
    y = np.full((m, n), np.nan, np.float32)
    lane = np.arange(32)

    def load(buf, row, col, rows):
        return np.where(row < rows, buf[np.minimum(row, rows - 1), col], 0).astype(np.float16)

    def meta_word(row, byte):
        r = np.minimum(row, n - 1)
        word = meta[r, byte].astype(np.uint32) | (meta[r, byte + 1].astype(np.uint32) << 8)
        return np.where(row < n, word, _PAD_NIBBLES).astype(np.uint32)

    for bn in range(-(-n // tile.block_n)):
        for bm in range(-(-m // tile.block_m)):
            for warp in range(tile.wn * tile.wm):
                acc = np.zeros((tile.tn, tile.tm, 32, 4), np.float32)
                for step in range(k // ks):
                    a = np.zeros((tile.tn, 32, halves), np.float16)
                    b = np.zeros((tile.tm, 32, halves), np.float16)
                    e = np.zeros((tile.tn, 32), np.uint32)
                    for i_n in range(tile.tn):
                        for i in range(halves):
                            row = _w_row(tile, bn, warp, lane, i_n, i % 4 // 2)
                            a[i_n, :, i] = load(values, row, _values_col(ks, step, lane, i), n)
                        byte = _meta_byte(ks, step, lane)
                        e[i_n] = meta_word(_w_row(tile, bn, warp, lane, i_n, 0), byte) | (
                            meta_word(_w_row(tile, bn, warp, lane, i_n, 1), byte) << 16
                        )
                    for i_m in range(tile.tm):
                        for i in range(halves):
                            b[i_m, :, i] = load(x, _x_row(tile, bm, warp, lane, i_m), _x_col(ks, step, lane, i), m)
                    for i_n in range(tile.tn):
                        for i_m in range(tile.tm):
                            acc[i_n, i_m] = mma_sp_reference(a[i_n], b[i_m], acc[i_n, i_m], e[i_n], ks)
                for i_n in range(tile.tn):
                    for i_m in range(tile.tm):
                        for i in range(4):
                            row = _w_row(tile, bn, warp, lane, i_n, i // 2)
                            col = _x_row(tile, bm, warp, lane, i_m, 1) + i % 2
                            ok = (row < n) & (col < m)
                            y[col[ok], row[ok]] = acc[i_n, i_m, ok, i]
    return y
