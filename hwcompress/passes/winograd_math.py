"""Winograd F(m x m, 3 x 3) math in pure numpy: the Cook–Toom transform matrices, the weight
transform done at compile time, and the choice of output tile per layer. No IR here.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

# Interpolation points per tile size m (plus the point at infinity): Barabasz et al.,
# "Error analysis and improving the accuracy of Winograd convolution" (arXiv:1803.10986),
# the same points as TOPI's winograd_util, so the matrices are TOPI's.
_POINTS = {
    2: (0, -1, 1),
    3: (0, -1, 1, Fraction(1, 2)),
    4: (0, -1, 1, Fraction(1, 2), -2),
    5: (0, -1, 1, Fraction(1, 2), -2, Fraction(-1, 2)),
    6: (0, -1, 1, Fraction(1, 2), Fraction(-1, 2), 2, -2),
}


def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cook–Toom transform matrices ``(A, B, G)`` of F(m, r), float64.

    A 1D correlation ``y[i] = sum_k g[k] d[i + k]`` (``i < m``, ``d`` of length
    ``alpha = m + r - 1``) is ``y = A^T ((G g) * (B^T d))``; in 2D,
    ``Y = A^T [(G g G^T) * (B^T d B)] A``. Shapes: ``A (alpha, m)``, ``B (alpha, alpha)``,
    ``G (alpha, r)``; TOPI's convention and scaling.

    Built from the polynomial evaluation matrices ``V_n[i, j] = p_i ** j`` at ``alpha - 1``
    points plus infinity: correlation is the transpose of the linear convolution
    ``s = V_alpha^-1 ((V_r g) * (V_m x))``, so ``A = V_m``, ``G = D^-1 V_r``,
    ``B = V_alpha^-1 D`` with ``D = diag(prod_k (p_i - p_k))`` moving the Lagrange
    denominators from B into G. Exact in rational arithmetic, rounded once to float64.
    """
    if r != 3 or m not in _POINTS:
        raise ValueError(f"F({m},{r}) is not supported: m in {sorted(_POINTS)}, r = 3")
    points = [Fraction(p) for p in _POINTS[m]]
    alpha = m + r - 1

    def vandermonde(n):  # alpha x n; the point at infinity picks the leading coefficient
        rows = [[p**j for j in range(n)] for p in points]
        return rows + [[Fraction(int(j == n - 1)) for j in range(n)]]

    denom = []
    for i, p in enumerate(points):
        d = Fraction(1)
        for k, q in enumerate(points):
            if k != i:
                d *= p - q
        denom.append(d)
    if denom[0] < 0:  # TOPI's sign convention
        denom[0] = -denom[0]
    denom.append(Fraction(1))

    a = vandermonde(m)
    g = [[v / denom[i] for v in row] for i, row in enumerate(vandermonde(r))]
    b = [[v * denom[j] for j, v in enumerate(row)] for row in _inverse(vandermonde(alpha))]
    as_array = lambda rows: np.array([[float(v) for v in row] for row in rows], dtype=np.float64)  # noqa: E731
    A, B, G = as_array(a), as_array(b), as_array(g)
    assert A.shape == (alpha, m) and B.shape == (alpha, alpha) and G.shape == (alpha, r)
    return A, B, G


def _inverse(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact inverse of a small rational matrix (Gauss–Jordan)."""
    n = len(rows)
    aug = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(rows)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        lead = aug[col][col]
        aug[col] = [v / lead for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [v - f * w for v, w in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


def transform_weights(w: np.ndarray, m: int) -> np.ndarray:
    """Winograd-domain weights ``U = G g G^T`` of an OIHW 3x3 weight, in float64 then cast
    back to ``w``'s dtype.

    Returns
    -------
    ndarray
        Shape ``(alpha, alpha, I, O)``: ``U[e, n, i, o] = (G w[o, i] G^T)[e, n]``, the layout
        the kernel's batched GEMM reads (``O`` contiguous).
    """
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[2:] != (3, 3):
        raise ValueError(f"expected an OIHW weight with a 3x3 kernel, got shape {w.shape}")
    _, _, G = winograd_matrices(m, 3)
    u = np.einsum("ek,oikl,nl->enio", G, w.astype(np.float64), G)
    return u.astype(w.dtype)


def choose_tile(out_hw: tuple[int, int], channels: tuple[int, int], spec=None) -> int:
    """The output tile ``m`` for a conv with output size ``out_hw`` and ``(in, out)`` channels.

    F(4,3) does 2.25 instead of 4 multiplications per output and channel pair, but its
    transformed weights are 4x the direct ones (F(2,3): 1.8x) and each is reused once per
    output tile: with few tiles the batched GEMM streams weights rather than computing.

    CPU targets (``spec.kind == "llvm"``, and ``spec=None``): F(4,3) everywhere. Since the
    CPU kernel prefetches weights it reads once (``backends.cpu_prefetch``), F(4,3) measured
    faster than F(2,3) on every layer tried, one core and two (Zen 1, default schedules,
    ``tools/bench_winograd.py layers``): ResNet-18's 56x56 to 14x14 layers as before, and at
    7x7 64 / 128 / 256 / 512 channels 1.74x / 2.10x / 1.86x / 1.92x over the direct conv on
    one core against F(2,3)'s 1.19x / 1.37x / 1.32x / 1.49x. Before the prefetch, 512 channels
    at 7x7 streamed F(4,3)'s 37.7 MB of weights at ~70% of the memory bandwidth and F(2,3)
    won on a 32 MB-L3 machine.

    Other targets (GPUs): F(4,3) from 16 output tiles, F(2,3) below: the rule the CUDA
    Winograd default was measured with (an H100, session 4); not re-measured there.
    """
    if spec is None or spec.kind == "llvm":
        return 4
    h, w = out_hw
    return 4 if -(-h // 4) * -(-w // 4) >= _MIN_F4_TILES else 2


_MIN_F4_TILES = 16
