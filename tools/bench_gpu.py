"""GPU measurements of hwc's CUDA builds on a lent GPU machine that has no TVM installed.

Two halves, run on two machines:

    # here (TVM compiler, nvcc): build every variant for the GPU's arch, weights lifted out
    .venv/bin/python tools/bench_gpu.py prepare --out .dev/gpu --target targets/cuda-sm90.toml
    # on the GPU machine (python3 + numpy, TVM's runtime only, see below)
    python3 tools/bench_gpu.py run .dev/gpu --rounds 7 --reps 20

``prepare`` builds, with hwc's own stages (``api.import_model`` -> ``build.legalize`` ->
``build.schedule`` -> ``build.build``, exported by the CUDA backend with nvcc cubins):

* ``resnet18`` and ``mobilenet_v2`` (224x224, batch 1) as ``fused`` (the target's defaults:
  BN folded, fusion on, Winograd off), ``winograd`` (the same with Winograd on; ResNet-18 only)
  ``unfused`` (no BN folding anywhere, no fusion: every op, BN's arithmetic included, its
  own kernel -- the "nothing folded, nothing fused" baseline of ``bench_fusion.py``) and
  ``winograd-unfused`` (ResNet-18: Winograd on, nothing folded or fused);
* every distinct 3x3 stride-1 layer of ResNet-18 as ``Conv(bias) + Relu``, ``direct`` vs
  ``winograd`` (the tile hwc's Winograd pass picks);
* ``check``: the shipped Fashion-MNIST classifier with its weights, plus its input and ONNX
  Runtime's output, so the run proves the GPU computes what the model means;
* with ``--int8``: each model also as INT8 (``int8``: uint8 x int8 dp4a kernels, calibrated on
  random inputs: speed only), and the Fashion classifier FP32 and INT8 (calibrated on 512
  training images) at batch 100 with 2,000 test images: top-1 measured on the GPU.

The timed modules have their large float constants (weights, packed or Winograd-transformed
at build time) lifted into extra parameters (``lift_constants``), so an artifact is a few MB
of code; ``run`` fills them with random values on the GPU. Kernels and launch shapes are
exactly those of the normal build -- only the values differ, which does not change the time
of dense kernels.

``run`` needs TVM's runtime with CUDA support, which the apache-tvm wheel lacks:
``tools/gpu_runtime_bundle.sh`` makes ``.dev/site`` (the wheel's Python package and
``libtvm_runtime.so`` without the compiler, plus ``libtvm_cuda_ext.so``: TVM's
``src/backend/cuda/runtime`` compiled against the wheel's headers) and ``.dev/whl`` (the
apache-tvm-ffi wheel for the GPU machine's Python); BENCHMARKS.md ("GPU") has the commands. Timing: each variant's ``main`` is called
``--reps`` times between two device synchronizations, variants interleaved round-robin,
median over ``--rounds``; ratios are against the ``fused`` / ``direct`` variant of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MIN_LIFT_BYTES = 4096  # float constants at least this large become parameters
LAYERS = {"c64_56": (64, 56), "c128_28": (128, 28), "c256_14": (256, 14), "c512_7": (512, 7)}
ACCURACY_IMAGES, ACCURACY_BATCH = 2000, 100  # Fashion-MNIST test images top-1 is measured on


# ---------------------------------------------------------------------------- prepare (here)


def lift_constants(mod, min_bytes: int = MIN_LIFT_BYTES):
    """``mod`` with every float constant of ``main`` of at least ``min_bytes`` turned into an
    extra parameter of ``main`` (appended after the model inputs); returns (module, the lifted
    constants' values in parameter order)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.params, self.values = [], []

        def visit_generic_const_(self, op):
            shape, dtype = tuple(int(d) for d in op.ty.shape), str(op.ty.dtype)
            if not dtype.startswith("float") or int(np.prod(shape)) * np.dtype(dtype).itemsize < min_bytes:
                return op
            var = relax.Var(f"lifted{len(self.params)}", relax.TensorType(shape, dtype))
            self.params.append(var)
            self.values.append(op.value)
            return var

    lift = _Lift(mod)
    main = mod["main"]
    body = lift.visit_expr(main.body)
    func = relax.Function(list(main.params) + lift.params, body, main.ret_ty, main.is_pure, main.attrs)
    out = mod.clone()
    out["main"] = func
    return out, lift.values


def _zoo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(model, spec, optimize, shapes, lift: bool, recipe=None):
    """Export-ready executable of ``model`` built the way ``hwc build`` builds it."""
    from hwcompress import build as B
    from hwcompress.api import import_model

    front = import_model(model, spec, shapes, recipe=recipe, optimize=optimize)
    mod = B.schedule(B.legalize(front.mod, spec, fuse=optimize.fuse), spec)
    lifted = []
    if lift:
        mod, lifted = lift_constants(mod)
    return B.build(mod, spec), front.inputs, lifted


def prepare(out: Path, target: str, models: list[str], layers: bool, int8: bool = False) -> None:
    import onnxruntime as ort

    from hwcompress.backends import get_backend
    from hwcompress.optimize import Optimize
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe
    from hwcompress.targets import load_target

    sys.path.insert(0, str(ROOT / "tools"))
    from benchlib import conv_relu_model

    spec = load_target(target)
    backend = get_backend(spec)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"target": spec.name, "arch": spec.to_dict()["tvm"].get("arch"), "groups": []}

    def add(group: str, variant: str, model, optimize, shapes=None, lift=True, recipe=None):
        t0 = time.perf_counter()
        ex, inputs, lifted = _build(model, spec, optimize, shapes, lift, recipe)
        name = f"{group}-{variant}"
        backend.export(ex, out / f"{name}.so", spec)
        entry = {"name": name, "group": group, "variant": variant, "inputs": inputs,
                 "lifted": [{"shape": [int(d) for d in v.shape], "dtype": str(v.dtype)} for v in lifted]}
        plan["groups"].append(entry)
        size = (out / f"{name}.so").stat().st_size / 1e6
        print(f"built {name}: {len(lifted)} lifted params, {size:.1f} MB, {time.perf_counter() - t0:.0f} s", flush=True)
        return entry

    zoo = _zoo()
    shapes = {"input": (1, 3, 224, 224)}
    for name in models:
        model = getattr(zoo, name)()
        add(name, "fused", model, Optimize(winograd="off"), shapes)
        add(name, "unfused", model, Optimize(fold_bn=False, fuse=False, winograd="off"), shapes)
        if name == "resnet18":
            add(name, "winograd", model, Optimize(winograd="on"), shapes)
            add(name, "winograd-unfused", model, Optimize(fold_bn=False, fuse=False, winograd="on"), shapes)
        if int8:  # speed only: calibrated on random inputs (the zoo's weights are random too)
            calib = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
            add(name, "int8", model, Optimize(), shapes, recipe=Recipe((Int8Static(data=calib),)))
    if layers:
        for lname, (c, hw) in LAYERS.items():
            model = conv_relu_model(c, c, hw)
            add(lname, "direct", model, Optimize(winograd="off"))
            add(lname, "winograd", model, Optimize(winograd="on"))

    # numerics: the Fashion classifier with its weights, vs ONNX Runtime on its sample images
    import onnx

    check = onnx.load(str(ROOT / "examples" / "fashion_resnet.onnx"))
    x = np.load(ROOT / "examples" / "fashion_sample.npy")[:8].astype(np.float32)
    ref = ort.InferenceSession(check.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    for variant, opt in (("fused", Optimize(winograd="off")), ("winograd", Optimize(winograd="on"))):
        entry = add("check", variant, check, opt, {"input": x.shape}, lift=False)
        entry["check"] = {"input": "check_input.npy", "expected": "check_expected.npy"}
    np.save(out / "check_input.npy", x)
    np.save(out / "check_expected.npy", ref)
    if int8:  # top-1 on the GPU: FP32 and INT8 (calibrated on 512 training images) builds
        sys.path.insert(0, str(ROOT / "tools"))
        from tasks import load_task

        _path, calib, test_x, test_y = load_task("fashion")
        n = ACCURACY_IMAGES
        np.save(out / "acc_images.npy", test_x[:n])
        np.save(out / "acc_labels.npy", test_y[:n])
        for variant, recipe in (("fp32", None), ("int8", Recipe((Int8Static(data=calib),)))):
            entry = add("accuracy", variant, check, Optimize(), {"input": [ACCURACY_BATCH, 1, 28, 28]}, lift=False, recipe=recipe)
            entry["accuracy"] = {"images": "acc_images.npy", "labels": "acc_labels.npy", "batch": ACCURACY_BATCH}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"wrote {out / 'plan.json'}")


