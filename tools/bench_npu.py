"""Accuracy of the NPU stub path: FP32 (ONNX Runtime) vs INT8 on the host vs INT8 on npu-stub.

For the two real tasks of ``tools/tasks.py`` (the trained MNIST CNN ``digits`` and the
Fashion-MNIST classifier ``fashion``): top-1 on the test set, the NPU's share of the FLOPs,
estimated NPU cycles and what stayed on the host. The issue's goal: NPU top-1 within 0.5
point of FP32.

    taskset -c 0 .venv/bin/python tools/bench_npu.py [--tasks digits fashion] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import BATCH, TASKS, load_task, top1  # noqa: E402


def fp32_runner(model):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def build(model, target: str, calib, out: Path):
    import hwcompress
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe

    start = time.perf_counter()
    art = hwcompress.compile(str(model), target, out, {"input": [BATCH, *calib.shape[1:]]},
                             Recipe((Int8Static(data=calib),)))
    return art, time.perf_counter() - start


def bench(task: str, limit: int | None, host: bool) -> dict:
    model, calib, x, y = load_task(task)
    if limit:
        x, y = x[:limit], y[:limit]
    row = {"task": task, "test_images": len(x) // BATCH * BATCH, "fp32_top1": top1(fp32_runner(model), x, y)}
    with tempfile.TemporaryDirectory() as tmp:
        targets = ["npu-stub"] + (["host"] if host else [])
        for target in targets:
            art, seconds = build(model, target, calib, Path(tmp) / target)
            key = "npu" if target == "npu-stub" else "host_int8"
            start = time.perf_counter()
            row[f"{key}_top1"] = top1(lambda b: art.run([b])[0], x, y)
            row[f"{key}_eval_s"] = round(time.perf_counter() - start, 1)
            row[f"{key}_build_s"] = round(seconds, 1)
            if key == "npu":
                off = art.manifest["offload"]
                row["npu_verification_max_abs_err"] = max(c["max_abs_err"] for c in art.manifest["verification"]["cases"])
                row["flops_share"] = round(off["flops_share"], 4)
                row["npu_cycles_per_batch"] = off["cycles"]
                row["ops"] = {op: {"npu": r["npu"], "host": r["host"]} for op, r in off["ops"].items()}
                row["host_reasons"] = sorted({h["reason"] for r in off["ops"].values() for h in r.get("host_reasons", [])})
    row["npu_minus_fp32_points"] = round(100 * (row["npu_top1"] - row["fp32_top1"]), 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--no-host", action="store_true", help="skip the host INT8 build (comparison)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = [bench(t, args.limit, not args.no_host) for t in args.tasks]
    for r in rows:
        print(f"{r['task']:8} fp32 {100 * r['fp32_top1']:.2f}%  "
              + (f"host int8 {100 * r['host_int8_top1']:.2f}%  " if "host_int8_top1" in r else "")
              + f"npu {100 * r['npu_top1']:.2f}% ({r['npu_minus_fp32_points']:+.2f} pt)  "
              f"NPU FLOPs {100 * r['flops_share']:.1f}%  {r['npu_cycles_per_batch']:,} cycles / batch of {BATCH}")
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
