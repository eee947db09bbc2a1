"""Fused vs unfused inference, same default schedules: ResNet-18 and MobileNetV2, 224x224, batch 1.

    .venv/bin/python tools/bench_fusion.py                      # both models, 5 rounds
    .venv/bin/python tools/bench_fusion.py --models resnet18 --rounds 9 --variants unfused,fused,bn-unfused

Variants (all in the target's conv layout, NHWC on the CPU targets, without Winograd unless
``--winograd`` (then every variant's eligible convs are Winograd kernels, auto tile, as
builds make them), built with ``hwcompress.build.schedule``'s default schedules for
``--target``):

* ``unfused``: the usual import (ONNX Runtime's basic folding already puts Conv+BN into the
  conv weights), legalized with ``legalize_passes(fuse=False)``: every op its own kernel.
* ``stock``: the usual import, ``legalize_passes(fuse=True)`` (what ``build.legalize`` does).
* ``fused``: ``fuse(fold_bn(mod), spec=spec)`` then ``legalize_passes(fuse=True)`` (convs the backend packs are left to FuseOps).
* ``bn-unfused``: imported *without* ONNX Runtime's folding, no fold, no fusion: BN runs as
  separate subtract/divide/multiply/add kernels (the "nothing folded, nothing fused" baseline).

Every variant of one model runs interleaved in the same rounds, so ratios stay meaningful on a
shared, noisy machine; medians are reported, ratios are ``variant time / fused time``.
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
VARIANTS = ("unfused", "stock", "fused", "bn-unfused")


def _zoo():
    spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw_import(model, shapes):
    from hwcompress.frontend.importer import import_prepared
    from hwcompress.frontend.load import fix_input_shapes, load_model
    from hwcompress.frontend.normalize import infer_shapes

    return import_prepared(infer_shapes(fix_input_shapes(load_model(model), shapes)))


def build_variant(variant: str, model, shapes, spec, winograd: bool = False):
    """(executable, kernel count, build seconds) of one variant."""
    import tvm
    from tvm import relax

    import hwcompress
    from hwcompress import build as B
    from hwcompress.build import legalize_passes
    from hwcompress.passes import fold_bn, fuse
    from hwcompress.passes.layout import ConvLayout, convert_layout

    t0 = time.perf_counter()
    mod = _raw_import(model, shapes) if variant == "bn-unfused" else hwcompress.import_onnx(model, shapes)
    if variant == "fused":
        mod = fold_bn(mod)
    # the target's conv layout (NHWC on the CPUs), as `hwc build` runs it, in every variant
    mod = convert_layout(mod, ConvLayout(spec.hardware.conv_layout))
    if winograd:
        from hwcompress.passes.winograd import Winograd
        from hwcompress.passes.winograd import winograd as to_winograd

        mod = to_winograd(mod, Winograd(), spec)
    if variant == "fused":
        mod = fuse(mod, spec=spec)
    with spec.tvm_target():
        passes = legalize_passes(fuse=variant in ("stock", "fused"), legalize_map=B.backend_legalize_map(spec))
        mod = tvm.transform.Sequential(passes)(mod)
    kernels = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: kernels.append(e) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir" else None,
    )
    ex = B.build(B.schedule(mod, spec), spec)
    return ex, len(kernels), time.perf_counter() - t0


def bench_model(name, model, spec, variants, rounds, reps, winograd: bool = False):
    import onnxruntime as ort
    import tvm

    shapes = {"input": (1, 3, 224, 224)}
    x = np.random.default_rng(0).standard_normal(shapes["input"]).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    runners, info = {}, {}
    for variant in variants:
        ex, n_kernels, secs = build_variant(variant, model, shapes, spec, winograd)
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        xt = tvm.runtime.tensor(x)
        err = float(np.abs(vm["main"](xt).numpy() - ref).max() / np.abs(ref).max())
        if err > 1e-3:
            raise AssertionError(f"{name} {variant}: relative max error {err:.2e} vs ORT")
        runners[variant] = lambda vm=vm, xt=xt: vm["main"](xt)
        info[variant] = {"kernels": n_kernels, "build_s": secs, "err": err}
        print(f"  built {name} {variant}: {n_kernels} kernels, {secs:.0f}s, rel err {err:.1e}", flush=True)
    times = interleaved_times(runners, rounds, reps)
    base = statistics.median(times["fused"]) if "fused" in times else None
    print(f"\n{name}{' (Winograd)' if winograd else ''} (median of {rounds} interleaved rounds x {reps} runs)")
    print(f"  {'variant':<11} {'kernels':>7} {'ms':>9} {'FPS':>7} {'x fused':>8}")
    for variant in variants:
        ms = statistics.median(times[variant]) * 1e3
        ratio = f"{ms / (base * 1e3):.2f}x" if base else "-"
        print(f"  {variant:<11} {info[variant]['kernels']:>7} {ms:>9.2f} {1e3 / ms:>7.1f} {ratio:>8}")
    return times, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--variants", default="unfused,stock,fused", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--target", default="host")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="runs per variant per round")
    ap.add_argument("--winograd", action="store_true", help="eligible 3x3 convs as Winograd kernels in every variant")
    args = ap.parse_args(argv)

    from hwcompress.targets import load_target

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    spec = load_target(args.target)
    zoo = _zoo()
    for name in args.models.split(","):
        bench_model(name, getattr(zoo, name)(), spec, variants, args.rounds, args.reps, args.winograd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
