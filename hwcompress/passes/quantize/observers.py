"""Range observers and quantization parameters for INT8 calibration, in plain numpy.

Observers see activation batches one at a time (``observe``) and keep a summary of fixed size
(a running min/max, or a 2048-bin histogram of ``|x|``), so calibrating on any number of
samples takes constant memory and one pass. ``range()`` gives the clipping range
``(lo, hi)``; ``symmetric_qparams`` / ``asymmetric_qparams`` turn it into a scale and zero
point, ``weight_qparams`` gives per-output-channel weight scales.

The histogram observers work on ``|x|`` (one threshold ``t`` for both signs, as TensorRT does
for symmetric int8) and report ``(max(min_x, -t), min(max_x, t))``: clipping never widens the
observed range, so a ReLU output keeps ``lo = 0`` and an asymmetric uint8 zero point of 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "EntropyObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "asymmetric_qparams",
    "dequantize",
    "histogram_percentile",
    "kl_threshold",
    "quantize",
    "sqnr_db",
    "symmetric_qparams",
    "weight_qparams",
]

NUM_BINS = 2048  # histogram bins of |x|; a power of two so that doubling the range merges bins exactly
INT8_LEVELS = 128  # levels of |x| in symmetric int8 (0..127): the bins TensorRT's search quantizes into
KL_EPS = 1e-4  # probability given to Q's empty bins where P has mass (TVM / MXNet smoothing)
KL_SMOOTHING = 33  # candidates the divergence curve is median-filtered over before its minimum is taken
# Smallest normal float32: the scale of an all-zero range, positive so that 1/scale stays finite
# in float32 while a genuinely tiny range keeps its resolution.
MIN_SCALE = float(np.finfo(np.float32).tiny)
_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


# ---------------------------------------------------------------------------- qparams


@dataclass(frozen=True)
class QParams:
    """How a float tensor maps to integers: ``q = clip(round(x / scale) + zero_point)``.

    ``axis`` is None for one scale per tensor (``scale`` a float, ``zero_point`` an int), or the
    channel axis for per-channel scales (``scale`` float32 and ``zero_point`` int32 arrays, one
    entry per channel). Scales are float32 values, what the quantized module will carry.
    """

    scale: np.ndarray | float
    zero_point: np.ndarray | int
    dtype: Literal["int8", "uint8"]
    axis: int | None = None

    def __post_init__(self):
        if self.dtype not in _QRANGE:
            raise ValueError(f"QParams.dtype must be 'int8' or 'uint8', got {self.dtype!r}")
        if (self.axis is None) != (np.ndim(self.scale) == 0):
            raise ValueError(f"QParams: axis {self.axis} with a scale of shape {np.shape(self.scale)}")
        if np.shape(self.zero_point) != np.shape(self.scale):
            raise ValueError(f"QParams: zero_point shape {np.shape(self.zero_point)} differs from scale shape {np.shape(self.scale)}")
        if not np.all(np.asarray(self.scale) > 0):
            raise ValueError(f"QParams.scale must be positive, got {self.scale!r}")
        qmin, qmax = self.qrange
        if not np.all((np.asarray(self.zero_point) >= qmin) & (np.asarray(self.zero_point) <= qmax)):
            raise ValueError(f"QParams.zero_point must lie in [{qmin}, {qmax}] for {self.dtype}, got {self.zero_point!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        """Smallest and largest integer of ``dtype``."""
        return _QRANGE[self.dtype]


def symmetric_qparams(lo: float, hi: float) -> QParams:
    """Per-tensor int8 with zero point 0 and ``scale = max(|lo|, |hi|) / 127``: the choice for
    activations and weights that int8 dot-product instructions (VNNI, SDOT, DP4A) multiply
    directly, where a zero point would cost an extra correction term."""
    amax = max(abs(float(lo)), abs(float(hi)))
    return QParams(_scale(amax / 127), 0, "int8")


def asymmetric_qparams(lo: float, hi: float) -> QParams:
    """Per-tensor uint8 over ``[lo, hi]`` widened to include 0, so that 0 (padding, ReLU's
    floor) is represented exactly; the zero point is an integer in ``[0, 255]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = _scale((hi - lo) / 255)
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(scale, zero_point, "uint8")


