"""Static INT8 quantization with integer kernels: ``quantize(mod, Int8Static(data=...))``.

Every ``conv2d`` (one group) and ``matmul`` with a constant float32 weight runs on uint8
activations and int8 weights with int32 sums (``int8_graph`` has the rewrite and its math):

* activations: uint8, per tensor, asymmetric (scale and zero point from the range an observer
  saw on calibration data: ``minmax``, ``percentile`` or ``entropy``), so a ReLU output uses
  all 256 levels and a signed input (a normalized image) is still represented;
* weights: int8, symmetric, one scale per output channel (``per_channel=False``: one scale),
  in ``[-127, 127]``; 7-bit ``[-63, 63]`` on ``[hardware].int8 = "avx2"`` (``weight_qmax``),
  which the CPU backend multiplies with ``vpmaddubsw`` at twice ``vpmaddwd``'s rate;
* the int32 accumulator is dequantized with ``s_x * s_w[o]`` and the zero-point correction
  ``zp_x * sum(Wq[o])``; bias, activation and residual adds follow in float32 and fuse into
  the kernel's epilogue together with the next layer's ``quantize``.

On a target whose NPU runs ``add`` (``[npu].supported_ops``, ``npu_adds``) residual adds get
int8 quantization points too: both inputs and the (ReLU'd) output pass through uint8,
calibrated by the same observers (``int8_points.residual_points``), so that the NPU runs the
block's convs and the ADD without a float tensor in between. Host targets keep the float adds
(they fuse into the int8 kernels' epilogues, and every extra rounding would cost accuracy).

Depthwise convs are quantized likewise where the NPU runs ``depthwise_conv2d`` (one input
channel per group: the same per-output-channel scheme); grouped convs, depthwise convs on
other targets, ops whose weight is no constant and every other op stay float;
``int8_report(mod)`` says which, and gives each int8 layer's SQNR against float on the
calibration data (``hwc build --int8`` puts it into the manifest).

Run it after BN folding and after the conv layout step (``optimize.effective_recipe`` orders
it so): on CPU targets the convs are then NHWC / OHWI, the layout of the CPU backend's int8
kernels (``backends/cpu_int8.py``). Data-free quantization is not implemented: calibration
data is required.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...targets import Int8Kind
from .observers import QParams, asymmetric_qparams, weight_qparams
from .observers import quantize as quantize_array

__all__ = ["REPORT_ATTR", "CalibrationMethod", "Int8Static", "int8_report", "plan_layer", "pow2_qparams", "pow2_scale", "quantize"]

log = logging.getLogger("hwcompress")

REPORT_ATTR = "hwc.int8_report"  # IRModule attribute holding the JSON report

# Largest int8 weight per [hardware].int8 kind where it is not 127
_WEIGHT_QMAX = {Int8Kind.AVX2: 63}


class CalibrationMethod(str, enum.Enum):
    """How an activation's clipping range is chosen from the calibration data."""

    MINMAX = "minmax"  # observed min / max: nothing clipped
    PERCENTILE = "percentile"  # |x| clipped at its 99.99th percentile
    ENTROPY = "entropy"  # TensorRT's KL-divergence threshold