# ---------------------------------------------------------------------------- run (GPU machine)


def _load_cuda_runtime(site: Path):
    """TVM's runtime (no compiler) plus the CUDA device API and module loader."""
    import ctypes

    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    import tvm

    ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(site / "tvm" / "lib" / "libtvm_cuda_ext.so"), mode=ctypes.RTLD_GLOBAL)
    return tvm


def _torch_reference(groups: dict, rounds: int, reps: int) -> dict:
    """The same models (torchvision's ResNet-18 / MobileNetV2) and layers (Conv + ReLU) in
    PyTorch on cuDNN, FP32 with TF32 off, random weights: context for hwc's numbers."""
    try:
        import torch
        import torchvision
    except ImportError:
        return {}
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    nets = {}
    for name in groups:
        if name in ("resnet18", "mobilenet_v2"):
            nets[name] = (getattr(torchvision.models, name)(), (1, 3, 224, 224))
        elif name in LAYERS:
            c, hw = LAYERS[name]
            nets[name] = (torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU()), (1, c, hw, hw))
    out = {}
    with torch.no_grad():
        for name, (net, shape) in nets.items():
            net = net.eval().cuda()
            x = torch.randn(*shape, device="cuda")
            for _ in range(10):
                net(x)
            ts = []
            for _ in range(rounds):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    net(x)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) / reps)
            out[name] = statistics.median(ts)
    return out