def weight_qparams(weight: np.ndarray, axis: int = 0, qmax: int = 127) -> QParams:
    """Symmetric int8 scales per output channel (``axis``) of a weight array: channels differ in
    magnitude by orders after BN folding, and one scale per tensor would flatten the small ones
    to zero. Each channel's largest ``|w|`` maps to ``qmax`` (63: 7-bit weights, which AVX2's
    ``vpmaddubsw`` multiplies without saturating). An all-zero channel gets ``MIN_SCALE``,
    never 0."""
    if isinstance(qmax, bool) or not isinstance(qmax, (int, np.integer)) or not 1 <= qmax <= 127:
        raise ValueError(f"weight_qparams: qmax must be an int in [1, 127], got {qmax!r}")
    w = np.asarray(weight)
    axis = axis % w.ndim
    others = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=others) if others else np.abs(w)
    scale = np.maximum(amax.astype(np.float64) / int(qmax), MIN_SCALE).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int32), "int8", axis)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """``x`` as integers of ``qp.dtype``: divide, round half to even, shift, saturate."""
    x = np.asarray(x)
    scale, zero_point = _broadcast(qp, x.ndim)
    qmin, qmax = qp.qrange
    return np.clip(np.round(x / scale) + zero_point, qmin, qmax).astype(qp.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """The float32 values the integers ``q`` stand for."""
    q = np.asarray(q)
    scale, zero_point = _broadcast(qp, q.ndim)
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


def sqnr_db(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - q)^2))`` in dB:
    +inf when the two are equal, -inf when the reference is all zero and they are not."""
    ref = np.asarray(reference, np.float64)
    out = np.asarray(quantized, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"sqnr_db: shapes differ, {ref.shape} and {out.shape}")
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _scale(value: float) -> float:
    return float(np.float32(max(value, MIN_SCALE)))


def _broadcast(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point shaped to broadcast along ``qp.axis`` of an ``ndim``-d array."""
    scale, zero_point = np.asarray(qp.scale, np.float64), np.asarray(qp.zero_point, np.float64)
    if qp.axis is None:
        return scale, zero_point
    shape = [1] * ndim
    shape[qp.axis % ndim] = scale.size
    return scale.reshape(shape), zero_point.reshape(shape)


# ---------------------------------------------------------------------------- histogram math


def histogram_percentile(counts: np.ndarray, edge: float, percentile: float) -> float:
    """The ``percentile`` of values histogrammed in equal bins over ``[0, edge)``, interpolated
    linearly inside the bin where the cumulative count reaches it (exact to one bin width)."""
    counts = np.asarray(counts, np.float64)
    cdf = np.cumsum(counts)
    target = percentile / 100 * cdf[-1]
    j = min(int(np.searchsorted(cdf, target)), len(counts) - 1)
    before = cdf[j] - counts[j]
    frac = (target - before) / counts[j] if counts[j] else 1.0
    return float((j + frac) * edge / len(counts))


def kl_threshold(counts: np.ndarray, edge: float, levels: int = INT8_LEVELS) -> float:
    """TensorRT's entropy calibration: the clipping threshold of a histogram of ``|x|`` (equal
    bins over ``[0, edge)``) that loses the least information when quantized to ``levels``.

    For every candidate ``i`` from ``levels`` bins up to the last non-empty bin, the reference
    P is the first ``i`` bins with the clipped outliers added to bin ``i - 1``; Q merges those
    ``i`` bins (without the outliers) into ``levels`` groups and spreads each group's count
    evenly over its non-empty bins. The threshold is the upper edge of the ``i`` bins with the
    least KL(P || Q) after a running median over ``KL_SMOOTHING`` candidates (the widest on
    ties; see ``_running_median``). Q's empty bins where P has mass get ``KL_EPS`` as
    TVM and MXNet do, so folding a few outliers into an empty bin costs a finite amount instead
    of ruling the candidate out. Candidates past the last non-empty bin would only clip
    nothing at a coarser resolution, so none is tried.
    """
    counts = np.asarray(counts, np.float64)
    width = edge / len(counts)
    extent = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    if extent <= levels:
        return float(extent * width)
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i]: count in bins i and above
    candidates = np.arange(levels, extent + 1)
    kl = np.array([_kl_candidate(counts[:i], tail[i] if i < len(counts) else 0.0, levels) for i in candidates])
    smooth = _running_median(kl, KL_SMOOTHING)
    best = np.flatnonzero(smooth <= smooth.min())[-1]  # the widest on ties
    return float(candidates[best] * width)


