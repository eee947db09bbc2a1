"""Direct vs Winograd conv: ResNet-18's 3x3 stride-1 layers, then ResNet-18 end to end.

    .venv/bin/python tools/bench_winograd.py layers                    # default schedules
    .venv/bin/python tools/bench_winograd.py layers --tune 32 --work-dir /tmp/wg_tune
    .venv/bin/python tools/bench_winograd.py resnet18 [--tile 2] [--db DIR ...]

``layers``: every distinct 3x3 stride-1 layer of ResNet-18 at 224x224, batch 1, as
``Conv(bias) + Relu`` (the shape it has after BN folding), in the conv layout builds for the
target use (``--layout``, default its ``[hardware].conv_layout``: NHWC on CPUs, where the
direct conv is hwcompress's packed kernel; ``NCHW`` measures the imported layout), built four ways: ``direct``
(``build.legalize``), ``f2`` and ``f4`` (``winograd(mod, Winograd(tile=m))`` first). Without
``--tune`` every kernel gets hwcompress's default CPU schedule (Winograd kernels:
the CPU backend's Winograd rule); ``auto`` is ``Winograd()`` (the tile ``choose_tile`` picks); with ``--tune N`` each variant of
each layer is tuned with ``tune_module`` for the same ``N`` trials (own database per variant,
under ``--work-dir``; re-running continues it) and built with that database.

``resnet18``: the whole model (in ``--layout`` as above), direct vs ``winograd(mod,
Winograd(tile=...))`` (auto tile when ``--tile`` is not given), both with default schedules
unless ``--db`` is given.

Variants of one layer run interleaved in the same rounds (the machine is shared and noisy);
the table gives medians and ``direct / variant`` speedups (> 1: Winograd is faster), and each
variant's relative max error against the direct build.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import conv_relu_model, interleaved  # noqa: E402

# (channels, spatial size): ResNet-18's 3x3 stride-1 convs (layer1..layer4; the count of each
# shape in the model is in the comment).
LAYERS = {
    "c64_56": (64, 56),  # x4
    "c128_28": (128, 28),  # x3
    "c256_14": (256, 14),  # x3
    "c512_7": (512, 7),  # x3
}


def relax_module(model, variant: str, layout: str, spec, tile: int | None = None, shapes=None):
    """The imported module in conv ``layout`` with ``variant`` applied (``direct``, ``f2``,
    ``f4``, ``auto``), in the order a build runs them (layout, then Winograd)."""
    import hwcompress
    from hwcompress.passes.layout import ConvLayout, convert_layout
    from hwcompress.passes.winograd import Winograd, winograd

    mod = hwcompress.import_onnx(model, shapes)
    if layout != "NCHW":
        mod = convert_layout(mod, ConvLayout(layout))
    if variant == "direct":
        return mod
    return winograd(mod, Winograd(tile={"f2": 2, "f4": 4, "auto": tile}[variant]), spec)


def conv_layout(args, spec) -> str:
    """``--layout``, else the target's ``[hardware].conv_layout`` (the layout builds use)."""
    return args.layout or spec.hardware.conv_layout.value


def build(mod, spec, databases=()):
    """Legalize, apply the databases, then the backend's default schedules (whose first rule
    schedules Winograd kernels); a VM on the CPU."""
    import tvm

    from hwcompress import build as B

    ex = B.build(B.schedule(B.legalize(mod, spec), spec, list(databases)), spec)
    return tvm.relax.VirtualMachine(ex, tvm.cpu())


def tune(mod, spec, trials: int, work_dir: Path) -> Path:
    from hwcompress import build as B
    from hwcompress.tuning import tune_module

    work_dir.mkdir(parents=True, exist_ok=True)
    tune_module(B.legalize(mod, spec), spec, trials, work_dir, trials_per_iter=8)
    return work_dir


