"""2:4 structured sparsity math on numpy arrays (no IR): masks, the compressed form, and the
input-channel permutation that keeps more weight magnitude.

A weight is seen as a GEMM operand ``W[N, K]``: ``y[m, n] = sum_k x[m, k] W[n, k]``, ``K`` the
reduction axis (a matmul's ``B[K, N]`` is ``W = B.T``; a 1x1 conv's ``OHWI`` weight is
``W = w[:, 0, 0, :]``). 2:4 keeps the 2 largest-magnitude of every 4 consecutive ``k``.

The compressed form (``compress``), which the kernels read and the artifact stores:

* ``values``: ``[N, K/2]``, the kept weights of group ``g = k // 4`` at ``2g`` and ``2g + 1``,
  in increasing ``k``;
* ``meta``: ``[N, ceil(K/8)]`` uint8, 2 bits per kept value: group ``g``'s positions
  ``i0 < i1`` (in ``0..3``) are the nibble ``i0 | i1 << 2`` at bit ``4 * (g % 2)`` of byte
  ``g // 2``.

FP32: 4 bytes x K/2 + K/4 bytes per row = 53% of dense; INT8 values: 62.5%.

``embed_positions`` folds the positions into the values themselves (each float32 value's two
lowest mantissa bits: 50% of dense, no ``meta``), for kernels that select with the value's own
bits (``backends.cpu_sparse_gemv.lane_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Compressed", "compress", "conv_rows", "decompress", "embed_positions", "is_2to4", "kept_fraction", "mask_2to4",
    "pair_sums", "pairs_share_positions", "permutation_search", "shared_mask_2to4",
]  # fmt: skip

GROUP = 4
KEEP = 2


def _groups(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"2:4 sparsity needs a 2-D [N, K] weight, got shape {w.shape}")
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"2:4 sparsity needs the reduction length to be a multiple of 4, got {k}")
    return w.reshape(n, k // GROUP, GROUP)


def _kept_positions(w: np.ndarray) -> np.ndarray:
    """``[N, K/4, 2]`` positions (increasing) of the 2 largest |w| of each group; ties keep
    the lower position (stable), so an all-zero group keeps positions 0 and 1."""
    order = np.argsort(-np.abs(_groups(w)), axis=-1, kind="stable")[..., :KEEP]
    return np.sort(order, axis=-1)


def is_2to4(w: np.ndarray) -> bool:
    """Whether ``W[N, K]`` already has at most 2 nonzeros in every 4 consecutive ``k``."""
    if w.ndim != 2 or w.shape[1] % GROUP or w.size == 0:
        return False
    return bool((np.count_nonzero(_groups(w), axis=-1) <= KEEP).all())


def conv_rows(w_ohwi: np.ndarray) -> np.ndarray:
    """An ``OHWI`` conv weight as 2:4 sees it: ``[O * KH * KW, I]``. With ``I % 4 == 0`` the
    groups of the GEMM view ``[O, KH * KW * I]`` are 4 input channels of one tap, so the
    mask, and an input-channel permutation (one for every tap), work on these rows."""
    return w_ohwi.reshape(-1, w_ohwi.shape[-1])


def mask_2to4(w: np.ndarray) -> np.ndarray:
    """Boolean ``[N, K]`` mask keeping the 2 largest-magnitude weights of every 4 along ``K``."""
    pos = _kept_positions(w)
    mask = np.zeros(_groups(w).shape, dtype=bool)
    np.put_along_axis(mask, pos, True, axis=-1)
    return mask.reshape(w.shape)


def pair_sums(rows: np.ndarray, channels: int) -> np.ndarray:
    """``|W|`` of ``rows [channels * T, K]`` (``T`` rows per output channel: a conv's taps, as
    ``conv_rows`` orders them) summed over pairs of consecutive channels at each of the ``T``:
    ``[ceil(channels / 2) * T, K]`` (an odd last channel alone)."""
    a = np.abs(np.asarray(rows, dtype=np.float64))
    if channels < 1 or a.shape[0] % channels:
        raise ValueError(f"{a.shape[0]} rows are not {channels} channels of equally many rows")
    a = a.reshape(channels, -1, a.shape[1])
    if channels % 2:
        a = np.concatenate([a, np.zeros_like(a[:1])])
    return (a[0::2] + a[1::2]).reshape(-1, a.shape[2])


def shared_mask_2to4(rows: np.ndarray, channels: int) -> np.ndarray:
    """Boolean 2:4 mask of ``rows [channels * T, K]`` whose positions are shared by each pair of
    consecutive output channels (at each of the ``T`` rows per channel): the 2 of every 4 with
    the largest magnitude summed over the pair. Every row still keeps 2 of every 4, and a
    kernel can load the ``x`` under a kept position once for both channels."""
    n, k = np.shape(rows)
    t = n // channels
    mask = mask_2to4(pair_sums(rows, channels)).reshape(-1, 1, t, k)
    return np.broadcast_to(mask, (mask.shape[0], 2, t, k)).reshape(-1, k)[: channels * t].reshape(n, k)


def pairs_share_positions(meta: np.ndarray) -> bool:
    """Whether rows ``2i`` and ``2i + 1`` of a compressed weight keep the same positions
    (``meta`` of ``compress``; an odd last row alone)."""
    even = meta.shape[0] // 2 * 2
    return bool(np.array_equal(meta[0:even:2], meta[1:even:2]))


def kept_fraction(w: np.ndarray, perm: np.ndarray | None = None) -> float:
    """Fraction of ``sum |W|`` that 2:4 keeps (after permuting ``K`` by ``perm``, if given)."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    if perm is not None:
        a = a[:, perm]
    total = a.sum()
    return 1.0 if total == 0 else float(_top2_sum(_groups(a)).sum() / total)


