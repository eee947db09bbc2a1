"""Pieces the benchmark tools share: single-layer models and interleaved timing."""

from __future__ import annotations

import statistics
import time

import numpy as np


def conv_relu_model(cin: int, cout: int, hw: int, k: int = 3, stride: int = 1, pad: int = 1, group: int = 1, seed: int = 0):
    """ONNX ``Conv(bias) -> Relu`` with He-normal weights, input ``[1, cin, hw, hw]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    fan_in = cin // group * k * k
    w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    out_hw = (hw + 2 * pad - k) // stride + 1
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, group=group),
        helper.make_node("Relu", ["c"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, cout, out_hw, out_hw])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def interleaved_times(runners: dict, rounds: int, reps: int, settle: float = 0.2) -> dict[str, list[float]]:
    """Seconds per run of each runner in each round, measured round-robin so that machine
    noise hits every runner alike (one warm-up call each first).

    Each runner's batch starts ``settle`` seconds after the previous one ends: ONNX Runtime's
    and TVM's thread pools spin for a while after a call, and on a 2-core machine the next
    runner's threads then share the cores with them (hwc right after ORT measured up to 40x
    slower on a small model, ORT right after hwc 1.3-2.7x; after a 50 ms pause ORT still ran
    MobileNetV2 2x slower in `bench.py`, after 0.2 s at its usual speed).
    """
    times = {name: [] for name in runners}
    for fn in runners.values():
        fn()
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t0) / reps)
    return times


def interleaved(runners: dict, rounds: int, reps: int, settle: float = 0.2) -> dict[str, float]:
    """Median seconds per run of each runner (see ``interleaved_times``)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(runners, rounds, reps, settle).items()}
