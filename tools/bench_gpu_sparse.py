"""GPU check of the 2:4 sparse tensor-core kernel (``backends/cuda_sparse``, ``mma.sp``): its
results against numpy and its time against dense kernels, on a lent GPU machine that has no
TVM compiler.

    # here (TVM compiler, nvcc): build every module for the GPU's arch
    .venv/bin/python tools/bench_gpu_sparse.py prepare --out .dev/sparse --target cuda-sm90
    # on the GPU machine (python3 + numpy, TVM's runtime only: see tools/bench_gpu.py)
    python3 tools/bench_gpu_sparse.py run .dev/sparse --rounds 7 --reps 50

``prepare`` builds, for each ``MxNxK`` of ``SHAPES`` (``y = x @ W.T``, ``W [N, K]`` 2:4):

* ``fp32``: the matmul by a constant weight as ``hwc build`` builds it for the target
  (``build.legalize`` -> ``build.schedule`` -> ``build.build``: float32 on CUDA cores), the
  weight lifted into a parameter (``bench_gpu.lift_constants``) and random on the GPU;
* ``f16``: ``cuda_sparse.dense_f16_kernel_cuda``, the sparse kernel's dense twin (same tiles
  and threads, ``mma.sync.m16n8k16`` on the dense weight): what 2:4 itself gains on tensor
  cores, apart from float32 -> float16 tensor cores;
* ``sparse``: ``cuda_sparse.sparse24_kernel_cuda`` (``mma.sp``) on the compressed weight
  (``values`` random on the GPU, ``meta`` of a real 2:4 mask from a file);
* ``gemv`` (up to ``GEMV_MAX_ROWS`` rows): ``cuda_sparse.sparse24_gemv_cuda``, the same
  operands on CUDA cores (a warp per output channel).

``run`` checks ``f16`` and ``sparse`` against numpy's float64 product of the same operands
(the weight decompressed from ``values`` + ``meta``), within the float16 rounding bound of the
tests (``tests/targets/test_cuda_sparse.py``), and times every module interleaved (``--rounds``
rounds of ``--reps`` calls between two synchronizations, median); ratios are against ``fp32``
and ``f16`` of the same shape.

With ``--accuracy`` (default on) it also builds the MNIST CNN (``tools/tasks.py`` digits) and
the Fashion-MNIST classifier for the target as FP32 (its defaults) and with
``Sparse24(decide="all", permute=False)`` in NHWC (every eligible layer 2:4, on ``mma.sp``
through ``hwc build``'s own lowering; the sparse kernels take NHWC convs), real weights, and measures top-1 on their test images on the GPU: the
whole path (pruning, compression, im2col, kernel, layout) checked on real data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# (M, N, K): batch-1 dense layers 512-4096 wide, batched GEMVs, 1x1 convs (M = H x W), GEMMs
SHAPES = [
    (1, 512, 512), (1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 1000, 2048),
    (2, 4096, 4096), (4, 1024, 1024), (4, 4096, 4096),
    (8, 1024, 1024), (8, 4096, 4096), (16, 1024, 1024), (16, 4096, 4096), (32, 2048, 2048),
    (49, 2048, 512), (49, 512, 2048), (196, 1024, 256), (784, 512, 128),
    (256, 4096, 4096), (1024, 4096, 4096),
]  # fmt: skip
# tiles (tn, tm, wn, wm) tried with --tiles, for both the 2:4 kernel and its f16 twin
TILES_GEMV = [(1, 1, 2, 1), (1, 1, 4, 1), (1, 1, 8, 1), (2, 1, 4, 1), (2, 1, 2, 1)]
TILES_GEMM = [(2, 2, 2, 2), (4, 2, 2, 2), (2, 4, 2, 2), (4, 4, 2, 2), (2, 2, 4, 2), (2, 2, 2, 4)]
GEMV_MAX_ROWS = 8  # shapes with at most this many rows also get the CUDA-core 2:4 GEMV
GEMV_BLOCK_ROWS = [2, 4, 8]  # its output channels per block tried with --tiles
ACCURACY = {"digits": 4400, "fashion": 2000}  # task: test images top-1 is measured on
ACC_BATCH = 100


def _mask24():
    """``hwcompress.passes.sparsity.mask24`` (numpy only) without importing the package (the
    GPU machine has TVM's runtime, not its compiler)."""
    path = ROOT / "hwcompress" / "passes" / "sparsity" / "mask24.py"
    spec = importlib.util.spec_from_file_location("_hwc_mask24", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


def fp16_tol(k: int) -> float:
    """Absolute bound on ``|y - x @ W.T|`` for N(0, 1) ``x``, ``W`` of scale ``w_scale = 1``:
    operands rounded to f16 (2^-11), k products, random-walk growth, 8 sigma (the tests')."""
    return 8 * 2**-11 * np.sqrt(2 * k)


def _name(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------- prepare (here)


def _matmul_module(w_nk: np.ndarray, m: int):
    """Relax ``main(x [m, K]) = x @ B`` with ``B = W.T`` a constant: an ONNX MatMul."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((m, w_nk.shape[1]), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(np.ascontiguousarray(w_nk.T))))
        bb.emit_func_output(out)
    return bb.get()


def _compile_tir(func, spec):
    import tvm

    from hwcompress.backends import cuda as cuda_backend

    with cuda_backend.codegen_context(spec):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm_target())


def prepare(out: Path, target: str, shapes: list[tuple[int, int, int]], accuracy: bool, tiles: bool = False) -> None:
    from hwcompress import build as B
    from hwcompress.backends import cuda_sparse as S
    from hwcompress.backends import get_backend
    from hwcompress.passes.sparsity import mask24
    from hwcompress.targets import load_target

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_gpu import lift_constants

    spec = load_target(target)
    if spec.kind != "cuda":
        raise SystemExit(f"{target}: not a CUDA target")
    backend = get_backend(spec)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"target": spec.name, "arch": spec.tvm.get("arch"), "modules": []}
    rng = np.random.default_rng(0)

    def add(shape, variant, ex, inputs, kind, check=None, tile=None):
        name = f"{_name(shape)}-{variant}" + ("-t" + "".join(map(str, tile)) if tile else "")
        backend.export(ex, out / f"{name}.so", spec)
        plan["modules"].append({"name": name, "shape": list(shape), "variant": variant, "kind": kind, "inputs": inputs,
                                "check": check, "tile": list(tile) if tile else None})
        print(f"built {name} ({(out / f'{name}.so').stat().st_size / 1e3:.0f} kB)", flush=True)

    for m, n, k in shapes:
        shape = (m, n, k)
        w = rng.standard_normal((n, k)).astype(np.float32)
        w *= mask24.mask_2to4(w)
        meta_file = f"{_name(shape)}-meta.npy"
        np.save(out / meta_file, mask24.compress(w).meta)
        x_in = {"random": [m, k], "dtype": "float32"}
        lifted, values = lift_constants(B.schedule(B.legalize(_matmul_module(w, m), spec), spec))
        inputs = [x_in] + [{"random": [int(d) for d in v.shape], "dtype": str(v.dtype)} for v in values]
        add(shape, "fp32", B.build(lifted, spec), inputs, "vm")
        f16_in = [x_in, {"random": [n, k], "dtype": "float32"}, {"zeros": [m, n], "dtype": "float32"}]
        sparse_in = [x_in, {"random": [n, k // 2], "dtype": "float32"}, meta_file, {"zeros": [m, n], "dtype": "float32"}]
        if m <= GEMV_MAX_ROWS and k % 8 == 0:  # the CUDA-core GEMV, rows (warps) per block
            for rows in [S.GEMV_ROWS] + ([r for r in GEMV_BLOCK_ROWS if r != S.GEMV_ROWS] if tiles else []):
                variant = "gemv" if rows == S.GEMV_ROWS else f"gemv-r{rows}"
                add(shape, variant, _compile_tir(S.sparse24_gemv_cuda(m, n, k, rows), spec), sparse_in, "tir", "sparse")
        for tile in [None] + ((TILES_GEMV if m <= 8 else TILES_GEMM) if tiles else []):
            t = S.SparseTile(*tile) if tile else None
            add(shape, "f16", _compile_tir(S.dense_f16_kernel_cuda(m, n, k, t), spec), f16_in, "tir", "dense", tile)
            add(shape, "sparse", _compile_tir(S.sparse24_kernel_cuda(m, n, k, spec.tvm_target(), t), spec), sparse_in, "tir", "sparse", tile)
    if accuracy:
        _prepare_accuracy(out, spec, plan, backend)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"wrote {out / 'plan.json'}")


def _prepare_accuracy(out: Path, spec, plan: dict, backend) -> None:
    """FP32 and 2:4 (every eligible layer) builds of the two reference classifiers, real
    weights, batch ``ACC_BATCH``, with their test images."""
    import onnx

    from hwcompress import build as B
    from hwcompress.api import import_model
    from hwcompress.optimize import Optimize
    from hwcompress.passes import Sparse24
    from hwcompress.passes.sparsity import sparsity_report
    from hwcompress.recipe import Recipe
    from tasks import load_task

    plan["accuracy"] = []
    for task, count in ACCURACY.items():
        path, _calib, test_x, test_y = load_task(task)
        count = min(count, len(test_x)) // ACC_BATCH * ACC_BATCH
        np.save(out / f"{task}-images.npy", test_x[:count])
        np.save(out / f"{task}-labels.npy", test_y[:count])
        model = onnx.load(str(path))
        name_in = model.graph.input[0].name
        sparse = Recipe((Sparse24(decide="all", permute=False),))
        # the sparse kernels take NHWC convs; CUDA targets build NCHW by default. "sparse-b1":
        # one image per call, the matmuls one-row GEMMs (the 2:4 GEMV kernel)
        variants = [("fp32", None, Optimize(), ACC_BATCH), ("sparse", sparse, Optimize(layout="NHWC"), ACC_BATCH)]
        if task == "digits":
            variants.append(("sparse-b1", sparse, Optimize(layout="NHWC"), 1))
        for variant, recipe, optimize, batch in variants:
            t0 = time.perf_counter()
            front = import_model(model, spec, {name_in: [batch, *test_x.shape[1:]]}, recipe=recipe, optimize=optimize)
            layers = sparsity_report(front.mod)["sparse_layers"] if recipe else 0
            ex = B.build(B.schedule(B.legalize(front.mod, spec), spec), spec)
            name = f"{task}-{variant}"
            backend.export(ex, out / f"{name}.so", spec)
            plan["accuracy"].append({"name": name, "task": task, "variant": variant, "sparse_layers": layers,
                                     "images": f"{task}-images.npy", "labels": f"{task}-labels.npy", "batch": batch})
            print(f"built {name}: {layers} layers 2:4, {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------- run (GPU machine)


def _reference(kind: str, host: list, mask24) -> np.ndarray:
    """float64 ``x @ W.T`` of a module's operands (``W`` decompressed for ``sparse``)."""
    x = host[0].astype(np.float64)
    if kind == "dense":
        return x @ host[1].astype(np.float64).T
    values, meta = host[1], host[2]
    w = mask24.decompress(mask24.Compressed(values=values, meta=meta, k=x.shape[1]))
    return x @ w.astype(np.float64).T


def run(plan_dir: Path, site: Path, rounds: int, reps: int) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_gpu import _load_cuda_runtime
    from bench_gpu_int8 import _timer, host_input, time_interleaved

    tvm = _load_cuda_runtime(site)
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA device visible to TVM's runtime")
    mask24 = _mask24()
    plan = json.loads((plan_dir / "plan.json").read_text())
    results = {"device": dev.device_name, "arch": plan["arch"], "modules": {}, "accuracy": {}}
    rng = np.random.default_rng(0)
    timers = {}
    for entry in plan["modules"]:
        name = entry["name"]
        lib = tvm.runtime.load_module(str(plan_dir / f"{name}.so"))
        host = [host_input(spec, plan_dir, rng, scale=1.0) for spec in entry["inputs"]]
        args = [tvm.runtime.tensor(a, dev) for a in host]
        record = {"shape": entry["shape"], "variant": entry["variant"], "tile": entry.get("tile")}
        if entry["kind"] == "vm":
            vm = VirtualMachine(lib, dev)
            vm["main"](*args)
            timer = _timer(vm, "main", dev, reps)
        else:
            lib["main"](*args)
            timer = _timer(lib, "main", dev, reps)
            if entry["check"]:
                got = args[-1].numpy().astype(np.float64)
                err = float(np.abs(got - _reference(entry["check"], host, mask24)).max())
                tol = fp16_tol(entry["shape"][2])
                record.update(max_abs_err=err, tolerance=tol, ok=bool(err <= tol))
                print(f"{name}: max |err| {err:.3g} (bound {tol:.3g}) {'ok' if err <= tol else 'WRONG'}", flush=True)
        results["modules"][name] = record
        timers[name] = (timer, args)
    for name, ts in time_interleaved(timers, rounds).items():
        results["modules"][name]["ms"] = statistics.median(ts) * 1e3
        results["modules"][name]["rounds_ms"] = [t * 1e3 for t in ts]
    for entry in plan.get("accuracy", []):
        vm = VirtualMachine(tvm.runtime.load_module(str(plan_dir / f"{entry['name']}.so")), dev)
        images, labels = np.load(plan_dir / entry["images"]), np.load(plan_dir / entry["labels"])
        b = entry["batch"]
        pred = np.concatenate([vm["main"](tvm.runtime.tensor(images[i : i + b], dev)).numpy().argmax(1) for i in range(0, len(images), b)])
        top1 = float((pred == labels).mean())
        results["accuracy"][entry["name"]] = {**{k: entry[k] for k in ("task", "variant", "sparse_layers")}, "top1": top1, "images": len(labels)}
        print(f"accuracy {entry['name']}: top-1 {top1:.4f} on {len(labels)} test images ({entry['sparse_layers']} layers 2:4)", flush=True)
    return results


def table(results: dict) -> str:
    lines = [f"device: {results['device']} ({results['arch']} code)", "",
             "| MxNxK | fp32 ms | f16 ms | 2:4 ms | fp32 / 2:4 | f16 / 2:4 | 2:4 result | 2:4 GEMV ms | fp32 / GEMV | GEMV result |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    mods = results["modules"]
    for shape in dict.fromkeys(_name(r["shape"]) for r in mods.values()):
        fp32, f16, sp = (mods.get(f"{shape}-{v}") for v in ("fp32", "f16", "sparse"))
        if not (fp32 and f16 and sp):
            continue
        check = "ok" if sp.get("ok") else "WRONG"
        if not f16.get("ok"):
            check += " (f16 twin WRONG)"
        gemv = mods.get(f"{shape}-gemv")
        tail = (f" {gemv['ms']:.4f} | {fp32['ms'] / gemv['ms']:.2f}x | {'ok' if gemv.get('ok') else 'WRONG'} |" if gemv
                else " | | |")
        lines.append(f"| {shape} | {fp32['ms']:.4f} | {f16['ms']:.4f} | {sp['ms']:.4f} | {fp32['ms'] / sp['ms']:.2f}x | "
                     f"{f16['ms'] / sp['ms']:.2f}x | {check} (max err {sp['max_abs_err']:.2g}) |" + tail)
    lines += ["", "x / 2:4: that kernel's time / the 2:4 kernel's (> 1: 2:4 is faster); fp32 = hwc's dense CUDA build,"
              " f16 = the 2:4 kernel's dense twin on tensor cores; default tiles (choose_tile)"]
    tiled = [r for r in mods.values() if r.get("tile")]
    lines_gemv = []
    if tiled:
        lines += ["", "Best tile of each kernel (default tile included):", "",
                  "| MxNxK | f16 best ms (tile) | 2:4 best ms (tile) | 2:4 default ms | f16 best / 2:4 best | all results ok |",
                  "|---|---:|---:|---:|---:|---|"]
        for shape in dict.fromkeys(_name(r["shape"]) for r in tiled):
            rows = [r for r in mods.values() if _name(r["shape"]) == shape]
            # a wrong result is no candidate (its time says nothing)
            best = {v: min((r for r in rows if r["variant"] == v and r.get("ok")), key=lambda r: r["ms"], default=None)
                    for v in ("f16", "sparse")}
            gemvs = [r for r in rows if r["variant"].startswith("gemv") and r.get("ok")]
            if gemvs:
                g = min(gemvs, key=lambda r: r["ms"])
                lines_gemv.append(f"| {shape} | " + " | ".join(f"{r['variant']} {r['ms']:.4f}" for r in gemvs) + f" | {g['variant']} |")
            if None in best.values():
                lines.append(f"| {shape} | no correct result | | | | False |")
                continue
            default = next(r for r in rows if r["variant"] == "sparse" and not r.get("tile"))
            ok = all(r.get("ok", True) for r in rows)
            lines.append(f"| {shape} | {best['f16']['ms']:.4f} ({best['f16'].get('tile') or 'default'}) | "
                         f"{best['sparse']['ms']:.4f} ({best['sparse'].get('tile') or 'default'}) | {default['ms']:.4f} | "
                         f"{best['f16']['ms'] / best['sparse']['ms']:.2f}x | {ok} |")
        if lines_gemv:
            lines += ["", "2:4 GEMV by output channels per block (correct results only):", "", "| MxNxK | variants ms | best |",
                      "|---|---|---|", *lines_gemv]
    if results.get("accuracy"):
        lines += ["", "| model | variant | 2:4 layers | top-1 (GPU) | images |", "|---|---|---:|---:|---:|"]
        for r in results["accuracy"].values():
            lines.append(f"| {r['task']} | {r['variant']} | {r['sparse_layers']} | {100 * r['top1']:.2f}% | {r['images']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", default="cuda-sm90", help="a CUDA target name or TOML path (the GPU's arch, sm_80+)")
    p.add_argument("--shapes", default=",".join(_name(s) for s in SHAPES), help="comma-separated MxNxK")
    p.add_argument("--no-accuracy", action="store_true", help="skip the two classifiers")
    p.add_argument("--tiles", action="store_true", help="also both kernels with the tiles of TILES_GEMV / TILES_GEMM")
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_gpu_int8 import add_run_args

    add_run_args(sub.add_parser("run"), reps=50)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        sys.path.insert(0, str(ROOT))
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
        prepare(args.out, args.target, shapes, not args.no_accuracy, args.tiles)
        return 0
    results = run(args.plan_dir, args.site, args.rounds, args.reps)
    if args.json:  # before the table: the raw results survive a table that fails
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    ok = all(r.get("ok", True) for r in results["modules"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
