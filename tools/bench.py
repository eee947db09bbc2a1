"""Host latency of hwc builds vs ONNX Runtime (FP32, 2 threads) on the model zoo.

All variants run in this process on the same inputs, interleaved round by round so that
machine noise hits them alike; the figures that mean something are the ratios. "untuned" uses
no database at all (hwc's default schedules, default graph optimizations); "plain" is untuned
without Winograd and with the imported NCHW layout (the build before the graph-optimization
issue); "tuned" applies the shipped schedules/<target>/
databases and any --db, and is shown when one of them covers a kernel. hwc and ORT both run on
``--threads`` threads (``TVM_NUM_THREADS`` is set to it before the first kernel runs).

The FP32 peak of those threads is measured too (``tuning_report.measure_fma``: a loop of
independent vector FMAs on one core, before and after the runs, the higher rate times the
thread count), and with it each model's direct-conv FLOPs per second as a share of that peak
(hwc's best build and ORT), and the **bound**: the hwc / ORT ratio hwc would reach running
every FLOP at the full peak (FLOPs / peak / ORT's time: ORT's share of the peak, read as a
ratio). A goal below the bound cannot be met by faster kernels for the same FLOPs (only by
fewer FLOPs: Winograd, pruning, INT8; a Winograd build's "share" of the direct-conv FLOPs can
pass 100%).

    python tools/bench.py [--models resnet18,mobilenet_v2,small_cnn] [--rounds 15] [--runs 5]
                          [--target host] [--db DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from benchlib import interleaved  # noqa: E402

import hwcompress  # noqa: E402

MODELS = {
    "resnet18": lambda: (zoo.resnet18(), {"input": (1, 3, 224, 224)}),
    "mobilenet_v2": lambda: (zoo.mobilenet_v2(), {"input": (1, 3, 224, 224)}),
    "small_cnn": lambda: (zoo.small_cnn(), None),
}


def fma_peak(threads: int) -> tuple[float | None, str]:
    """FP32 GFLOP/s of ``threads`` cores: the FMA loop's rate on this core times ``threads``
    (None and why when the loop cannot be built)."""
    from tuning_report import fma_vector_bytes, measure_fma

    from hwcompress.targets import host_arch, host_cpu_features

    width = fma_vector_bytes(host_cpu_features(), host_arch())
    run = measure_fma(width, cpu_seconds=0.5)
    if isinstance(run, str):
        return None, run
    return run.gflops * threads, f"{threads} x {run.gflops:.1f} GFLOP/s ({8 * width}-bit FMA loop, one core)"


def ort_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench_model(name: str, target: str, dbs: list[str], rounds: int, runs: int, threads: int) -> dict:
    """Untuned hwc (no database at all), tuned hwc (shipped + ``dbs``) when any database
    applies, and ORT, interleaved."""
    import tvm

    model, shapes = MODELS[name]()
    with tempfile.TemporaryDirectory() as tmp:
        builds = {}
        plain = hwcompress.Optimize(winograd="off", layout="NCHW")
        variants = (
            ("plain", {"shipped_databases": False, "optimize": plain}),
            ("untuned", {"shipped_databases": False}),
            ("tuned", {"databases": dbs}),
        )
        for variant, options in variants:
            start = time.perf_counter()
            artifact = hwcompress.compile(model, target=target, out=Path(tmp) / variant, input_shapes=shapes, **options)
            builds[variant] = (artifact, time.perf_counter() - start)
        if not builds["tuned"][0].manifest["kernels"]["tuned"]:
            del builds["tuned"]  # no database applies: same as untuned
        spec = builds["untuned"][0].inputs[0]
        x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])
        session = ort_session(model, threads)
        runners = {}
        for variant, (artifact, _) in builds.items():
            vm, device = artifact.native_vm()
            arg = tvm.runtime.tensor(x, device)
            runners[variant] = lambda vm=vm, arg=arg: vm["main"](arg)
        runners["ort"] = lambda: session.run(None, {spec["name"]: x})
        ms = {k: v * 1e3 for k, v in interleaved(runners, rounds, runs).items()}
        flops = builds["plain"][0].manifest["inspect"]["after"]["flops"]  # direct-conv FLOPs
        tuned_kernels = len(builds["tuned"][0].manifest["kernels"]["tuned"]) if "tuned" in builds else 0
    best = min(ms["untuned"], ms.get("tuned", ms["untuned"]))
    return {
        "model": name,
        "plain_ms": ms["plain"],
        "untuned_ms": ms["untuned"],
        "tuned_ms": ms.get("tuned"),
        "tuned_kernels": tuned_kernels,
        "ort_ms": ms["ort"],
        "ratio": best / ms["ort"],
        "gflops": flops / 1e9,
        "hwc_gflop_s": flops / 1e9 / (best / 1e3),
        "build_s": max(b for _, b in builds.values()),
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
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read once, when the first kernel runs
    before, how = fma_peak(args.threads)
    rows = [bench_model(m, args.target, args.db, args.rounds, args.runs, args.threads) for m in args.models.split(",")]
    after, _ = fma_peak(args.threads)
    peak = max(before or 0.0, after or 0.0) or None
    print(f"FP32 peak of {args.threads} thread(s): " + (f"{peak:.1f} GFLOP/s = {how}" if peak else f"not measured ({how})"))
    print("| model | GFLOPs | plain ms | untuned ms | tuned ms (kernels) | ORT ms | best hwc / ORT | hwc GFLOP/s | hwc % peak | ORT % peak | bound |")
    print("|" + "---|" * 11)

    def pct(gflop_s: float) -> str:
        return f"{100 * gflop_s / peak:.0f}%" if peak else "-"

    for r in rows:
        tuned = f"{r['tuned_ms']:.2f} ({r['tuned_kernels']})" if r["tuned_ms"] is not None else "-"
        ort_rate = r["gflops"] / (r["ort_ms"] / 1e3)
        bound = f"{ort_rate / peak:.2f}x" if peak else "-"  # hwc at 100% of peak: FLOPs / peak / ORT's time
        print(
            f"| {r['model']} | {r['gflops']:.2f} | {r['plain_ms']:.2f} | {r['untuned_ms']:.2f} | {tuned} | {r['ort_ms']:.2f} | "
            f"{r['ratio']:.2f}x | {r['hwc_gflop_s']:.1f} | {pct(r['hwc_gflop_s'])} | {pct(ort_rate)} | {bound} |"
        )
    print("build s: " + ", ".join(f"{r['model']} {r['build_s']:.0f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