def _running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median over ``window`` neighbours (edges repeated). The divergence of one candidate
    depends on how the histogram's spikes fall into the ``levels`` groups: on images with a
    plain background (a few values repeated millions of times) single candidates drop far below
    their neighbours, and the raw minimum clipped the Fashion classifier's first ReLU output at
    a third of where the smoothed curve has its minimum (-9.6 points top-1)."""
    if len(values) <= 2 or window <= 1:
        return values
    window = min(window, len(values) - (len(values) + 1) % 2)
    half = window // 2
    padded = np.pad(values, (half, half), mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def _kl_candidate(bins: np.ndarray, outliers: float, levels: int) -> float:
    """KL(P || Q) of one candidate of ``kl_threshold``: ``bins`` the first ``i`` bins."""
    i = len(bins)
    p = bins.copy()
    p[-1] += outliers
    group = np.arange(i) * levels // i
    nonzero = bins > 0
    sums = np.bincount(group, weights=bins, minlength=levels)
    filled = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, sums[group] / np.maximum(filled[group], 1), 0.0)
    p /= p.sum()
    q /= q.sum()
    mass = p > 0
    q = np.where(mass & (q == 0), KL_EPS, q)
    q /= q.sum()
    return float(np.sum(p[mass] * np.log(p[mass] / q[mass])))


# ---------------------------------------------------------------------------- observers


class Observer(Protocol):
    """Sees activation batches one at a time and reports a clipping range."""

    def observe(self, x: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


class MinMaxObserver:
    """Running minimum and maximum: no clipping, every observed value stays representable."""

    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf

    def observe(self, x: np.ndarray) -> None:
        x = _finite(x)
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("MinMaxObserver: no values observed")
        return self.lo, self.hi


class AbsHistogram:
    """Counts of ``|x|`` in ``NUM_BINS`` equal half-open bins over ``[0, edge)``. The first values
    set the edge just above their maximum; larger ones later multiply it by a power of two (or,
    far larger, set it anew), so old bins merge exactly into new ones and no raw value is kept.
    ``zeros`` counts exact zeros (also in bin 0), which quantize exactly under any scale.

    Given ``amax`` (the largest ``|x|``, from a first pass over the data) the edge is fixed just
    above it: every bin is in use. A grown histogram may span up to twice the largest value,
    with half its bins empty; the entropy search, which starts at ``INT8_LEVELS`` bins, then
    cannot try thresholds below an eighth of the range at full resolution, and on the Fashion
    classifier it clipped ReLU outputs at 13% of their range (-9.6 points top-1)."""

    def __init__(self, amax: float | None = None):
        self.counts = np.zeros(NUM_BINS, np.int64)
        self.edge = 0.0
        self.zeros = 0
        self.fixed = amax is not None and amax > 0
        if self.fixed:  # the range is known (a first pass): all NUM_BINS bins span [0, amax]
            self.edge = float(amax) * (1 + 1 / NUM_BINS)

    def add(self, x: np.ndarray) -> None:
        a = np.abs(_finite(x).astype(np.float64)).ravel()
        if not a.size:
            return
        amax = float(a.max())
        if amax >= self.edge and not self.fixed:
            self._grow(amax)
        if self.edge > 0:
            index = np.minimum((a * (NUM_BINS / self.edge)).astype(np.int64), NUM_BINS - 1)
            self.counts += np.bincount(index, minlength=NUM_BINS)
        else:
            self.counts[0] += a.size
        self.zeros += a.size - int(np.count_nonzero(a))

    def _grow(self, amax: float) -> None:
        # The edge stays strictly above every value: a value on it would be clipped into the
        # last bin, and after doubling belong to the first bin of the upper half instead.
        above = amax * (1 + 1 / NUM_BINS)
        if self.edge == 0:  # only zeros so far: they stay in bin 0
            self.edge = above
            return
        ratio = amax / self.edge
        if not math.isfinite(ratio) or ratio > NUM_BINS:
            # the whole old range fits in the first new bin
            self.counts[0], self.counts[1:] = self.counts.sum(), 0
            self.edge = above
            return
        factor = 1 << math.ceil(math.log2(ratio))
        while self.edge * factor <= amax:
            factor *= 2
        merged = np.zeros_like(self.counts)
        merged[: NUM_BINS // factor] = self.counts.reshape(-1, factor).sum(axis=1)
        self.counts = merged
        self.edge *= factor


class _HistogramObserver:
    """Histogram of ``|x|`` plus the signed min/max that clip the threshold to observed values."""

    def __init__(self, amax: float | None = None):
        self.hist = AbsHistogram(amax)
        self.minmax = MinMaxObserver()

    def observe(self, x: np.ndarray) -> None:
        self.hist.add(x)
        self.minmax.observe(x)

    def range(self) -> tuple[float, float]:
        lo, hi = self.minmax.range()
        t = self._threshold()
        return max(lo, -t), min(hi, t)

    def _threshold(self) -> float:
        raise NotImplementedError


class PercentileObserver(_HistogramObserver):
    """Clips ``|x|`` at a percentile (99.99 by default): ignores the rare extreme activations
    that would otherwise stretch the scale for all the others."""

    def __init__(self, percentile: float = 99.99, amax: float | None = None):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"PercentileObserver.percentile must be in (0, 100], got {percentile!r}")
        super().__init__(amax)
        self.percentile = float(percentile)

    def _threshold(self) -> float:
        return histogram_percentile(self.hist.counts, self.hist.edge, self.percentile)


class EntropyObserver(_HistogramObserver):
    """Clips ``|x|`` where int8 quantization loses the least information (``kl_threshold``,
    TensorRT's entropy calibration). Exact zeros (ReLU's) are left out of the search: they cost
    nothing at any scale, and their spike in bin 0 would otherwise dominate the divergence."""

    def _threshold(self) -> float:
        counts = self.hist.counts.copy()
        counts[0] -= self.hist.zeros
        return kl_threshold(counts, self.hist.edge)


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError("observed values include inf or NaN")
    return x
