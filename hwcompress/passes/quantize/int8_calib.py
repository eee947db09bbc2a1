"""Calibration runs for INT8: the float module, built once for this host (``verify.host_vm``),
streams each quantized site's input into an observer, one batch at a time (``calibrate``);
then one module holding the float graph, each site's int8 version on the float input, and the
int8 graph measures the SQNR of every int8 layer (``measure``).

Memory stays bounded: observers keep fixed-size summaries, batches are read as they are needed
(``data.read_batches``) and dropped, except the first ``REPORT_SAMPLES`` samples, kept for
``measure``, whose sums are accumulated per batch too.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np

from ...data import read_batches
from ...errors import DataError
from .int8_graph import emit_int8_graph, emit_main, function_inputs, module_with_main
from .observers import EntropyObserver, MinMaxObserver, PercentileObserver

__all__ = ["REPORT_SAMPLES", "SqnrMeter", "calibrate", "measure"]

log = logging.getLogger("hwcompress")

REPORT_SAMPLES = 64  # calibration samples the SQNR report runs on (the first ones)
OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "entropy": EntropyObserver}


class SqnrMeter:
    """``observers.sqnr_db`` over a stream of (reference, quantized) batches: the signal and
    noise energies are summed, so the result equals ``sqnr_db`` of the concatenated arrays."""

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        ref = np.asarray(reference, np.float64)
        self.signal += float(np.sum(ref**2))
        self.noise += float(np.sum((ref - np.asarray(quantized, np.float64)) ** 2))

    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)


def _run(vm, batch) -> list[np.ndarray]:
    import tvm

    res = vm["main"](*(tvm.runtime.tensor(x) for x in batch))
    return [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]


def calibrate(mod, sites, method: str, data, max_samples: int, points: dict | None = None):
    """Observe the input of every site, and every tensor of ``points`` (``{var: name}``: the
    NPU's residual quantization points, ``int8_points.residual_points``), on the calibration data.

    Returns ``({var: (lo, hi)}, kept batches, samples seen)``: the clipping range of each
    distinct tensor, and the first batches (up to ``REPORT_SAMPLES`` samples) for ``measure``.
    """
    from ...verify import host_vm

    func = mod["main"]
    batches = read_batches(data, function_inputs(func), max_samples=max_samples)
    first = next(batches)  # data that does not fit fails here, before a compile
    points = points or {}
    wanted = list(dict.fromkeys([*(site.data for site in sites), *points]))

    def outputs(bb):
        results, vmap = emit_main(bb, func, func.params)
        return [*results, *(vmap.get(v, v) for v in wanted)]

    n_results = len(emit_results(func))
    vm = host_vm(module_with_main(mod, func, outputs, as_tuple=True))
    names = {**points, **{site.data: site.name for site in reversed(sites)}}
    histogram = method != "minmax"
    # histogram methods take two passes: the exact range first, so that the histogram's bins
    # span exactly [0, max |x|] (see observers.AbsHistogram); a one-shot iterable is held in
    # memory for the second pass (at most max_samples samples)
    replay = [] if histogram and not _rereadable(data) else None
    observers = {v: (MinMaxObserver() if histogram else OBSERVERS[method]()) for v in wanted}
    kept, seen = [], 0
    for batch in itertools.chain([first], batches):
        _observe(vm, batch, observers, wanted, n_results, names)
        if seen < REPORT_SAMPLES:
            kept.append(batch)
        if replay is not None:
            replay.append(batch)
        seen += batch[0].shape[0]
    if histogram:
        observers = {v: OBSERVERS[method](amax=max(map(abs, observers[v].range()))) for v in wanted}
        again = replay if replay is not None else read_batches(data, function_inputs(func), max_samples=max_samples)
        for batch in again:
            _observe(vm, batch, observers, wanted, n_results, names)
    log.info("int8: calibrated %d tensors on %d samples (%s)", len(wanted), seen, method)
    return {v: observers[v].range() for v in wanted}, kept, seen


def _observe(vm, batch, observers, wanted, n_results, names) -> None:
    outs = _run(vm, batch)
    for v, x in zip(wanted, outs[n_results:]):
        try:
            observers[v].observe(x)
        except ValueError as e:
            raise DataError(f"int8 calibration: the input of {names[v]} on the calibration data: {e}") from None


def _rereadable(data) -> bool:
    """Whether ``read_batches(data)`` yields the same batches a second time (paths, arrays,
    mappings, lists; not generators or other one-shot iterables)."""
    import os
    from collections.abc import Mapping

    return isinstance(data, (str, os.PathLike, np.ndarray, Mapping, list, tuple))


def emit_results(func) -> list:
    """The result expressions of ``func`` as a flat list."""
    from tvm import relax

    body = func.body.body
    return list(body.fields) if isinstance(body, relax.Tuple) else [body]


def measure(mod, layers, batches, points: dict | None = None) -> dict:
    """SQNR of every int8 layer against float on ``batches``.

    Per layer (``layers`` in program order): ``sqnr_db``, the int8 layer alone (its input the
    float network's, quantized) vs the float layer; ``sqnr_db_network``, the layer in the int8
    network (errors of the layers before it included) vs the float network. Also the first
    output's SQNR and, for ``[N, classes]`` outputs, how often the two networks agree on the
    top class. Outputs are compared before bias and activation (the int8 kernel's accumulator).
    """
    from ...verify import host_vm
    from .int8_graph import Int8Emitter

    func = mod["main"]
    by_var = {layer.site.var: layer for layer in layers}
    n_out = len(emit_results(func))

    def outputs(bb):
        shadow = Int8Emitter(bb)
        ref_taps, alone_taps, net_taps = [], [], []

        def float_call(var, _orig, value):
            y = bb.emit(value, name_hint=var.name)
            layer = by_var.get(var)
            if layer is not None:
                ref_taps.append(y)
                alone_taps.append(shadow.emit(layer, value.args[0], var.name + "_int8"))
            return y

        float_out, _ = emit_main(bb, func, func.params, float_call)
        int8_out = emit_int8_graph(bb, func, by_var, net_taps, points)
        return [*float_out, *int8_out, *ref_taps, *alone_taps, *net_taps]

    vm = host_vm(module_with_main(mod, func, outputs, as_tuple=True))
    k = len(layers)
    alone, network = [SqnrMeter() for _ in range(k)], [SqnrMeter() for _ in range(k)]
    output, agree, total = SqnrMeter(), 0, 0
    for batch in batches:
        outs = _run(vm, batch)
        ref, q = outs[0], outs[n_out]
        output.add(ref, q)
        if ref.ndim == 2:
            agree += int((ref.argmax(1) == q.argmax(1)).sum())
            total += ref.shape[0]
        taps = outs[2 * n_out :]
        for i in range(k):
            alone[i].add(taps[i], taps[k + i])
            network[i].add(taps[i], taps[2 * k + i])
    report = {
        "layers": [{"name": layer.site.name, "sqnr_db": _db(a.db()), "sqnr_db_network": _db(n.db())} for layer, a, n in zip(layers, alone, network)],
        "output_sqnr_db": _db(output.db()),
        "report_samples": sum(b[0].shape[0] for b in batches),
    }
    if total:
        report["top1_agreement"] = agree / total
    return report


def _db(value: float):
    """Rounded for the manifest; JSON has no infinity, so an exact match is ``"inf"``."""
    return round(value, 2) if math.isfinite(value) else str(value)
