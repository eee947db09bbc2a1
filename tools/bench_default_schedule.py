"""Measure the default CPU schedules: naive (no schedule) vs default schedule vs ONNX Runtime.

    .venv/bin/python tools/bench_default_schedule.py                # layers + small CNN + ResNet-18
    .venv/bin/python tools/bench_default_schedule.py --only layers --rounds 7

Every variant of one model runs interleaved in the same rounds (naive, default, ORT, naive,
...), so ratios stay meaningful on a shared, noisy machine; medians are reported. ORT runs
with ``intra_op_num_threads`` = the target's ``num-cores``. Build times are per stage:
``schedule`` is what the default schedule adds; ``compile`` is codegen of the whole module.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import conv_relu_model  # noqa: E402

# (name, cin, cout, hw, kernel, stride, pad, group): ResNet-18 / MobileNet layer shapes at 224
LAYERS = [
    ("stem 3->64 7x7/2 224", 3, 64, 224, 7, 2, 3, 1),
    ("64 3x3 56", 64, 64, 56, 3, 1, 1, 1),
    ("128 3x3/2 56->28", 64, 128, 56, 3, 2, 1, 1),
    ("128 3x3 28", 128, 128, 28, 3, 1, 1, 1),
    ("256 3x3 14", 256, 256, 14, 3, 1, 1, 1),
    ("512 3x3 7", 512, 512, 7, 3, 1, 1, 1),
    ("1x1 64->256 56", 64, 256, 56, 1, 1, 0, 1),
    ("dw 144 3x3 56", 144, 144, 56, 3, 1, 1, 144),
    ("dw 384 3x3 14", 384, 384, 14, 3, 1, 1, 384),
]


def gemm_layer(k, n, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=1)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _build(model, spec, scheduled: bool, input_shapes=None):
    import hwcompress.frontend as fe
    from hwcompress import build as B

    t0 = time.perf_counter()
    mod = B.legalize(fe.import_onnx(model, input_shapes=input_shapes), spec)
    t1 = time.perf_counter()
    if scheduled:
        mod = B.schedule(mod, spec)
    t2 = time.perf_counter()
    ex = B.build(mod, spec)
    t3 = time.perf_counter()
    return ex, {"legalize": t1 - t0, "schedule": t2 - t1, "compile": t3 - t2}


def bench_model(name, model, spec, rounds, input_shapes=None, naive=True):
    """Median seconds per run of each variant, measured interleaved; checks outputs agree."""
    import onnxruntime as ort
    import tvm

    shape = input_shapes["input"] if input_shapes else [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(spec.tvm.get("num-cores", 1))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    runners, builds = {}, {}
    for variant in (["naive"] if naive else []) + ["default"]:
        ex, builds[variant] = _build(model, spec, scheduled=variant == "default", input_shapes=input_shapes)
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        xt = tvm.runtime.tensor(x)
        out = vm["main"](xt).numpy()
        err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
        if err > 1e-3:
            raise AssertionError(f"{name} {variant}: relative max error {err:.2e} vs ORT")
        runners[variant] = lambda vm=vm, xt=xt: vm["main"](xt)
    runners["ort"] = lambda: sess.run(None, {"input": x})
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()  # warm up
    for _ in range(rounds):
        for key, fn in runners.items():
            reps = 1 if key == "naive" else 3
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[key].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, builds


def _report(name, med, builds):
    d = med["default"]
    parts = [f"{name:26s} default {d * 1e3:9.2f} ms"]
    if "naive" in med:
        parts.append(f"naive/default {med['naive'] / d:6.1f}x")
    parts.append(f"default/ort {d / med['ort']:5.2f}x (ort {med['ort'] * 1e3:.2f} ms)")
    sched = builds["default"]["schedule"]
    compile_delta = builds["default"]["compile"] - builds.get("naive", builds["default"])["compile"]
    parts.append(f"schedule +{sched:.2f}s, compile {compile_delta:+.2f}s")
    print("  ".join(parts), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["layers", "small_cnn", "resnet18", "mobilenet_v2"], action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target", default="host")
    args = parser.parse_args(argv)
    from hwcompress.targets import load_target

    spec = load_target(args.target)
    which = args.only or ["layers", "small_cnn", "resnet18"]
    print(f"target {spec.tvm}; medians of {args.rounds} interleaved rounds")
    if "layers" in which:
        for name, cin, cout, hw, k, s, p, g in LAYERS:
            _report(name, *bench_model(name, conv_relu_model(cin, cout, hw, k, s, p, g), spec, args.rounds))
        _report("gemm 512->1000 batch1", *bench_model("gemm", gemm_layer(512, 1000), spec, args.rounds))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo

    if "small_cnn" in which:
        _report("small_cnn (zoo, 32x32)", *bench_model("small_cnn", zoo.small_cnn(), spec, args.rounds))
    for net in ("resnet18", "mobilenet_v2"):
        if net in which:
            model = getattr(zoo, net)()
            _report(f"{net} 224", *bench_model(net, model, spec, max(3, args.rounds // 2), {"input": (1, 3, 224, 224)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
