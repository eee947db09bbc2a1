"""Pruning math in plain numpy, tested without any IR: filter norms, ThiNet-style greedy
channel selection and least-squares refit, hardware-rounded widths and the distribution of a
global parameter budget over groups by sensitivity."""

from __future__ import annotations

import numpy as np

__all__ = [
    "allowed_widths",
    "distribute",
    "filter_norms",
    "im2col",
    "lstsq_refit",
    "nearest_width",
    "thinet_order",
]


def filter_norms(weight: np.ndarray, out_axis: int, p: int) -> np.ndarray:
    """L1 (``p=1``) or L2 (``p=2``) norm of each output filter of ``weight`` (float64)."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), out_axis, 0).reshape(weight.shape[out_axis], -1)
    return np.abs(w).sum(axis=1) if p == 1 else np.sqrt((w * w).sum(axis=1))


def thinet_order(gram: np.ndarray, n_remove: int) -> list[int]:
    """Greedy ThiNet selection: channels in the order they are removed.

    ``gram[c, d] = <Z_c, Z_d>`` where ``Z_c`` is channel ``c``'s contribution to the next
    layer's output on calibration data. Removing a set ``R`` changes the output by
    ``sum_{c in R} Z_c``, whose squared norm is ``sum(gram[R][:, R])``; each step removes the
    channel that keeps this smallest.

    Returns
    -------
    list of int
        ``n_remove`` channel indices, first removed first.
    """
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    if gram.shape != (n, n) or not 0 <= n_remove <= n:
        raise ValueError(f"gram must be square and 0 <= n_remove <= {n}")
    removed: list[int] = []
    cross = np.zeros(n)  # sum_{r in R} gram[r, c]
    diag = np.diag(gram).copy()
    free = np.ones(n, dtype=bool)
    for _ in range(n_remove):
        cost = np.where(free, 2 * cross + diag, np.inf)
        c = int(np.argmin(cost))
        removed.append(c)
        free[c] = False
        cross += gram[c]
    return removed


def im2col(x: np.ndarray, kernel, strides, padding, dilation, positions=None) -> np.ndarray:
    """Conv input patches: ``[M, C, kh*kw]`` for NCHW ``x`` (``positions``: flat indices of
    the output positions ``n*OH*OW + i*OW + j`` to keep, default all)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    pt, pl, pb, pr = padding
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if positions is None:
        positions = np.arange(n * oh * ow)
    b, rem = np.divmod(positions, oh * ow)
    i, j = np.divmod(rem, ow)
    cols = np.empty((len(positions), c, kh * kw), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            cols[:, :, u * kw + v] = xp[b, :, i * sh + u * dh, j * sw + v * dw]
    return cols


def lstsq_refit(a: np.ndarray, y: np.ndarray, ridge: float = 1e-4) -> np.ndarray:
    """``argmin_W ||a @ W - y||^2 + lam ||W||^2`` with ``lam = ridge * mean(diag(a'a))``."""
    a = np.asarray(a, dtype=np.float64)
    gram = a.T @ a
    lam = ridge * float(np.mean(np.diag(gram))) if gram.size else 0.0
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a.T @ np.asarray(y, dtype=np.float64))


def allowed_widths(n: int, multiple: int) -> list[int]:
    """Widths a group of ``n`` channels may keep: ``n`` itself and every smaller positive
    multiple of ``multiple``, widest first."""
    if multiple < 1:
        raise ValueError("multiple must be >= 1")
    return [n] + [w for w in range((n - 1) // multiple * multiple, 0, -multiple)]


def nearest_width(n: int, ratio: float, multiple: int) -> int:
    """The allowed width nearest to ``n * (1 - ratio)`` (ties keep more channels)."""
    want = n * (1.0 - ratio)
    return min(allowed_widths(n, multiple), key=lambda w: (abs(w - want), -w))


def distribute(widths: list[list[int]], params, target: float, cost=None, min_keep: list[int] | None = None) -> list[int]:
    """Choose one width per group so that ``params(widths) <= target``, greedily.

    Parameters
    ----------
    widths : per group, the allowed widths widest first (``allowed_widths``); a group with a
        single entry is fixed.
    params : callable mapping a list of widths to a parameter count.
    target : the parameter count to reach.
    cost : ``cost(g, width)``: the output error of group ``g`` at ``width`` alone (sensitivity);
        None: keep the groups' removed fractions as even as possible.
    min_keep : per group, the narrowest width allowed.

    Returns
    -------
    list of int
        The widths; ``params(result)`` may stay above ``target`` when every group is at its
        narrowest allowed width.
    """
    pos = [0] * len(widths)
    current = [w[0] for w in widths]
    floor = min_keep or [1] * len(widths)
    while params(current) > target:
        best, best_key = None, None
        base = params(current)
        for g, ws in enumerate(widths):
            if pos[g] + 1 >= len(ws) or ws[pos[g] + 1] < floor[g]:
                continue
            trial = current.copy()
            trial[g] = ws[pos[g] + 1]
            saved = base - params(trial)
            if saved <= 0:
                continue
            if cost is None:
                key = 1.0 - trial[g] / ws[0]  # the removed fraction after the step
            else:
                key = max(cost(g, trial[g]) - cost(g, current[g]), 0.0) / saved
            if best_key is None or key < best_key:
                best, best_key = g, key
        if best is None:
            break
        pos[best] += 1
        current[best] = widths[best][pos[best]]
    return current