@dataclass(frozen=True)
class Int8Static:
    """Static INT8 quantization calibrated on data.

    Parameters
    ----------
    calibration : CalibrationMethod or str
        ``minmax``, ``percentile`` or ``entropy``: how activation ranges are chosen.
    per_channel : bool
        One weight scale per output channel (True) or one per weight tensor.
    data : str, ndarray, list or mapping
        Calibration data, anything ``data.read_batches`` reads: a directory (``.npy`` files of
        samples, ``.npz`` keyed by input name, images), an array, batches, ``{input: samples}``.
        Required to quantize; never written to recipe files or manifests.
    max_samples : int
        Calibrate on at most this many samples (the first ones).
    equalize, bias_correction : bool
        Data-free quantization's weight steps first (``dfq.apply_dfq``: cross-layer
        equalization; the expected int8 weight error taken out of the biases, measured on
        ``data``). Off by default: with per-channel weight scales equalization measured
        slightly worse on the Fashion classifier (BENCHMARKS.md).
    """

    calibration: CalibrationMethod = CalibrationMethod.MINMAX
    per_channel: bool = True
    data: object = field(default=None, compare=False)
    max_samples: int = 256
    equalize: bool = False
    bias_correction: bool = False

    def __post_init__(self):
        from ..prune_calib import Calibration

        for name in ("equalize", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{type(self).__name__}.{name} must be a bool, got {getattr(self, name)!r}")
        try:
            object.__setattr__(self, "calibration", CalibrationMethod(self.calibration))
        except ValueError:
            choices = ", ".join(m.value for m in CalibrationMethod)
            raise ValueError(f"Int8Static.calibration must be one of {choices}, got {self.calibration!r}") from None
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"Int8Static.per_channel must be a bool, got {self.per_channel!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ValueError(f"Int8Static.max_samples must be a positive int, got {self.max_samples!r}")
        if self.data is not None and not isinstance(self.data, Calibration):
            object.__setattr__(self, "data", Calibration(self.data))  # kept out of recipes and manifests


@dataclass(frozen=True)
class Int8DataFree(Int8Static):
    """INT8 quantization without calibration data (Qualcomm's DFQ).

    The weights go through cross-layer equalization and bias correction from BatchNorm
    statistics (``dfq.apply_dfq``; only where the module still holds BN, i.e. imported with
    ``fold_bn=False`` — elsewhere the report lists the layers left uncorrected). Activation
    ranges come from ``samples`` synthetic inputs drawn from a standard normal distribution
    (min/max): the input normalization most image models are trained with. ``data`` must stay
    empty: with data use ``Int8Static(equalize=True, bias_correction=True, data=...)``.
    """

    equalize: bool = True
    bias_correction: bool = True
    samples: int = 64
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.data is not None:
            raise ValueError("Int8DataFree takes no calibration data (use Int8Static(data=...) with equalize / bias_correction)")
        if self.calibration is not CalibrationMethod.MINMAX:
            raise ValueError("Int8DataFree ranges activations by min / max on synthetic inputs; calibration must stay minmax")
        for name, least, what in (("samples", 1, "positive"), ("seed", 0, "non-negative")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Int8DataFree.{name} must be a {what} int, got {value!r}")


def synthetic_inputs(func, samples: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` standard-normal samples of every float input of ``func`` (integer inputs:
    zeros), keyed by input name: the data-free mode's stand-in for calibration data."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in func.params:
        shape, dtype = [int(d) for d in p.ty.shape.values], str(p.ty.dtype)
        full = [samples * shape[0], *shape[1:]]
        out[p.name] = rng.standard_normal(full).astype(dtype) if dtype.startswith("float") else np.zeros(full, dtype)
    return out


def pow2_scale(scale):
    """``scale`` rounded *up* to a power of two (float32): nothing observed gets clipped, at
    the price of up to one bit of resolution."""
    return (2.0 ** np.ceil(np.log2(np.asarray(scale, np.float64)))).astype(np.float32)


def pow2_qparams(qp: QParams) -> QParams:
    """``qp`` with power-of-two scales; an asymmetric zero point is recomputed so that the
    float 0 stays exact and the low end of the range is kept."""
    scale = pow2_scale(qp.scale)
    if qp.dtype == "int8":  # symmetric weights
        return QParams(scale, qp.zero_point, qp.dtype, qp.axis)
    lo = -float(qp.zero_point) * float(qp.scale)
    zero_point = int(np.clip(round(-lo / float(scale)), 0, 255))
    return QParams(float(scale), zero_point, qp.dtype, qp.axis)


def plan_layer(site, input_range: tuple[float, float], per_channel: bool = True, qmax: int = 127, pow2: bool = False):
    """The ``Int8Layer`` of ``site``: uint8 parameters of its input range, int8 weight in
    ``[-qmax, qmax]`` (``weight_qparams``); ``pow2``: every scale a power of two
    (``pow2_qparams``), so that an NPU requantizes with shifts only."""
    from .int8_graph import Int8Layer

    w = site.weight()
    axis = site.weight_out_axis
    if per_channel:
        wqp = weight_qparams(w, axis, qmax)
    else:
        scale = weight_qparams(w.reshape(1, -1), 0, qmax).scale[0]  # one "channel": the whole tensor
        channels = w.shape[axis]
        wqp = QParams(np.full(channels, scale, np.float32), np.zeros(channels, np.int32), "int8", axis)
    act = activation_qparams(input_range, pow2)
    if pow2:
        wqp = pow2_qparams(wqp)
    # a guard on float32 rounding of |w| / s: the AVX2 kernels are exact only within qmax = 63
    weight = np.clip(quantize_array(w, wqp), -qmax, qmax).astype(np.int8)
    return Int8Layer(site, act, weight, np.asarray(wqp.scale, np.float32))


def activation_qparams(value_range: tuple[float, float], pow2: bool = False) -> QParams:
    """uint8 parameters of an activation range (a site's input and a quantization point of
    the same tensor must agree: they share one uint8 tensor)."""
    act = asymmetric_qparams(*value_range)
    return pow2_qparams(act) if pow2 else act


def npu_adds(spec) -> bool:
    """Whether ``spec``'s NPU runs residual adds: then their inputs and output get int8
    quantization points (``int8_points.residual_points``). Host-only targets keep the float
    adds, which fuse into the int8 kernels' epilogues at no cost."""
    return spec is not None and spec.npu is not None and "add" in spec.npu.supported_ops


def weight_qmax(spec) -> int:
    """Largest ``|w|`` of the int8 weights for ``spec`` (None: any target): 63 where the CPU
    multiplies u8 x s8 with AVX2's ``vpmaddubsw``, whose int16 pair sums are exact only for
    7-bit weights (``backends/cpu_intrin.py``), else 127. A target with an NPU: 127 (its layers
    run in the NPU's exact int32 arithmetic; host fallbacks take the exact ``vpmaddwd``)."""
    if spec is None or spec.npu is not None:
        return 127
    return _WEIGHT_QMAX.get(spec.hardware.int8, 127)


def quantize(mod, config: Int8Static, spec=None):
    """Static INT8 quantization of ``mod["main"]``.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported, BN folded, convs in the target's layout.
    config : Int8Static
        With calibration data (``data``).
    spec : TargetSpec or None
        Read for ``[hardware].int8``: without int8 dot-product instructions the integer
        kernels are plain loops (a warning); ``avx2`` quantizes weights to 7 bits
        (``weight_qmax``) so that the kernels use ``vpmaddubsw``.

    Returns
    -------
    tvm.IRModule
        ``main`` with the quantizable convs / matmuls in int8; the report (``int8_report``)
        as a module attribute.
    """
    from ...errors import RecipeError
    from .int8_calib import calibrate, measure
    from .int8_graph import find_sites, rewrite
    from .int8_points import residual_points

    data_free = isinstance(config, Int8DataFree)
    if config.data is None and not data_free:
        raise RecipeError(
            "int8: calibration data is needed (Int8Static(data=...), or `hwc build --int8 --calib DIR`); "
            "without data use Int8DataFree() (`--calibration data-free`)"
        )
    qmax = weight_qmax(spec)
    # an NPU that requantizes with shifts only needs power-of-two scales ([npu].pow2_scales)
    pow2 = spec is not None and spec.npu is not None and spec.npu.pow2_scales
    dfq_report = None
    if config.equalize or config.bias_correction:
        from .dfq import DataFree, apply_dfq

        dfq_config = DataFree(equalize=config.equalize, bias_correction=config.bias_correction)
        calib = None if data_free else config.data.data
        mod, dfq_report = apply_dfq(mod, dfq_config, calib=calib, per_channel=config.per_channel, qmax=qmax)
    if spec is not None and spec.hardware.int8.value == "none":
        log.warning("int8: target %s has no int8 dot-product instructions ([hardware].int8 = none): integer kernels are plain loops", spec.name)
    func = mod["main"]
    # depthwise convs only where the NPU takes them: the host has no int8 depthwise kernel
    sites = find_sites(func, depthwise=spec is not None and spec.npu is not None
                       and "depthwise_conv2d" in spec.npu.supported_ops)
    todo = [s for s in sites if s.reason is None]
    report = {
        "scheme": "uint8 activations (asymmetric, per tensor) x int8 weights (symmetric, "
        + ("per output channel" if config.per_channel else "per tensor")
        + (f"; 7-bit weights for AVX2 vpmaddubsw: [-{qmax}, {qmax}]" if qmax < 127 else "")
        + ("; power-of-two scales for the NPU" if pow2 else "") + ") -> int32",
        "calibration": f"data-free: minmax on {config.samples} synthetic N(0,1) inputs" if data_free else config.calibration.value,
        "float_fallback": [{"name": s.name, "reason": s.reason} for s in sites if s.reason is not None],
        "float_ops": _float_ops(func, {s.var for s in todo}),
    }
    for s in sites:
        if s.reason is not None:
            log.info("int8: %s stays float: %s", s.name, s.reason)
    if not todo:
        log.warning("int8: no conv2d / matmul can be quantized; the module stays float")
        return mod.with_attr(REPORT_ATTR, json.dumps({**report, "layers": []}))
    if dfq_report is not None:
        report["dfq"] = dfq_report.as_dict()
    data = synthetic_inputs(func, config.samples, config.seed) if data_free else config.data.data
    point_names = residual_points(func) if npu_adds(spec) else {}
    ranges, kept, seen = calibrate(mod, todo, config.calibration.value, data, config.max_samples, point_names)
    layers = [plan_layer(s, ranges[s.data], config.per_channel, qmax, pow2) for s in todo]
    points = {v: activation_qparams(ranges[v], pow2) for v in point_names}
    measured = measure(mod, layers, kept, points)
    measured["layers"] = [
        {"name": layer.site.name, "op": layer.site.op, "input_scale": float(layer.act.scale),
         "input_zero_point": int(layer.act.zero_point), **{k: v for k, v in row.items() if k != "name"}}
        for layer, row in zip(layers, measured["layers"])
    ]  # fmt: skip
    report = {**report, "calibration_samples": seen, **measured}
    if points:
        report["npu_add_points"] = [{"name": name, "scale": float(points[v].scale), "zero_point": int(points[v].zero_point)}
                                    for v, name in point_names.items()]
    log.info("int8: %d layers in int8, %d stay float; output SQNR %s dB", len(layers), len(report["float_fallback"]), measured["output_sqnr_db"])
    return rewrite(mod, layers, points).with_attr(REPORT_ATTR, json.dumps(report))


def _float_ops(func, quantized: set) -> dict[str, int]:
    """``{op name: count}`` of the calls of ``func`` that stay float (the quantized sites left out)."""
    from tvm import relax

    counts = Counter()
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and binding.var not in quantized:
                counts[getattr(value.op, "name", None) or getattr(value.op, "name_hint", "call")] += 1
    return dict(sorted(counts.items()))


def int8_report(mod) -> dict | None:
    """The report ``quantize`` attached to ``mod`` (None if it was not quantized): the scheme,
    per int8 layer its input parameters and SQNR against float (``sqnr_db`` alone,
    ``sqnr_db_network`` inside the int8 network), the output SQNR and top-1 agreement on the
    calibration data, and the conv / matmul ops that stayed float with the reason
    (``float_fallback``) plus every other op left float (``float_ops``)."""
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return None
    return json.loads(str(attrs[REPORT_ATTR]))