def bench_layers(args, spec) -> None:
    import tvm

    rows = []
    layout = conv_layout(args, spec)
    for name in args.layers.split(","):
        c, hw = LAYERS[name]
        model = conv_relu_model(c, c, hw)
        x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32))
        runners, outs = {}, {}
        for variant in args.variants.split(","):
            mod = relax_module(model, variant, layout, spec)
            dbs = []
            if args.tune:
                t0 = time.perf_counter()
                dbs = [tune(mod, spec, args.tune, Path(args.work_dir) / f"{name}_{variant}")]
                print(f"  tuned {name} {variant}: {args.tune} trials, {time.perf_counter() - t0:.0f}s", flush=True)
            vm = build(mod, spec, dbs)
            outs[variant] = vm["main"](x).numpy()
            runners[variant] = lambda vm=vm: vm["main"](x)
        ref = outs["direct"]
        ms = interleaved(runners, args.rounds, args.reps)
        for variant in runners:
            err = float(np.abs(outs[variant] - ref).max() / np.abs(ref).max())
            rows.append((name, variant, ms[variant] * 1e3, ms["direct"] / ms[variant], err))
            print(f"  {name:<8} {variant:<6} {ms[variant] * 1e3:8.3f} ms  x{ms['direct'] / ms[variant]:.2f}  err {err:.1e}", flush=True)
    mode = f"tuned, {args.tune} trials per variant" if args.tune else "default schedules"
    print(f"\n3x3 stride-1 layers of ResNet-18, conv+bias+relu, {layout}, batch 1 ({mode}; median of {args.rounds} rounds x {args.reps})")
    print("| layer | variant | ms | speedup vs direct | rel. max err vs direct |\n|---|---|---:|---:|---:|")
    for name, variant, ms, speedup, err in rows:
        print(f"| {name} | {variant} | {ms:.3f} | {speedup:.2f}x | {err:.1e} |")


def bench_resnet18(args, spec) -> None:
    import onnxruntime as ort
    import tvm

    zoo_spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    zoo = importlib.util.module_from_spec(zoo_spec)
    zoo_spec.loader.exec_module(zoo)
    model = zoo.resnet18()
    shapes = {"input": (1, 3, 224, 224)}
    x = np.random.default_rng(0).standard_normal(shapes["input"]).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    xt = tvm.runtime.tensor(x)
    runners = {}
    layout = conv_layout(args, spec)
    for variant in ("direct", "winograd"):
        mod = relax_module(model, "auto" if variant == "winograd" else "direct", layout, spec, args.tile, shapes)
        vm = build(mod, spec, args.db or ())
        err = float(np.abs(vm["main"](xt).numpy() - ref).max() / np.abs(ref).max())
        print(f"  {variant}: rel max err vs ORT {err:.1e}", flush=True)
        runners[variant] = lambda vm=vm: vm["main"](xt)
    ms = interleaved(runners, args.rounds, args.reps)
    print(f"\nResNet-18 224x224 batch 1, {layout}, tile {args.tile or 'auto'} (median of {args.rounds} rounds x {args.reps})")
    for variant, s in ms.items():
        print(f"  {variant:<9} {s * 1e3:8.2f} ms  x{ms['direct'] / s:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("layers", "resnet18"))
    ap.add_argument("--target", default="host")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--variants", default="direct,f2,f4,auto", help="layers: comma list of direct, f2, f4, auto")
    ap.add_argument("--layout", default=None, help="conv layout (default: the target's conv_layout, as builds use)")
    ap.add_argument("--tune", type=int, default=0, help="layers: tune each variant for this many trials")
    ap.add_argument("--work-dir", default="/tmp/hwc_bench_winograd")
    ap.add_argument("--tile", type=int, default=None, help="resnet18: 2 or 4 (default: auto per layer)")
    ap.add_argument("--db", action="append", help="resnet18: tuning database dir(s) for both builds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    from hwcompress.targets import load_target

    spec = load_target(args.target)
    (bench_layers if args.what == "layers" else bench_resnet18)(args, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
