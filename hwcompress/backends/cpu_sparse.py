"""CPU kernels for 2:4 structured-sparse weights: ``y[m, n] = sum_k x[m, k] W[n, k]`` with
``W`` in the compressed form of ``passes.sparsity.mask24`` (``values [N, K/2]`` float32,
``meta [N, ceil(K/8)]`` uint8, two 2-bit positions per group of 4 ``k``).

``sparse24_kernel(m, n, k, target, variant)`` returns a hand-written, already scheduled
PrimFunc ``(x, *weights, y)`` (``y`` the output, DPS) for ``relax.call_tir``;
``kernel_operands(variant, compressed)`` gives its weight operands: ``values, meta`` for every
variant but ``LANES``, whose one operand holds the values with their positions embedded. Ways
to gather the ``x`` that each kept weight multiplies:

* ``LANES`` (x86 AVX2, ``m == 1``, ``K % 4 == 0``; the GEMV default): 8 output rows per vector,
  each kept value's position in its own two low mantissa bits, so that one ``vpermilps`` of
  the group's 4 ``x`` by the value vector gathers them (``cpu_sparse_gemv``'s docstring);
  weights stream at 50% of dense, prefetched.
* x86 with AVX2 (``K % 16 == 0``): one 16-``k`` chunk (4 groups, 8 kept weights, 2 meta
  bytes) of a row is one 8-lane vector of kept values; the matching ``x`` come from the
  chunk's 16 ``x`` by two register permutes driven by the meta bits, a blend, then one FMA.
  ``PERMPS``: ``vpermps`` (cross-lane, 3-bit indices) of ``x[16h:16h+8]`` and
  ``x[16h+8:16h+16]``, indices ``i | 4 * (odd group)`` built from the 16 meta bits with a
  shift, a mask and an or. ``PERMILPS``: ``vpermilps`` (in-lane, uses only the low 2 bits of
  each index, so the shifted meta word is the control as it is) of ``x`` regrouped as
  ``[g0 | g2]`` and ``[g1 | g3]`` (``x`` is stored regrouped once, at the kernel's start):
  two vector ops fewer per chunk; its control is the chunk's meta word broadcast straight from
  memory and shifted per lane (one vector op). ``Variant.lut`` takes the control from a
  256-entry table per meta byte (4 KB, built at the kernel's start) instead. The default for
  ``2 <= m <= 5`` (``m_rows`` rows of ``x`` share each row's control and values).
* ``PAIRS`` (AVX2, ``K % 8 == 0``): two rows per vector, one ``vpermps`` per 8 kept values;
  fewer vector ops, but on Zen 3 ``vpermps`` and the two 128-bit inserts cost more than two
  in-lane permutes: a candidate.
* ``BROADCAST`` (``m > 5``, any target; ``cpu_sparse_gemm``): ``x`` transposed once, then a
  broadcast kept weight times the ``x`` row its position selects, ``m``-vectorized: no
  permutes at all; the reduction is cut into chunks (``Variant.k_block``) whose ``x`` stays in
  L1. Measured (1 thread, whole call, against hwc's packed-conv dense): 49x2048x512 1.19x,
  49x512x2048 1.15x, 196x1024x256 1.34x; at ``m = 8`` (one ``m`` vector, decode-bound) 0.6x.
  ``Variant.shared``: for weights whose output-channel pairs keep the same positions
  (``Sparse24.pairs``), one ``x`` load serves both rows of a pair (the default there);
  ``Variant.tail``: for ``m % 8 == 1`` (odd square maps) the last row of ``x`` rides along
  in the pairs' loop instead of an 8th ``m`` vector.
  ``Variant.by_m``: parallel tasks over m-blocks, each transposing its own ``x`` chunks
  (the default from ``BY_M_FIRST`` m-blocks: large maps, narrowing convs).
  ``Variant.wide``: 16-lane vectors (AVX-512 targets; a candidate for pair weights).
* ``GENERIC`` (any LLVM target, ``K % 4 == 0``): scalar loops that read ``x`` at the decoded
  positions; this is what aarch64 builds.

Each n-block of ``rows`` output rows x ``m_rows`` input rows keeps one accumulator vector per
pair; the ``unroll`` chunks between accumulator updates are one FMA chain on the accumulator's
value (TVM gives every ``local`` buffer on CPU a workspace allocation; LLVM keeps the
accumulators in registers across the loop here, the assembly shows); a balanced tree of the
chunks measured ~4% slower (extra multiplies and adds). The permute kernels live in
``cpu_sparse_gemv``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .cpu_sparse_gemm import broadcast_kernel, m_blocking, pack_chunks, permutation_operand
from .cpu_sparse_gemv import CHUNK, WINDOW, lane_kernel, pack_lanes, pair_kernel, permute_kernel

__all__ = [
    "Gather", "Variant", "has_avx2", "has_avx512", "k_block", "kernel_operands", "pick_variant", "sparse24_kernel", "variant_named", "variants",
]  # fmt: skip

# Bytes of x (transposed) that one reduction chunk of the broadcast kernel keeps in L1: 7/8 of
# the 32 KB L1d of the Zen 3 host, the rest for the streamed values, meta and partial sums.
# Measured 49x2048x512 (x block 56 wide): chunks of 64 / 128 / 256 k 1.03 / 0.98 / 1.65 ms.
XT_CHUNK_BYTES = 28 << 10



class Gather(enum.Enum):
    """How the kernel fetches the ``x`` element of each kept weight."""

    LANES = "lanes"
    PERMPS = "permps"
    PERMILPS = "permilps"
    PAIRS = "pairs"
    BROADCAST = "broadcast"
    GENERIC = "generic"


@dataclass(frozen=True)
class Variant:
    """Tunable knobs of one kernel.

    ``rows``: output rows (``n``) per block, sharing every ``x`` load (``LANES``: vectors of 8
    rows); ``m_rows``: input rows
    (``m``) per block, sharing each row's controls and kept values; ``unroll``: 16-``k``
    chunks summed in registers between two accumulator updates (x86 only).
    """

    gather: Gather
    rows: int = 4
    unroll: int = 4
    m_rows: int = 1
    lut: bool = False  # permutes: controls from a 256-entry table per meta byte, not shifts
    k_block: int = 0  # broadcast: reduction chunk whose x stays in L1 (0: all of k)
    shared: bool = False  # broadcast: rows 2i, 2i + 1 keep the same positions (one x load for both)
    tail: bool = False  # shared, m % 8 == 1: the last row of x rides along in the pair's loop (no 8th vector)
    by_m: bool = False  # broadcast: one parallel task per m-block (all rows), x transposed by each in chunks
    wide: bool = False  # broadcast: 16-lane (AVX-512 zmm) accumulators and FMAs; m_rows must be even

    def __post_init__(self):
        if not isinstance(self.gather, Gather):
            raise TypeError(f"gather must be a Gather, got {self.gather!r}")
        # accumulators: rows x m_rows 8-lane vectors (AVX2 has 16 registers, AVX-512 32 of twice the width)
        if min(self.rows, self.unroll, self.m_rows) < 1 or self.rows * self.m_rows > 56 or self.k_block < 0:
            raise ValueError(f"bad sparse kernel variant {self}: knobs must be >= 1, rows x m_rows <= 56")
        if self.shared and (self.gather is not Gather.BROADCAST or self.rows % 2):
            raise ValueError(f"bad sparse kernel variant {self}: shared is a broadcast kernel of an even number of rows")
        if self.tail and not self.shared:
            raise ValueError(f"bad sparse kernel variant {self}: a tail row needs a shared kernel")
        if self.by_m and self.gather is not Gather.BROADCAST:
            raise ValueError(f"bad sparse kernel variant {self}: by_m is a broadcast kernel's task split")
        if self.wide and (self.gather is not Gather.BROADCAST or self.m_rows % 2):
            raise ValueError(f"bad sparse kernel variant {self}: wide is a broadcast kernel of an even m_rows")

    @property
    def name(self) -> str:
        kb = f"_kb{self.k_block}" if self.k_block else ""
        shared = ("_shared" if self.shared else "") + ("_t1" if self.tail else "")
        ms = ("_bym" if self.by_m else "") + ("_z" if self.wide else "")
        return f"{self.gather.value}{'_lut' if self.lut else ''}_r{self.rows}_u{self.unroll}_m{self.m_rows}{kb}{shared}{ms}"


def has_avx2(target) -> bool:
    """True when ``target`` is an x86 LLVM target with AVX2 (and FMA)."""
    from .cpu_intrin import target_has

    return target_has(target, "avx2") and target_has(target, "fma")


def has_avx512(target) -> bool:
    """True when ``target`` is an x86 LLVM target with AVX-512F (16-lane vectors, 32 registers)."""
    from .cpu_intrin import target_has

    return target_has(target, "avx512f")


def variants(m: int, n: int, k: int, target, pairs: bool = False) -> list[Variant]:
    """The variants worth measuring for one shape on ``target`` (the first is the default).

    Parameters
    ----------
    m, n, k : int
        Rows of ``x``, output features (rows of ``W``), reduction length.
    target : tvm.target.Target
        The LLVM target.
    pairs : bool
        The weight's rows ``2i``, ``2i + 1`` keep the same positions (``Sparse24.pairs``): the
        broadcast kernels that load each ``x`` once for both come first (``m > 5``).

    Returns
    -------
    list of Variant
        x86 variants when the target has AVX2 and ``k % 8 == 0`` (``k % 8`` only: the row-pair
        kernel for ``m == 1``, broadcast otherwise), else the generic one.
    """
    if k % 4:
        raise ValueError(f"2:4 sparsity needs k % 4 == 0, got k={k}")
    # m = 1 (batch-1 dense layers): the lane kernel, weights streamed at 50% of dense; measured
    # (Zen 1, one thread, kernel alone, 1 KB prefetch): 2 row vectors x 2 groups per step
    # 0.51 ms at 2048x2048, 1 x 2 0.52, 2 x 4 0.51, 2 x 1 0.53, 4 x 2 0.54
    lanes = [Variant(Gather.LANES, r, 2) for r in (2, 1, 4)] if m == 1 and has_avx2(target) else []
    if not (has_avx2(target) and k % WINDOW == 0):
        return lanes or [Variant(Gather.GENERIC, rows=1, unroll=1)]
    vecs = math.ceil(m / 8)
    # m_rows: vectors of m per block, the blocks that waste least on a last partial block
    # (it is recomputed overlapping the previous one); rows: ~12 accumulators of 16 registers
    by_waste = _by_waste(vecs, 8)
    # rows: ~14 accumulators of 16 registers (at most 8 rows: 14 x 1 vector spilled, 6x slower
    # at m = 2); k_block: the x chunk of a block stays in L1
    broadcast = [Variant(Gather.BROADCAST, max(1, min(8, 14 // mv)), 4, mv, k_block=k_block(k, mv * 8)) for mv in by_waste[:3]]
    broadcast += [Variant(Gather.BROADCAST, 2, 4, min(4, vecs), k_block=k_block(k, min(4, vecs) * 8))]
    if not (pairs and m > 5):
        broadcast = _with_by_m(broadcast, m, unrolls=(4, 2))
    else:
        # 2 rows x <= 6 m vectors of accumulators, the pair's broadcasts, the shared x vector;
        # measured (Zen 1, 1 thread, through the VM, session 16): 4 kept values per step
        # 5-12% faster than 2 at every ResNet-50 1x1 shape
        fit = _by_waste(vecs, 6)
        shared = [Variant(Gather.BROADCAST, 2, u, mv, k_block=k_block(k, mv * 8), shared=True) for mv, u in ((fit[0], 4), (fit[0], 2), (fit[-1], 4))]
        if m % 8 == 1 and m > 8:
            # odd squares (7x7 = 49, 13x13, ...) are 1 mod 8: the last row of x rides along in
            # the pairs' loop (its x under each kept position copied, dotted per chunk) instead
            # of an 8th m vector that 7 x 2 accumulators cannot hold (measured 49x2048x512:
            # 1.59x over dense where 4-vector blocks gave 1.34x); the rest block as for m - 1
            fit_t = _by_waste(math.ceil((m - 1) / 8), 6)
            shared = [Variant(Gather.BROADCAST, 2, u, fit_t[0], k_block=k_block(k, fit_t[0] * 8), shared=True, tail=True) for u in (4, 2)] + shared
        broadcast = list(dict.fromkeys(_with_by_m(shared, m, unrolls=(4,)) + broadcast))
        if has_avx512(target):
            broadcast += _wide(broadcast, m)
    if k % CHUNK:  # k % 8 == 0 only: the row-pair kernel works on 8-k windows
        return lanes + [Variant(Gather.PAIRS, 8, 2, 1, True)] if m == 1 else broadcast
    # measured (Zen 3, 1 thread, kernel alone): 1x2048x2048
    # permilps r4 u2 0.21 ms, u4 0.23, pairs (vpermps, 1.33 cycles each on Zen 3) 0.34, the
    # table-driven control 0.29; m = 2..4: permilps with m_rows = m 2-3x faster than broadcast
    # (whose m-vectors are mostly padding), m = 8: broadcast 15% faster
    unroll = min(2, k // CHUNK)
    pl = Gather.PERMILPS
    if m == 1:
        return lanes + [Variant(pl, 4, unroll), Variant(pl, 4, unroll, 1, True), Variant(Gather.PAIRS, 8, 2, 1, True)]
    small = [Variant(pl, 4 if m <= 2 else 2, unroll, min(m, 4))]
    if m <= 5:
        return small + broadcast[:2]
    return broadcast + (small if m <= 8 else [])


# m-blocks from which a by_m kernel comes first: each task's x chunks are transposed by that task
# (measured, Zen 1, pairs, 1 / 2 threads: 784x128x512 1.55x / 1.66x over dense where tasks over
# rows gave 1.31x / 1.04x; 3136x64x256 1.44x / 1.37x against 1.08x / 1.00x); with fewer blocks
# the tasks split the rows too and each transposes the same x chunks (49x512x2048, one block,
# 2 threads: 1.56x against 1.66x)
BY_M_FIRST = 4


def _with_by_m(candidates: list[Variant], m: int, unrolls: tuple[int, ...]) -> list[Variant]:
    """``candidates`` and ``by_m`` copies of the first (one per unroll of ``unrolls``), those
    first when it has at least ``BY_M_FIRST`` m-blocks; none for a single m-block."""
    import dataclasses

    first = candidates[0]
    blocks = m_blocking(m, first)[3]
    if blocks < 2:
        return candidates
    by_m = [dataclasses.replace(first, by_m=True, unroll=u) for u in unrolls]
    return by_m + candidates if blocks >= BY_M_FIRST else candidates[:1] + by_m + candidates[1:]


# 16-lane copies of the first candidates whose m-blocks are an even number of 8-row vectors, on
# AVX-512 targets, measured against the rest (Zen 4, 1 thread, pairs, kernel alone): 3136x64x256
# 0.613 ms against 0.703 (8-lane, same blocks), 49x2048x512 0.535 against 0.551; where the
# 8-lane blocks are odd (784 or 196 rows: 5 vectors) the even ones waste more: 0.555 against
# 0.549 ms at 784x128x512, 0.71 against 0.58 at 196x256x1024
WIDE_COPIES = 2


def _wide(candidates: list[Variant], m: int) -> list[Variant]:
    """16-lane copies of the first ``WIDE_COPIES`` pairs (``shared``) candidates whose m-blocks
    are an even number of 8-row vectors: half the FMA, load and broadcast instructions of the
    8-lane loop, which Zen 4 runs at its instruction rate, not its FMA rate. (Per-row kernels
    are bound by their one load per FMA at either width: 1.09 ms 16-lane against 1.02 8-lane at
    196x256x1024, so none for them.)"""
    import dataclasses

    even = [v for v in candidates if v.shared and m_blocking(m, v)[2] % 2 == 0]
    return [dataclasses.replace(v, wide=True) for v in even[:WIDE_COPIES]]


def _by_waste(vecs: int, most: int) -> list[int]:
    """Vectors of m per block, 4 (or all ``vecs``) up to ``most``: those that compute the fewest
    vectors in all first (the last block is shifted back to overlap the previous one), then the
    larger."""
    return sorted(range(min(4, vecs), min(most, vecs) + 1), key=lambda mv: (math.ceil(vecs / mv) * mv, -mv))


def variant_named(m: int, n: int, k: int, target, name: str | None, pairs: bool = False) -> Variant:
    """The candidate of ``variants(m, n, k, target, pairs)`` called ``name`` (``Variant.name``,
    as ``pick_variant`` measured it); the default (the first) for None or a name that is not a
    candidate here (a report from another version or target, a ``shared`` kernel for a weight
    whose pairs do not share positions)."""
    candidates = variants(m, n, k, target, pairs)
    return next((v for v in candidates if v.name == name), candidates[0])


def k_block(k: int, width: int, budget: int = XT_CHUNK_BYTES) -> int:
    """The largest reduction chunk (a multiple of 8 dividing ``k``, at most 128) whose ``x``
    block (``k_block x width`` floats) fits ``budget`` bytes; 0 (no chunks) when ``k`` fits."""
    if k * width * 4 <= budget:
        return 0
    fits = [c for c in range(8, min(k, 128) + 1, 8) if k % c == 0 and c * width * 4 <= budget]
    return max(fits, default=0) or (4 if k % 8 else 8)


def sparse24_kernel(m: int, n: int, k: int, target, variant: Variant | None = None, epilogue=None):
    """The scheduled 2:4 sparse GEMM kernel ``y = x @ decompress(values, meta).T``.

    Parameters
    ----------
    m, n, k : int
        ``x`` is ``[m, k]``, the dense weight ``[n, k]``, ``y`` is ``[m, n]``.
    target : tvm.target.Target
        LLVM target; its core count sets the parallel split, its features the gather.
    variant : Variant, optional
        Knobs (``variants``/``pick_variant``); default: the first of ``variants``.
    epilogue : sparse_lower.Epilogue, optional
        The layer's input permutation, bias, residual and clamp, done by the kernel
        (``BROADCAST`` only; ValueError for the others).

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(x: float32[m, k], values: float32[n, k//2], meta: uint8[n, (k+7)//8],
        y: float32[m, n])`` (``LANES``: ``(x, w, y)``, ``w`` from ``kernel_operands``; with an
        epilogue its operands before ``y``), marked ``tirx.is_scheduled``, without a global symbol.
    """
    from .cpu_schedule import CpuFacts

    variant = variant or variants(m, n, k, target)[0]
    if epilogue is not None and not epilogue.empty and variant.gather is not Gather.BROADCAST:
        raise ValueError(f"the {variant.gather.value} kernel takes no epilogue (broadcast kernels only)")
    if min(m, n, k) < 1 or k % 4:
        raise ValueError(f"bad 2:4 GEMM shape m={m} n={n} k={k} (k must be a multiple of 4)")
    if variant.gather in (Gather.PERMPS, Gather.PERMILPS) and not (has_avx2(target) and k % CHUNK == 0):
        raise ValueError(f"{variant.gather.value} needs an AVX2 target and k % {CHUNK} == 0 (k={k})")
    if variant.gather is Gather.PAIRS and not (has_avx2(target) and k % WINDOW == 0):
        raise ValueError(f"pairs needs an AVX2 target and k % {WINDOW} == 0 (k={k})")
    if variant.tail and not (m % 8 == 1 and m > 8):
        raise ValueError(f"a tail-row kernel needs m % 8 == 1 and m > 8 (m={m})")
    if variant.gather is Gather.LANES and not (has_avx2(target) and m == 1):
        raise ValueError(f"lanes needs an AVX2 target and m == 1 (m={m})")
    cores = CpuFacts.from_target(target).num_cores
    if variant.gather is Gather.LANES:
        from .cpu_prefetch import distance_for

        func = lane_kernel(n, k, variant.rows, variant.unroll, lambda b: _split(b, cores), distance_for(target))
    elif variant.gather is Gather.GENERIC:
        func = generic_kernel(m, n, k, cores)
    elif variant.gather is Gather.PAIRS:
        func = pair_kernel(m, n, k, max(1, variant.rows // 2), variant.unroll, variant.m_rows, variant.lut, lambda b: _split(b, cores))
    elif variant.gather is Gather.BROADCAST:
        func = broadcast_kernel(m, n, k, variant, lambda b: _split(b, cores), epilogue, cores)
    else:
        func = permute_kernel(m, n, k, variant, lambda b: _split(b, cores))
    return func.with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


def kernel_operands(variant: Variant, c, perm=None) -> list:
    """The weight operands of ``variant``'s kernel for the compressed weight ``c``
    (``mask24.Compressed``): ``[values, meta]`` (``BROADCAST``: chunk-major, ``pack_chunks``),
    or ``LANES``' one packed array; ``perm``: the input-channel permutation of an epilogue
    with ``perm`` (``BROADCAST``: its ``pidx`` operand follows)."""
    if variant.gather is Gather.LANES:
        from ..passes.sparsity.mask24 import embed_positions

        return [pack_lanes(embed_positions(c), variant.rows)]
    if perm is not None and variant.gather is not Gather.BROADCAST:
        raise ValueError(f"the {variant.gather.value} kernel reads no permutation (broadcast kernels only)")
    if variant.gather is Gather.BROADCAST:
        return [*pack_chunks(c.values, c.meta, c.k, variant), *([] if perm is None else [permutation_operand(perm)])]
    return [c.values, c.meta]


def _split(blocks: int, cores: int) -> tuple[int, int]:
    """(tasks, blocks per task): a few tasks per core, not one per block (each task allocates
    its accumulators once). TVM's parallel loop gives each thread one contiguous, equal range
    of the tasks (no stealing), so more tasks do not rebalance a busy core; measured (Zen 4,
    pairs, tasks over rows, 49x512x2048 and 49x2048x512): 2, 4 or 8 tasks within 5% of each
    other at 1 and 2 threads, no order."""
    tasks = max(1, min(blocks, 4 * cores))
    per = math.ceil(blocks / tasks)
    return math.ceil(blocks / per), per


# ---------------------------------------------------------------------------- generic


def generic_kernel(m: int, n: int, k: int, cores: int, x_dtype: str = "float32", w_dtype: str = "float32", acc: str = "float32"):
    """Scalar loops over the kept weights at their decoded positions (any LLVM target);
    ``cpu_sparse_int8`` builds its generic kernel here too (uint8 x int8 -> int32)."""
    import tvm
    from tvm.script import tirx as T

    groups = k // 4
    tasks, per = _split(n, cores)
    zero = tvm.tirx.const(0, acc)

    def pos(meta, row, g, slot):
        return 4 * g + ((T.Cast("int32", meta[row, g // 2]) >> (4 * (g % 2) + 2 * slot)) & 3)

    def widen(value, dtype):
        return value if dtype == acc else T.Cast(acc, value)

    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), x_dtype),
        values: T.Buffer((n, k // 2), w_dtype),
        meta: T.Buffer((n, (k + 7) // 8), "uint8"),
        y: T.Buffer((m, n), acc),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tasks):
            for b in range(per):
                if t * per + b < n:
                    for i in range(m):
                        y[i, t * per + b] = zero
                        for g in range(groups):
                            y[i, t * per + b] = y[i, t * per + b] + (
                                widen(values[t * per + b, 2 * g], w_dtype) * widen(x[i, pos(meta, t * per + b, g, 0)], x_dtype)
                                + widen(values[t * per + b, 2 * g + 1], w_dtype) * widen(x[i, pos(meta, t * per + b, g, 1)], x_dtype)
                            )

    return kernel


# ---------------------------------------------------------------------------- measurement


def build(func, target):
    """Compile one kernel into a runtime module whose function is ``main``."""
    import tvm

    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod


def random_operands(m: int, n: int, k: int, seed: int = 0, pairs: bool = False):
    """Random ``x``, compressed random weights (``mask24.Compressed``; ``pairs``: rows ``2i``,
    ``2i + 1`` keeping the same positions) and an empty ``y``, as numpy arrays
    (``kernel_operands`` turns the weights into a variant's operands)."""
    import numpy as np

    from ..passes.sparsity.mask24 import compress, shared_mask_2to4

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    c = compress(w * shared_mask_2to4(w, n) if pairs else w)
    return rng.standard_normal((m, k)).astype(np.float32), c, np.zeros((m, n), np.float32)


def pick_variant(
    m: int, n: int, k: int, target, number: int = 20, repeat: int = 3, candidates=None, pairs: bool = False
) -> tuple[Variant, dict]:
    """Build every candidate variant, time it on this host, return the fastest.

    Parameters
    ----------
    m, n, k : int
        The GEMM shape.
    target : tvm.target.Target
        Must describe this host (the kernels run here).
    number, repeat : int
        ``time_evaluator`` runs per measurement and rounds of measurements, every candidate
        once per round (the fastest of its rounds is kept).
    candidates : list of Variant, optional
        Default: ``variants(m, n, k, target, pairs)``.
    pairs : bool
        Time on weights whose row pairs share positions (``Sparse24.pairs``).

    Returns
    -------
    (Variant, dict)
        The fastest variant and the seconds of each, its fastest round (keyed by ``Variant.name``).
    """
    import tvm

    candidates = list(candidates or variants(m, n, k, target, pairs))
    if len(candidates) == 1:
        return candidates[0], {}

    x, c, y = random_operands(m, n, k, pairs=pairs)
    dev = tvm.cpu()
    runs = {}
    for var in candidates:
        fn = build(sparse24_kernel(m, n, k, target, var), target).time_evaluator("main", dev, number=number, repeat=1)
        runs[var] = (fn, [tvm.runtime.tensor(a) for a in (x, *kernel_operands(var, c), y)])
    # the repeats interleaved (every candidate once per round), so that a slow minute of a
    # shared machine hits all alike: timed one after another, a 1.25x kernel once beat a 1.62x
    # one (Zen 4, 49x2048x512, pairs); the fastest round of each, as the layer decision does
    # (``layer_timing.time_layers``: noise only adds time)
    samples = {var: [] for var in candidates}
    for _ in range(repeat):
        for var, (fn, args) in runs.items():
            samples[var].append(fn(*args).mean)
    times = {var: min(ts) for var, ts in samples.items()}
    best = min(times, key=times.get)
    return best, {var.name: s for var, s in times.items()}