def _top2_sum(groups: np.ndarray) -> np.ndarray:
    """Sum of the 2 largest of each last-axis quadruple (magnitudes)."""
    s = np.sort(groups, axis=-1)
    return s[..., 2] + s[..., 3]


@dataclass(frozen=True)
class Compressed:
    values: np.ndarray  # [N, K/2], the weight's dtype
    meta: np.ndarray  # [N, ceil(K/8)] uint8
    k: int  # the dense reduction length

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes


def compress(w: np.ndarray) -> Compressed:
    """The 2:4 compressed form of ``W[N, K]`` (weights outside the mask are dropped)."""
    w = np.asarray(w)
    pos = _kept_positions(w)  # [N, G, 2]
    n, g, _ = pos.shape
    values = np.take_along_axis(_groups(w), pos, axis=-1).reshape(n, 2 * g)
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint8)  # [N, G]
    if g % 2:
        nibble = np.concatenate([nibble, np.full((n, 1), 0b0100, np.uint8)], axis=1)  # i0=0, i1=1
    meta = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).astype(np.uint8)
    return Compressed(np.ascontiguousarray(values), np.ascontiguousarray(meta), w.shape[1])


def positions(meta: np.ndarray, k: int) -> np.ndarray:
    """``[N, K/4, 2]`` kept positions decoded from ``meta``."""
    g = k // GROUP
    nib = np.stack([meta & 0xF, meta >> 4], axis=-1).reshape(meta.shape[0], -1)[:, :g]
    return np.stack([nib & 3, (nib >> 2) & 3], axis=-1).astype(np.int64)


def decompress(c: Compressed) -> np.ndarray:
    """Dense ``W[N, K]`` with zeros where 2:4 dropped weights."""
    n = c.values.shape[0]
    g = c.k // GROUP
    dense = np.zeros((n, g, GROUP), dtype=c.values.dtype)
    np.put_along_axis(dense, positions(c.meta, c.k), c.values.reshape(n, g, KEEP), axis=-1)
    return dense.reshape(n, c.k)


