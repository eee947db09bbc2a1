"""Conv layouts NCHW vs NHWC vs blocked NCHW{b}c, Winograd off and on, default schedules.

    .venv/bin/python tools/bench_layout.py                                  # all models, 5 rounds
    .venv/bin/python tools/bench_layout.py --models resnet18 --layouts NCHW,NHWC --winograd off

Models: ResNet-18 and MobileNetV2 from ``tools/zoo.py`` at 224x224, batch 1, and the Fashion
classifier ``examples/fashion_resnet.onnx`` at 28x28, batch 8. Each variant is built the way
``hwc build`` builds it: ``api.import_model`` with ``Optimize(layout=..., winograd=...)`` (BN
folding, the layout pass, Winograd), then ``build.legalize``, the backend's default schedules
(no tuning database) and codegen for ``--target``. ``NCHWc`` in ``--layouts`` means
``NCHW{b}c`` with ``b`` = the target's float32 vector lanes (8 with AVX2, 16 with AVX-512).

All variants of one model run interleaved in the same rounds (the machine is shared and
noisy); the table gives medians, the speedup against NCHW with the same Winograd setting
(> 1: faster than NCHW), the kernels the default CPU rules left unscheduled (naive loops), and
each variant's relative max error against ONNX Runtime.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import interleaved_times  # noqa: E402

MAX_REL_ERR = 1e-3


def _zoo():
    spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def models(names: list[str]) -> dict:
    """``name -> (onnx model, input shape)``."""
    import onnx

    zoo, out = _zoo(), {}
    for name in names:
        if name == "fashion":
            out[name] = (onnx.load(ROOT / "examples" / "fashion_resnet.onnx"), (8, 1, 28, 28))
        else:
            out[name] = (getattr(zoo, name)(), (1, 3, 224, 224))
    return out


def blocked_layout(spec) -> str:
    """``NCHW{lanes}c`` for the target's float32 vector width."""
    from hwcompress.backends.cpu_schedule import CpuFacts

    return f"NCHW{CpuFacts.from_target(spec.tvm_target()).lanes(32)}c"


def build_variant(model, shape, spec, layout: str, winograd: str):
    """(VM, info) of one variant: the build ``hwc build --layout L --winograd W`` would make,
    with default schedules only."""
    import tvm

    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.optimize import Optimize

    t0 = time.perf_counter()
    front = import_model(model, spec, {"input": shape}, optimize=Optimize(layout=layout, winograd=winograd))
    scheduled = B.schedule(B.legalize(front.mod, spec), spec)
    kernels = B.kernels(scheduled)
    unscheduled = sorted(set(kernels) - set(B.scheduled_kernels(scheduled)))
    ex = B.build(scheduled, spec)
    steps = [s["technique"] for s in front.recipe.to_dict()["steps"]]
    info = {"kernels": len(kernels), "unscheduled": unscheduled, "build_s": time.perf_counter() - t0, "steps": steps}
    return tvm.relax.VirtualMachine(ex, tvm.cpu()), info


def bench_model(name, model, shape, spec, layouts, winograds, rounds, reps):
    import onnxruntime as ort
    import tvm

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    xt = tvm.runtime.tensor(x)
    runners, info = {}, {}
    for wg in winograds:
        for layout in layouts:
            key = (layout, wg)
            vm, info[key] = build_variant(model, shape, spec, layout, wg)
            err = float(np.abs(vm["main"](xt).numpy() - ref).max() / np.abs(ref).max())
            if err > MAX_REL_ERR:
                raise AssertionError(f"{name} {layout} winograd={wg}: relative max error {err:.2e} vs ONNX Runtime")
            info[key]["err"] = err
            runners[key] = lambda vm=vm: vm["main"](xt)
            i = info[key]
            print(
                f"  built {name} {layout} winograd={wg}: {i['kernels']} kernels, {len(i['unscheduled'])} unscheduled, "
                f"{i['build_s']:.0f}s, steps {'+'.join(i['steps'])}, rel err vs ORT {err:.1e}",
                flush=True,
            )
    times = interleaved_times(runners, rounds, reps)
    ms = {key: statistics.median(ts) * 1e3 for key, ts in times.items()}
    batch = shape[0]
    print(f"\n{name} {'x'.join(map(str, shape[2:]))} batch {batch} (median of {rounds} interleaved rounds x {reps} runs, default schedules)")
    print("| layout | winograd | kernels | unscheduled | ms | speedup vs NCHW | rel. err vs ORT |\n|---|---|---:|---:|---:|---:|---:|")
    for (layout, wg), t in ms.items():
        base = ms.get((layouts[0], wg))
        ratio = f"{base / t:.2f}x" if base else "-"
        i = info[(layout, wg)]
        print(f"| {layout} | {wg} | {i['kernels']} | {len(i['unscheduled'])} | {t:.2f} | {ratio} | {i['err']:.1e} |")
    for key, i in info.items():
        if i["unscheduled"]:
            print(f"  unscheduled in {key}: {', '.join(i['unscheduled'])}")
    print(flush=True)
    return ms, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,fashion", help="comma list of resnet18, mobilenet_v2, fashion")
    ap.add_argument("--layouts", default="NCHW,NHWC,NCHWc", help="comma list; the first is the baseline of the ratios")
    ap.add_argument("--winograd", default="off,on", help="comma list of off, on")
    ap.add_argument("--target", default="host")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="runs per variant per round")
    args = ap.parse_args(argv)

    from hwcompress.targets import load_target

    spec = load_target(args.target)
    layouts = [blocked_layout(spec) if s == "NCHWc" else s for s in args.layouts.split(",")]
    winograds = args.winograd.split(",")
    for name, (model, shape) in models(args.models.split(",")).items():
        bench_model(name, model, shape, spec, layouts, winograds, args.rounds, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
