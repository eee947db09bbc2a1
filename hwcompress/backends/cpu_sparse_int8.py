"""CPU kernels for 2:4 INT8: ``y[m, n] (int32) = sum_k x[m, k] (uint8) * W[n, k] (int8)``, with
``W`` 2:4 along ``k`` and stored compressed: the kept int8 values (``[N, K/2]``) and the 2-bit
positions of ``passes.sparsity.mask24`` (``meta [N, K/8]`` uint8): 62.5% of the dense int8
weight. Exact integer arithmetic: the result equals a dense int8 kernel on the masked weight.

``pack(w_nk, kind)`` gives the kernel's ``(values, meta)``; ``sparse24_int8_kernel(m, n, k,
target, variant)`` the hand-written, already scheduled PrimFunc ``(x, values, meta, y)``.

``AVX2`` (x86 with AVX2, ``K % 64 == 0``, weights in ``[-64, 64]``, which the quantizer makes
for ``[hardware].int8 = "avx2"``): one step is 64 ``k`` of one output row, 32 kept weights in
one ``ymm``. Lane ``L`` (128 bits) of the step holds the even (``L = 0``) or odd (``L = 1``)
groups of the step's 16; its 16-byte ``vpshufb`` tables are those groups' ``x`` (``x`` is
regrouped once per call so that each table is one aligned load). The gather control of each
kept weight is its 2-bit position plus 4 x its group's place in the table, made from the
step's 64 meta bits with four ops: a broadcast of the meta word, a ``vpsrlvq`` by 0/2/4/6
(each 64-bit copy then has every fourth field in the low bits of its bytes), a ``vpshufb``
that picks each weight's byte, an ``and 3`` / ``or`` of the group offset. Then two
``vpshufb`` (one per table) and a ``vpblendd`` put the ``x`` of each kept weight under it, and
``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` accumulate, as the dense kernel does (``|w| <= 64``
keeps the ``vpmaddubsw`` pair sums inside int16). The kept values are stored in the order
the gather produces (a permutation within each step, done when the weights are packed), the
meta as ``mask24`` writes it. Per 64 ``k`` of a row: 2 multiplies where a dense row needs 4,
and 40 weight bytes instead of 64; the gather costs 6 shuffle/logic ops. Rows of ``x``
(``m_rows``) share each row's controls; output rows (``rows``) share each ``x`` load.

``VNNI`` (AVX-512 VNNI with 256-bit vectors, or AVX-VNNI): the ``AVX2`` kernel with its
multiply-accumulate as one ``vpdpbusd``, which sums the four u8 x s8 products of each int32
lane in int32 (``vpmaddubsw``'s pairs and ``vpmaddwd`` group the same four): exact for any
int8 weight, so full-range weights (what the quantizer makes for ``int8 = "vnni"``) take it too.

``GENERIC`` (any LLVM target): scalar loops over the kept weights at their decoded positions,
the same ``mask24`` layout; what aarch64 and full-range weights without VNNI build.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Kind", "STEP", "Variant8", "kind_for", "pack", "slot_order", "sparse24_int8_kernel", "variants8"]

STEP = 64  # k per AVX2 step: 16 groups, 32 kept int8 weights, 8 meta bytes
SATURATION_FREE = 64  # |w| <= 64: a vpmaddubsw pair sum of uint8 x is at most 32640
_PSHUFB = "llvm.x86.avx2.pshuf.b"
_PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"
_PMADDWD = "llvm.x86.avx2.pmadd.wd"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"  # AVX512-VNNI + VL and AVX-VNNI alike


class Kind(enum.Enum):
    AVX2 = "avx2"
    VNNI = "vnni"
    GENERIC = "generic"


@dataclass(frozen=True)
class Variant8:
    """``rows``: output rows per block (sharing each ``x`` load); ``m_rows``: rows of ``x`` per
    block (sharing each row's controls and values); ``unroll``: steps between accumulator
    updates."""

    kind: Kind
    rows: int = 4
    m_rows: int = 1
    unroll: int = 2

    def __post_init__(self):
        if min(self.rows, self.m_rows, self.unroll) < 1 or self.rows * self.m_rows > 12:
            raise ValueError(f"bad 2:4 int8 kernel variant {self}: knobs must be >= 1, rows x m_rows <= 12")

    @property
    def name(self) -> str:
        return f"int8_{self.kind.value}_r{self.rows}_m{self.m_rows}_u{self.unroll}"


def slot_order() -> np.ndarray:
    """``order[z]``: the kept value (index within an AVX2 step, ``mask24`` order) at byte ``z``
    of the step's vector: lane ``L = z // 16``, byte ``s = z % 16`` holds field
    ``4 (s // 2) + 2 L + s % 2`` (group ``2 (s // 2) + L``)."""
    z = np.arange(32)
    lane, s = z // 16, z % 16
    return 4 * (s // 2) + 2 * lane + s % 2


def pack(w_nk: np.ndarray, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """``(values int8 [N, K/2], meta uint8 [N, ceil(K/8)])`` of a 2:4 int8 ``W[N, K]`` for ``kind``."""
    from ..passes.sparsity.mask24 import compress, is_2to4

    w = np.asarray(w_nk)
    if w.dtype != np.int8 or not is_2to4(w):
        raise ValueError(f"pack needs a 2:4 int8 [N, K] weight, got {w.dtype} {w.shape}")
    c = compress(w)
    if kind is Kind.GENERIC:
        return c.values, c.meta
    if w.shape[1] % STEP:
        raise ValueError(f"the {kind.value} 2:4 int8 kernel needs K % {STEP} == 0, got {w.shape[1]}")
    n, half = c.values.shape
    steps = c.values.reshape(n, half // 32, 32)[:, :, slot_order()]
    return np.ascontiguousarray(steps.reshape(n, half)), c.meta


def has_vnni256(target) -> bool:
    """True when ``target`` has ``vpdpbusd`` on 256-bit vectors (AVX512-VNNI with AVX512-VL, or
    AVX-VNNI)."""
    from .cpu_intrin import target_has

    return (target_has(target, "avx512vnni") and target_has(target, "avx512vl")) or target_has(target, "avxvnni")


def kind_for(target, k: int, max_abs_weight: int) -> Kind:
    """The kernel for ``target``: VNNI where it applies (``K % 64``, any int8 weight), else AVX2
    (``K % 64``, 7-bit weights), else generic."""
    from .cpu_sparse import has_avx2

    if k % STEP == 0 and has_vnni256(target):
        return Kind.VNNI
    if has_avx2(target) and k % STEP == 0 and max_abs_weight <= SATURATION_FREE:
        return Kind.AVX2
    return Kind.GENERIC


def variants8(m: int, n: int, k: int, kind: Kind) -> list[Variant8]:
    """Variants worth measuring (the first is the default)."""
    if kind is Kind.GENERIC:
        return [Variant8(Kind.GENERIC, 1, 1, 1)]
    steps = k // STEP
    if m == 1:  # measured (1 thread): 1x4096x4096 r1 u4 0.32 ms, r4 u2 0.36, r8 u2 0.38; alike at 1024-2048
        return [Variant8(kind, 1, 1, min(4, steps)), Variant8(kind, 4, 1, min(2, steps)), Variant8(kind, 8, 1, min(2, steps))]
    mr = min(m, 4)
    return [Variant8(kind, 2, mr, 1), Variant8(kind, 3, mr, 1), Variant8(kind, 1, min(m, 8), 1)]


def sparse24_int8_kernel(m: int, n: int, k: int, target, variant: Variant8):
    """The scheduled kernel ``y = x @ W.T`` (int32) for ``pack``'s operands.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(x: uint8[m, k], values: int8[n, k//2], meta: uint8[n, ceil(k/8)], y: int32[m, n])``,
        marked ``tirx.is_scheduled``, without a global symbol.
    """
    from .cpu_schedule import CpuFacts
    from .cpu_sparse import _split, generic_kernel

    if min(m, n, k) < 1 or k % 4:
        raise ValueError(f"bad 2:4 int8 GEMM shape m={m} n={n} k={k} (k must be a multiple of 4)")
    cores = CpuFacts.from_target(target).num_cores
    if variant.kind in (Kind.AVX2, Kind.VNNI):
        if k % STEP:
            raise ValueError(f"the {variant.kind.value} 2:4 int8 kernel needs k % {STEP} == 0 (k={k})")
        func = _avx2(m, n, k, variant, lambda b: _split(b, cores))
    else:
        func = generic_kernel(m, n, k, cores, "uint8", "int8", "int32")
    return func.with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


def _avx2(m: int, n: int, k: int, v: Variant8, split):
    from tvm.script import tirx as T

    R, MR = v.rows, min(v.m_rows, m)
    steps = k // STEP
    U = min(v.unroll, steps)
    full, tail = divmod(steps, U)
    nblk, mblk = math.ceil(n / R), math.ceil(m / MR)
    tasks, per = split(nblk * mblk)

    def i8(expr):
        return T.Cast("int8x32", expr)

    def control(meta, row, h):
        """The 32 vpshufb indices of step ``h`` of ``row`` (module docstring)."""
        s = T.Ramp(0, 1, 32)
        pick = i8(((s & T.Broadcast(1, 32)) << T.Broadcast(3, 32)) | ((s & T.Broadcast(15, 32)) >> T.Broadcast(1, 32)))
        offset = i8((s << T.Broadcast(1, 32)) & T.Broadcast(12, 32))
        word = T.reinterpret("uint64", meta.vload([row, 8 * h], "uint8x8"))
        shifted = T.Broadcast(word, 4) >> T.Cast("uint64x4", T.Ramp(0, 2, 4))
        fields = T.call_llvm_pure_intrin("int8x32", _PSHUFB, T.reinterpret("int8x32", shifted), pick)
        return (fields & T.Broadcast(T.int8(3), 32)) | offset

    def gathered(xg, ctl, xrow, h):
        xa = T.reinterpret("int8x32", xg.vload([xrow, STEP * h], "uint8x32"))
        xb = T.reinterpret("int8x32", xg.vload([xrow, STEP * h + 32], "uint8x32"))
        ga = T.reinterpret("int32x8", T.call_llvm_pure_intrin("int8x32", _PSHUFB, xa, ctl))
        gb = T.reinterpret("int32x8", T.call_llvm_pure_intrin("int8x32", _PSHUFB, xb, ctl))
        return T.reinterpret("int8x32", T.Shuffle([ga, gb], [0, 1, 10, 11, 4, 5, 14, 15]))

    def product(g, w):
        pairs = T.call_llvm_pure_intrin("int16x16", _PMADDUBSW, g, w)
        return T.call_llvm_pure_intrin("int32x8", _PMADDWD, pairs, T.Broadcast(T.int16(1), 16))

    def step(acc, xg, values, meta, row, xrow, h):
        """``acc`` plus step ``h`` of output row ``row`` times ``x`` row ``xrow``."""
        g, w = gathered(xg, control(meta, row, h), xrow, h), values.vload([row, 32 * h], "int8x32")
        if v.kind is Kind.VNNI:
            return T.call_llvm_pure_intrin("int32x8", _VPDPBUSD, acc, g, w)
        return acc + product(g, w)

    def hsum(acc, base):
        return sum((acc[base + j] for j in range(1, 8)), acc[base])

    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), "uint8"),
        values: T.Buffer((n, k // 2), "int8"),
        meta: T.Buffer((n, k // 8), "uint8"),
        y: T.Buffer((m, n), "int32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # x regrouped per step: [even groups 0-6 | odd 1-7], [even 8-14 | odd 9-15]
        xg = T.alloc_buffer((m, k), "uint8")
        for i, h, t, lane, j in T.grid(m, steps, 2, 2, 4):
            xg[i, T.Ramp(STEP * h + 32 * t + 16 * lane + 4 * j, 1, 4)] = x[i, T.Ramp(STEP * h + 32 * t + 8 * j + 4 * lane, 1, 4)]
        for tk in T.parallel(tasks):
            acc = T.alloc_buffer((R * MR * 8,), "int32", scope="local")
            for b in range(per):
                if tk * per + b < nblk * mblk:
                    for a in T.unroll(R * MR):
                        acc[T.Ramp(a * 8, 1, 8)] = T.Broadcast(T.int32(0), 8)
                    for hc in range(full):
                        for u in T.unroll(U):
                            for r in T.unroll(R):
                                for i in T.unroll(MR):
                                    acc[T.Ramp((r * MR + i) * 8, 1, 8)] = step(
                                        acc[T.Ramp((r * MR + i) * 8, 1, 8)], xg, values, meta,
                                        T.min(((tk * per + b) // mblk) * R + r, n - 1), T.min(((tk * per + b) % mblk) * MR + i, m - 1), hc * U + u,
                                    )  # fmt: skip
                    for u in T.unroll(max(tail, 1)):
                        if u < tail:
                            for r in T.unroll(R):
                                for i in T.unroll(MR):
                                    acc[T.Ramp((r * MR + i) * 8, 1, 8)] = step(
                                        acc[T.Ramp((r * MR + i) * 8, 1, 8)], xg, values, meta,
                                        T.min(((tk * per + b) // mblk) * R + r, n - 1), T.min(((tk * per + b) % mblk) * MR + i, m - 1), full * U + u,
                                    )  # fmt: skip
                    for r in T.unroll(R):
                        for i in T.unroll(MR):
                            y[T.min(((tk * per + b) % mblk) * MR + i, m - 1), T.min(((tk * per + b) // mblk) * R + r, n - 1)] = hsum(
                                acc, (r * MR + i) * 8
                            )

    return kernel
