"""Data-free quantization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"): float-graph transforms of ``main`` that run before INT8
quantization, which then quantizes the equalized weights per output channel.

* ``equalize``: cross-layer equalization of consecutive pairs ``conv/matmul -> act ->
  conv/matmul`` whose intermediate channels feed nothing else. Channel ``i`` of layer 1 is
  divided by ``s_i = sqrt(r1_i / r2_i)`` and layer 2's input channel ``i`` multiplied by it
  (``r1``: range of layer 1's output channel, ``r2``: of layer 2's input channel), so both
  ranges become ``sqrt(r1_i r2_i)``. Between the two may lie ReLU / LeakyReLU (positively
  homogeneous), max / average / global pooling and channel-keeping reshapes (the flatten
  before a classifier too). ReLU6 / clip is not homogeneous; with ``rescale_clip`` its bounds are divided by
  ``s_i`` as well (``clip(x, lo, hi)`` becomes ``minimum(maximum(x, lo/s), hi/s)`` with
  per-channel constants), without it such pairs are skipped. Depthwise (and grouped) convs
  take part as either layer, so ``conv -> dw -> conv`` equalizes as two pairs, iterated until
  the scales settle. Residual adds, concats and every other op end a chain: not equalized.
* ``bias_correct``: the int8 weight error ``eps = dequant(quant(W)) - W`` (per output
  channel, as ``int8`` quantizes) shifts each output channel by ``eps . E[x]`` on average;
  it is subtracted from the bias of every ``conv2d`` (one group) and ``matmul`` (the layers
  ``int8`` quantizes). ``E[x]`` is measured on calibration data when given (the float module
  runs on this host), else derived from BatchNorm statistics.

Data-free ``E[x]`` needs the BN statistics, which folding erases: a BN output is taken as
Gaussian with per-channel mean ``beta`` and std ``|gamma|``, and a layer whose input is
``clip(y, lo, hi)`` (ReLU, ReLU6) of such an output, possibly average-pooled or flattened,
gets the clipped-normal mean. hwcompress's frontend folds BN in ONNX Runtime by default
(``prepare_onnx(fold_bn=True)``), so data-free bias correction works only on modules imported
with ``fold_bn=False`` (``hwc build --no-fold-bn``): ``apply_dfq`` reads the statistics with
``bn_statistics``, folds the BNs itself (``fold_bn``; the BN output variables keep their
names, the key of the statistics) and carries them through equalization. Layers without
statistics (the first layer, inputs after max-pooling or a residual add, or everything when
BN was folded on import) are reported and left uncorrected; calibration data covers them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .dfq_graph import _Graph, _op, _rewrite, _shape, clipped_normal_mean
from .observers import QParams, dequantize, quantize, weight_qparams

__all__ = [
    "BiasReport",
    "DataFree",
    "DfqReport",
    "EqualizeReport",
    "apply_dfq",
    "bias_correct",
    "bn_statistics",
    "clipped_normal_mean",
    "equalization_scales",
    "equalize",
    "expected_output_error",
    "weight_quant_error",
]

log = logging.getLogger("hwcompress")

CONVERGED = 1e-4  # equalization stops once every scale is within this of 1 (|log s|)
MAX_SAMPLES = 256  # calibration samples bias correction averages over (the first ones)


@dataclass(frozen=True)
class DataFree:
    """Data-free quantization steps run before INT8 quantization (``apply_dfq``).

    Parameters
    ----------
    equalize : bool
        Cross-layer equalization of consecutive conv / matmul pairs.
    bias_correction : bool
        Subtract the expected int8 weight error from the biases.
    iterations : int
        At most this many sweeps over the pairs (they converge in one for isolated pairs).
    rescale_clip : bool
        Equalize across ReLU6 / clip by scaling its bounds per channel (the graph then holds
        ``minimum`` / ``maximum`` with per-channel constants); False: skip such pairs.
    """

    equalize: bool = True
    bias_correction: bool = True
    iterations: int = 16
    rescale_clip: bool = True

    def __post_init__(self):
        for name in ("equalize", "bias_correction", "rescale_clip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DataFree.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"DataFree.iterations must be a positive int, got {self.iterations!r}")


@dataclass(frozen=True)
class EqualizeReport:
    """Per equalized pair ``{layer1, layer2, via, out_ratio, in_ratio}``: ``via`` the ops in
    between, ratios ``(before, after)`` of the smallest to the largest per-channel weight range
    (layer 1's output channels, layer 2's input channels; 1 is uniform). ``skipped``: chains
    not equalized, with the reason. ``stats``: BN statistics rescaled with the weights."""

    pairs: tuple = ()
    skipped: tuple = ()
    iterations: int = 0
    converged: bool = True
    stats: dict = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"pairs": list(self.pairs), "skipped": list(self.skipped), "iterations": self.iterations, "converged": self.converged}


@dataclass(frozen=True)
class BiasReport:
    """``corrected``: ``{name, source, max_shift}`` per corrected layer (``source``: ``data``
    or ``bn``); ``skipped``: ``{name, reason}``."""

    corrected: tuple = ()
    skipped: tuple = ()

    def as_dict(self) -> dict:
        return {"corrected": list(self.corrected), "skipped": list(self.skipped)}


@dataclass(frozen=True)
class DfqReport:
    equalize: EqualizeReport | None = None
    bias_correction: BiasReport | None = None

    def as_dict(self) -> dict:
        return {k: None if v is None else v.as_dict() for k, v in (("equalize", self.equalize), ("bias_correction", self.bias_correction))}


# ---------------------------------------------------------------------------- math (numpy)


def channel_ranges(weight: np.ndarray, axis: int = 0) -> np.ndarray:
    """``max |w|`` per index of ``axis``: the symmetric quantization range of each channel."""
    w = np.abs(np.asarray(weight, np.float64))
    return w.max(axis=tuple(a for a in range(w.ndim) if a != axis % w.ndim)) if w.ndim > 1 else w


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i r2_i) / r2_i``: dividing layer 1's channel by it and multiplying layer
    2's by it gives both the range ``sqrt(r1_i r2_i)``. Channels with a zero range keep 1."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    return np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)


def weight_quant_error(weight: np.ndarray, axis: int = 0, per_channel: bool = True, qmax: int = 127) -> np.ndarray:
    """``dequant(quant(W)) - W`` for symmetric int8 in ``[-qmax, qmax]``, one scale per
    ``axis`` index (``int8``'s weight scheme) or one per tensor; float64."""
    w = np.asarray(weight, np.float32)
    qp = weight_qparams(w, axis, qmax)
    if not per_channel:
        scale = weight_qparams(w.reshape(1, -1), 0, qmax).scale[0]
        qp = QParams(np.full(w.shape[axis], scale, np.float32), qp.zero_point, "int8", axis % w.ndim)
    return dequantize(quantize(w, qp), qp).astype(np.float64) - w


def expected_output_error(eps: np.ndarray, mean_in: np.ndarray, groups: int = 1) -> np.ndarray:
    """``E[eps * x]`` per output channel: ``eps`` is a weight error ``[O, I / groups, *kernel]``
    (``[N, K]`` for a matmul), ``mean_in`` the input's mean per channel ``[I]``; padding is
    ignored (every tap sees the mean)."""
    eps = np.asarray(eps, np.float64)
    o, ipg = eps.shape[:2]
    m = np.asarray(mean_in, np.float64).reshape(groups, ipg)[np.arange(o) // (o // groups)]
    return (eps.reshape(o, ipg, -1).sum(-1) * m).sum(1)


def _ratio(r: np.ndarray) -> float:
    return float(r.min() / r.max()) if r.size and r.max() > 0 else 1.0


# ---------------------------------------------------------------------------- verbs


def bn_statistics(mod) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per-channel ``(mean, std, axis)`` of every inference ``batch_norm`` output in ``main``:
    ``(beta, |gamma|)``, the distribution BN normalizes to. Keyed by the name of the variable
    holding the output, which ``fold_bn`` keeps; read it before folding."""
    from tvm import relax

    g = _Graph(mod["main"])
    stats = {}
    for var in g.order:
        item = g.var2val[var]
        if not isinstance(item, relax.TupleGetItem) or item.index != 0:
            continue
        bn = g.var2val.get(item.tuple_value)
        shape = _shape(var)
        if _op(bn) != "relax.nn.batch_norm" or bool(bn.attrs.training) or shape is None:
            continue
        gamma, beta = g.const(bn.args[1]), g.const(bn.args[2])
        axis = int(bn.attrs.axis) % len(shape)
        n = shape[axis]
        if gamma is None or beta is None:
            continue
        mean = beta.reshape(-1).astype(np.float64) if bool(bn.attrs.center) else np.zeros(n)
        std = np.abs(gamma.reshape(-1).astype(np.float64)) if bool(bn.attrs.scale) else np.ones(n)
        stats[var.name] = (mean, std, axis)
    return stats


def equalize(mod, iterations: int = 16, rescale_clip: bool = True, stats: dict | None = None):
    """Cross-layer equalization of ``main`` (BN folded).

    Parameters
    ----------
    mod : tvm.IRModule
    iterations : int
        At most this many sweeps over all pairs; stops earlier once every scale is 1.
    rescale_clip : bool
        Equalize across ReLU6 / clip by scaling the bounds too; False: skip those pairs.
    stats : dict, optional
        ``bn_statistics`` of the unfolded module; returned rescaled in the report.

    Returns
    -------
    (tvm.IRModule, EqualizeReport)
        The float function is unchanged up to rounding.
    """
    g = _Graph(mod["main"])
    layers = {layer.var: layer for layer in g.layers}
    pairs, skipped = [], []
    for l1 in g.layers:
        pair, reason = g.chain(l1, layers, rescale_clip)
        if pair is None:
            skipped.append({"layer": l1.name, "reason": reason})
        else:
            pairs.append(pair)
    before = [(_ratio(channel_ranges(p.l1.weight)), _ratio(p.r2())) for p in pairs]
    stats = dict(stats or {})
    sweeps, worst = 0, 0.0
    for sweeps in range(1, iterations + 1) if pairs else ():
        worst = 0.0
        for p in pairs:
            s = equalization_scales(channel_ranges(p.l1.weight), p.r2())
            p.apply(s, stats)
            worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
        if worst < CONVERGED:
            break
    rows = [
        {"layer1": p.l1.name, "layer2": p.l2.name, "via": list(p.via), "rescaled_bounds": len(p.bounds),
         "out_ratio": [b[0], _ratio(channel_ranges(p.l1.weight))], "in_ratio": [b[1], _ratio(p.r2())]}
        for p, b in zip(pairs, before)
    ]  # fmt: skip
    report = EqualizeReport(tuple(rows), tuple(skipped), sweeps, worst < CONVERGED, stats)
    log.info("dfq: equalized %d layer pairs in %d sweeps (%d chains skipped)", len(pairs), sweeps, len(skipped))
    if not pairs:
        return mod, report
    changed = list({id(x): x for p in pairs for x in (p.l1, p.l2)}.values())
    return _rewrite(mod, changed, [b for p in pairs for b in p.bounds]), report


def bias_correct(mod, calib=None, stats: dict | None = None, per_channel: bool = True, max_samples: int = MAX_SAMPLES, qmax: int = 127):
    """Subtract the expected int8 weight error ``eps . E[x]`` from the bias of every
    ``conv2d`` (one group) and ``matmul`` with a constant float weight.

    Parameters
    ----------
    mod : tvm.IRModule
        BN folded, after ``equalize`` (the weights the int8 pass will quantize).
    calib : data or prune_calib.Calibration, optional
        Calibration data (anything ``data.read_batches`` reads): ``E[x]`` is measured by
        running ``mod`` on this host. Without it ``E[x]`` comes from ``stats``.
    stats : dict, optional
        ``bn_statistics`` of the module before BN folding (rescaled by ``equalize``). Data-free
        correction needs them: a module whose BNs were folded on import has none, and then
        no layer is corrected (each is reported as skipped, with the reason).
    per_channel : bool
        The int8 weight scheme to correct for (``Int8Static.per_channel``).
    max_samples : int
        Calibration samples to average over.

    Returns
    -------
    (tvm.IRModule, BiasReport)
    """
    g = _Graph(mod["main"])
    layers = [layer for layer in g.layers if layer.groups == 1 and layer.dtype == "float32"]
    means, skipped = {}, []
    if calib is not None:
        means = _data_means(mod, g, layers, calib, max_samples)
    else:
        for layer in layers:
            mean, reason = g.input_mean(layer, stats or {})
            if mean is None:
                skipped.append({"name": layer.name, "reason": f"no input statistics: {reason}"})
            else:
                means[layer.var] = mean
    corrected = []
    for layer in layers:
        if layer.var not in means:
            continue
        eps = weight_quant_error(layer.weight, 0, per_channel, qmax)
        shift = expected_output_error(eps, means[layer.var], layer.groups)
        layer.bias = (0.0 if layer.bias is None else layer.bias) - shift
        corrected.append({"name": layer.name, "source": "data" if calib is not None else "bn", "max_shift": float(np.abs(shift).max(initial=0.0))})
    log.info("dfq: bias correction of %d layers (%d without input statistics)", len(corrected), len(skipped))
    report = BiasReport(tuple(corrected), tuple(skipped))
    done = {row["name"] for row in corrected}
    fixed = [layer for layer in layers if layer.name in done]
    return (_rewrite(mod, fixed) if fixed else mod), report


def _data_means(mod, g: _Graph, layers, calib, max_samples: int) -> dict:
    """``{layer var: mean of its input per channel}`` over the calibration data."""
    import tvm

    from ...data import read_batches
    from ...errors import DataError
    from ...verify import host_vm
    from ..prune_calib import Calibration
    from ..prune_rewrite import _emit, _rebuild, _with_main

    func = mod["main"]
    data = calib.data if isinstance(calib, Calibration) else calib
    inputs = [(p.name, [int(d) for d in p.ty.shape.values], str(p.ty.dtype)) for p in func.params]
    params = {p: i for i, p in enumerate(func.params)}
    inner = list({layer.call.args[0]: None for layer in layers if layer.call.args[0] not in params})
    vm = host_vm(_with_main(mod, _rebuild(func, lambda bb, var, orig, value: _emit(bb, var, value), extra_outputs=inner))) if inner else None
    sums, count = {}, 0
    for batch in read_batches(data, inputs, max_samples):
        seen = {}
        if vm is not None:
            res = vm["main"](*(tvm.runtime.tensor(x) for x in batch))
            seen = {v: res[len(res) - len(inner) + i].numpy() for i, v in enumerate(inner)}
        seen.update({p: batch[i] for p, i in params.items()})
        for layer in layers:
            x = seen[layer.call.args[0]].astype(np.float64)
            axes = tuple(a for a in range(x.ndim) if a != layer.in_axis)
            sums[layer.var] = sums.get(layer.var, 0.0) + x.sum(axis=axes) / (x.size / x.shape[layer.in_axis])
        count += 1
    if not count:
        raise DataError("bias correction: the calibration data holds no whole batch")
    return {v: s / count for v, s in sums.items()}


def apply_dfq(mod, config: DataFree = DataFree(), calib=None, per_channel: bool = True, qmax: int = 127):
    """Data-free quantization steps of ``config`` on ``main``, before INT8 quantization.

    BN statistics are read first (``bn_statistics``) and the BNs folded (``fold_bn``) when
    ``main`` still has any, then ``equalize``, then ``bias_correct`` (from ``calib`` when
    given, else from the BN statistics).

    Returns
    -------
    (tvm.IRModule, DfqReport)
    """
    from ..fold_bn import fold_bn

    stats = bn_statistics(mod)
    if stats:
        mod = fold_bn(mod)
    eq = bc = None
    if config.equalize:
        mod, eq = equalize(mod, config.iterations, config.rescale_clip, stats)
        stats = eq.stats
    if config.bias_correction:
        mod, bc = bias_correct(mod, calib=calib, stats=stats, per_channel=per_channel, qmax=qmax)
    return mod, DfqReport(eq, bc)