def run(plan_dir: Path, site: Path, rounds: int, reps: int) -> dict:
    tvm = _load_cuda_runtime(site)
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA device visible to TVM's runtime")
    plan = json.loads((plan_dir / "plan.json").read_text())
    rng = np.random.default_rng(0)
    results = {"device": dev.device_name, "groups": {}}
    runners = {}
    for entry in plan["groups"]:
        lib = tvm.runtime.load_module(str(plan_dir / f"{entry['name']}.so"))
        vm = VirtualMachine(lib, dev)
        if "accuracy" in entry:
            acc = entry["accuracy"]
            images, labels = np.load(plan_dir / acc["images"]), np.load(plan_dir / acc["labels"])
            b = acc["batch"]
            pred = [vm["main"](tvm.runtime.tensor(images[i : i + b], dev)).numpy().argmax(1) for i in range(0, len(images) // b * b, b)]
            top1 = float((np.concatenate(pred) == labels[: len(pred) * b]).mean())
            results["groups"].setdefault("accuracy", {})[entry["variant"]] = {"top1": top1, "images": len(pred) * b}
            print(f"accuracy {entry['variant']}: top-1 {top1:.4f} on {len(pred) * b} Fashion-MNIST test images", flush=True)
            continue
        if "check" in entry:
            x = np.load(plan_dir / entry["check"]["input"])
            ref = np.load(plan_dir / entry["check"]["expected"])
            got = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            same = bool((got.argmax(1) == ref.argmax(1)).all())
            results["groups"].setdefault("check", {})[entry["variant"]] = {"rel_err": err, "same_top1": same}
            print(f"check {entry['variant']}: relative max error {err:.2e} vs ONNX Runtime, top-1 equal: {same}", flush=True)
            continue
        args = [tvm.runtime.tensor(rng.standard_normal(i["shape"]).astype(i["dtype"]), dev) for i in entry["inputs"]]
        args += [tvm.runtime.tensor((rng.standard_normal(p["shape"]) * 0.05).astype(p["dtype"]), dev) for p in entry["lifted"]]
        fn = vm["main"]

        def call(fn=fn, args=args):
            fn(*args)

        runners[entry["name"]] = (entry, call)
    times = {name: [] for name in runners}
    for _entry, call in runners.values():  # warm-up
        for _ in range(3):
            call()
    dev.sync()
    for _ in range(rounds):
        for name, (_entry, call) in runners.items():
            dev.sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            dev.sync()
            times[name].append((time.perf_counter() - t0) / reps)
    for name, (entry, _call) in runners.items():
        results["groups"].setdefault(entry["group"], {})[entry["variant"]] = {"ms": statistics.median(times[name]) * 1e3, "rounds_ms": [t * 1e3 for t in times[name]]}
    torch_ms = _torch_reference([g for g in results["groups"] if g not in ("check", "accuracy")], rounds, reps)
    for name, secs in torch_ms.items():
        results["groups"][name]["torch_cudnn"] = {"ms": secs * 1e3}
    return results


def table(results: dict) -> str:
    lines = [f"device: {results['device']}", "", "| group | variant | ms | x baseline |", "|---|---|---:|---:|"]
    for group, variants in results["groups"].items():
        if group in ("check", "accuracy"):
            continue
        base = variants.get("fused", variants.get("direct"))
        for variant, r in variants.items():
            ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
            lines.append(f"| {group} | {variant} | {r['ms']:.3f} | {ratio} |")
    lines.append("")
    lines.append("x baseline: baseline time / variant time (> 1: the variant is faster); baseline = fused (models) or direct (layers)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", required=True, help="a CUDA target name or TOML path (the GPU's arch)")
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--int8", action="store_true", help="also INT8 builds (speed per model; top-1 of the Fashion classifier)")
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_gpu_int8 import add_run_args

    add_run_args(sub.add_parser("run"), reps=20)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        sys.path.insert(0, str(ROOT))
        prepare(args.out, args.target, [m for m in args.models.split(",") if m], not args.no_layers, args.int8)
        return 0
    results = run(args.plan_dir, args.site, args.rounds, args.reps)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
