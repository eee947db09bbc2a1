"""Host latency of hwc builds vs ONNX Runtime (FP32, 2 threads) on the model zoo.

Both run in this process on the same inputs, interleaved round by round so that machine
noise hits both alike; the figure that means something is the ratio hwc / ORT.

    python tools/bench.py [--models resnet18,mobilenet_v2,small_cnn] [--rounds 15] [--runs 5]
                          [--target host] [--db DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

import hwcompress  # noqa: E402

MODELS = {
    "resnet18": lambda: (zoo.resnet18(), {"input": (1, 3, 224, 224)}),
    "mobilenet_v2": lambda: (zoo.mobilenet_v2(), {"input": (1, 3, 224, 224)}),
    "small_cnn": lambda: (zoo.small_cnn(), None),
}


def ort_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_ms(fn, runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_model(name: str, target: str, dbs: list[str], rounds: int, runs: int, threads: int) -> dict:
    model, shapes = MODELS[name]()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        artifact = hwcompress.compile(model, target=target, out=Path(tmp) / name, input_shapes=shapes, databases=dbs)
        build_s = time.perf_counter() - start
        spec = artifact.inputs[0]
        x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])
        session = ort_session(model, threads)
        feed = {spec["name"]: x}
        import tvm

        vm, device = artifact.native_vm()
        arg = tvm.runtime.tensor(x, device)
        hwc_fn, ort_fn = (lambda: vm["main"](arg)), (lambda: session.run(None, feed))
        for fn in (hwc_fn, ort_fn):  # warm-up
            time_ms(fn, 3)
        hwc, ref = [], []
        for _ in range(rounds):
            hwc.append(time_ms(hwc_fn, runs))
            ref.append(time_ms(ort_fn, runs))
        flops = artifact.manifest["inspect"]["after"]["flops"]
    hwc_ms, ort_ms = statistics.median(hwc), statistics.median(ref)
    return {
        "model": name,
        "hwc_ms": hwc_ms,
        "ort_ms": ort_ms,
        "ratio": hwc_ms / ort_ms,
        "gflops": flops / 1e9,
        "hwc_gflop_s": flops / 1e9 / (hwc_ms / 1e3),
        "build_s": build_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,resnet18,mobilenet_v2")
    p.add_argument("--target", default="host")
    p.add_argument("--db", action="append", default=[])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = [bench_model(m, args.target, args.db, args.rounds, args.runs, args.threads) for m in args.models.split(",")]
    header = "| model | GFLOPs | hwc ms | ORT ms | hwc / ORT | hwc GFLOP/s | build s |"
    print(header)
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['model']} | {r['gflops']:.2f} | {r['hwc_ms']:.2f} | {r['ort_ms']:.2f} | "
            f"{r['ratio']:.2f}x | {r['hwc_gflop_s']:.1f} | {r['build_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