def embed_positions(c: Compressed) -> np.ndarray:
    """float32 ``[N, K/2]``: each kept value with its position in its group (``0..3``) in its
    two lowest mantissa bits.

    The value becomes the nearest float32 whose low bits are the position: at most 2 units in
    the last place away (relative change <= 2**-22 for normal numbers, below float32 summation
    noise; 3 units next to the largest finite float32, whose other neighbour is inf; a
    subnormal moves by at most 3e-45). A zero keeps bits 0 (+0.0: its position does not
    matter). ValueError for a non-finite weight (no such neighbour).
    """
    values = np.asarray(c.values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError("2:4 position embedding needs finite weights")
    n = values.shape[0]
    pos = positions(c.meta, c.k).reshape(n, -1).astype(np.int64)  # [N, K/2], matches values
    bits = values.view(np.uint32).astype(np.int64)
    base = (bits & ~3) | pos
    cands = np.stack([base - 4, base, base + 4])  # the neighbours with those low bits
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = np.clip(cands, 0, 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        usable = (cands >= 0) & (cands <= 0xFFFFFFFF) & np.isfinite(as_float) & (np.signbit(as_float) == np.signbit(values))
    dist = np.where(usable, np.abs(cands - bits), np.iinfo(np.int64).max)
    chosen = np.take_along_axis(cands, dist.argmin(axis=0)[None], axis=0)[0].astype(np.uint32)
    chosen = np.where(values == 0, np.uint32(0), chosen)
    return np.ascontiguousarray(chosen.view(np.float32))


def permutation_search(w: np.ndarray, rounds: int = 2, seed: int = 0, max_work: float = 2e8) -> np.ndarray:
    """A permutation ``perm`` of ``K`` such that 2:4 on ``W[:, perm]`` keeps more magnitude
    (the kernel then reads ``x[:, perm]``): a greedy channel-swap search as in NVIDIA's ASP.

    Each step takes two groups and tries all 16 swaps of one column of the first with one of
    the second, keeping the best if it raises the kept magnitude. ``rounds`` sweeps over
    random group pairs (``K/4`` pairs per sweep); ``max_work`` bounds the element operations
    (large layers get fewer steps). Deterministic for a seed; never worse than the identity.
    """
    a = np.abs(np.asarray(w, dtype=np.float32))
    n, k = a.shape
    _groups(a)
    g = k // GROUP
    perm = np.arange(k)
    if g < 2:
        return perm
    rng = np.random.default_rng(seed)
    steps = int(min(rounds * g, max_work / (16 * 8 * n)))
    cols = a.T.copy()  # [K, N]: column k of W at row perm position
    ii, jj = np.meshgrid(np.arange(GROUP), np.arange(GROUP), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()  # the 16 swaps
    for _ in range(steps):
        ga, gb = rng.choice(g, size=2, replace=False)
        qa = cols[GROUP * ga : GROUP * ga + GROUP]  # [4, N]
        qb = cols[GROUP * gb : GROUP * gb + GROUP]
        base = _top2_sum(qa.T).sum() + _top2_sum(qb.T).sum()
        cand_a = np.repeat(qa[None], 16, axis=0)  # [16, 4, N]
        cand_b = np.repeat(qb[None], 16, axis=0)
        idx = np.arange(16)
        cand_a[idx, ii], cand_b[idx, jj] = qb[jj], qa[ii]
        gain = _top2_sum(cand_a.transpose(0, 2, 1)).sum(-1) + _top2_sum(cand_b.transpose(0, 2, 1)).sum(-1) - base
        best = int(np.argmax(gain))
        if gain[best] <= 1e-6 * max(base, 1e-30):
            continue
        i, j = GROUP * ga + ii[best], GROUP * gb + jj[best]
        cols[[i, j]] = cols[[j, i]]
        perm[[i, j]] = perm[[j, i]]
    return perm
