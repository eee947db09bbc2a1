"""GPU check of the CUDA INT8 kernels (``backends/cuda_int8``): bit-exact results and time
against the FP32 build of the same layer, on a lent GPU machine that has no TVM compiler.

    # here (TVM compiler, nvcc): build every module for the GPU's arch
    .venv/bin/python tools/bench_gpu_int8.py prepare --out .dev/int8 --target cuda-sm90
    # on the GPU machine (python3 + numpy, TVM's runtime only: see tools/bench_gpu.py)
    python3 tools/bench_gpu_int8.py run .dev/int8 --rounds 7 --reps 50

``prepare`` builds, for each layer of ``LAYERS`` (ResNet-18-like convs and a classifier):

* ``int8``: the uint8 x int8 -> int32 layer (``relax.nn.conv2d`` / ``relax.matmul``), built
  the way ``hwc build`` builds (``build.legalize`` -> ``build.schedule`` -> ``build.build``,
  nvcc cubins), the weight a constant; a random input and the numpy int64 result;
* ``fp32``: the same layer in float32, hwc's default CUDA schedule; ``fp32-winograd`` for 3x3
  stride-1 convs (the ``winograd`` pass, on by default for ``cuda-sm90``); their weights are
  lifted into parameters (``bench_gpu.lift_constants``) and random on the GPU (timing only);
* extras checked for exactness: the c64_56 conv with a fused per-channel requantization to
  uint8 (``int8-requant``) and with zero-point padding (``nn.pad`` + unpadded conv, ``int8-zp``);
* with ``--variants``: the int8 kernel alone (a TIR module taking the packed weight) for
  several tiles, to choose ``cuda_int8.choose_tile``'s rules from.

``run`` checks every int8 module bit-exact against numpy's int64 result and times
them interleaved: ``--rounds`` rounds, each variant ``--reps`` calls between two device
synchronizations (TVM's ``time_evaluator``), median over rounds. Times include the launch:
for a kernel shorter than its launch (a few us) the launch is what is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# name: (N, C, H, W), (O, K), stride, pad  -- or (M, K), N for dense
LAYERS = {
    "c64_56": ((1, 64, 56, 56), (64, 3), 1, 1),
    "c128_28s2": ((1, 64, 56, 56), (128, 3), 2, 1),
    "c256_14": ((1, 256, 14, 14), (256, 3), 1, 1),
    "c512x2048_7": ((1, 512, 7, 7), (2048, 1), 1, 0),
    "stem": ((1, 3, 224, 224), (64, 7), 2, 3),
    "dense": ((1, 512), 1000),
}
ZERO_POINT = 131


# ---------------------------------------------------------------------------- references


def conv_ref(data, w_oihw, stride: int, pad: int, pad_value: int = 0):
    """NCHW x OIHW conv in int64 / float64 (by the input's kind)."""
    acc = np.float64 if data.dtype.kind == "f" else np.int64
    x = np.pad(data.astype(acc), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=pad_value)
    o, _, kh, kw = w_oihw.shape
    out_h, out_w = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], o, out_h, out_w), acc)
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, :, ky : ky + (out_h - 1) * stride + 1 : stride, kx : kx + (out_w - 1) * stride + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, w_oihw[:, :, ky, kx].astype(acc))
    return out


def requant_ref(acc, scale):
    """The epilogue ``int8-requant`` fuses: float32 scale per channel, round, +128, clip, uint8."""
    y = np.round(acc.astype(np.float32) * scale.reshape(1, -1, 1, 1)) + np.float32(128)
    return np.clip(y, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- prepare (here)


def _module(layer: str, dtype: str, weight, requant=None, zero_point: int | None = None):
    """Relax ``main(x)`` of one layer: ``dtype`` float32 or uint8 (int8 weight, int32 out)."""
    from tvm import relax

    shape, _, stride, pad = LAYERS[layer] if layer != "dense" else (LAYERS[layer][0], None, 1, 0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    out_dtype = "int32" if dtype == "uint8" else "float32"
    with bb.function("main", [x]):
        with bb.dataflow():
            if layer == "dense":
                y = bb.emit(relax.op.matmul(x, relax.const(weight), out_dtype=out_dtype))
            else:
                data = x
                if zero_point is not None:
                    data = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, pad, pad, pad, pad], pad_value=float(zero_point)))
                    pad = 0
                y = bb.emit(relax.op.nn.conv2d(data, relax.const(weight), strides=stride, padding=pad, out_dtype=out_dtype))
            if requant is not None:
                y = bb.emit(relax.op.astype(y, "float32"))
                y = bb.emit(relax.op.round(relax.op.multiply(y, relax.const(requant.reshape(1, -1, 1, 1)))))
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(y, relax.const(np.float32(128))), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _layer_data(layer: str, rng):
    """(uint8 input, int8 weight OIHW / [K, N])."""
    if layer == "dense":
        (m, k), n = LAYERS[layer]
        return rng.integers(0, 256, (m, k), dtype=np.uint8), rng.integers(-128, 128, (k, n), dtype=np.int8)
    shape, (o, k), _, _ = LAYERS[layer]
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(-128, 128, (o, shape[1], k, k), dtype=np.int8)


def _int_ref(layer: str, x, w, pad_value: int = 0):
    if layer == "dense":
        return x.astype(np.int64) @ w.astype(np.int64)
    _, _, stride, pad = LAYERS[layer]
    return conv_ref(x, w, stride, pad, pad_value)


# tiles tried with --variants: (tp, to, vp, vo, step, splits)
_VARIANTS = {
    "conv": [(64, 64, 4, 4, 16, 1), (32, 64, 4, 4, 16, 1), (32, 32, 4, 4, 16, 1), (32, 32, 4, 4, 8, 1), (16, 16, 2, 2, 16, 1),
             (64, 64, 4, 4, 16, 2), (64, 64, 4, 4, 16, 4), (32, 32, 4, 4, 16, 2), (32, 32, 4, 4, 16, 4), (32, 64, 4, 4, 16, 4)],
    "dense": [(1, 64, 1, 1, 16, 1), (1, 64, 1, 1, 16, 2), (1, 64, 1, 1, 16, 4), (1, 64, 1, 1, 16, 8), (1, 32, 1, 1, 16, 8),
              (1, 128, 1, 2, 16, 4)],
}


def _variant_module(layer: str, x, w, tile, spec):
    """The int8 kernel alone for ``tile``: TIR ``main(data, packed weight, out)``."""
    import tvm
    from tvm import s_tir, te

    from hwcompress.backends import cuda as cuda_backend
    from hwcompress.backends import cuda_int8 as C

    if layer == "dense":
        packed = C.pack_dense_weight(w, tile.k4_multiple, tile.to)
    else:
        packed = C.pack_conv_weight(w, tile.k4_multiple, tile.to)
    data = te.placeholder(x.shape, "uint8", "data")
    weight = te.placeholder(packed.shape, "int8", "weight")
    if layer == "dense":
        out = C.dense_int8(data, weight, tile, w.shape[1])
    else:
        _, (_, k), stride, pad = LAYERS[layer]
        out = C.conv2d_nchw_int8(data, weight, (k, k), (stride, stride), (pad,) * 4, (1, 1), tile, w.shape[0])
    sch = s_tir.Schedule(te.create_prim_func([data, weight, out]))
    if not C.schedule_int8(sch):
        raise RuntimeError(f"{layer}: not scheduled")
    with cuda_backend.codegen_context(spec):
        ex = tvm.compile(sch.mod, target=spec.tvm_target())
    return ex, packed


def prepare(out: Path, target: str, variants: bool, layers: list[str]) -> None:
    from hwcompress import build as B
    from hwcompress.backends import get_backend
    from hwcompress.backends import cuda_int8 as C
    from hwcompress.passes.winograd import winograd
    from hwcompress.targets import load_target

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_gpu import lift_constants

    spec = load_target(target)
    backend = get_backend(spec)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"target": spec.name, "modules": []}
    rng = np.random.default_rng(0)

    def save(name: str, array) -> str:
        np.save(out / f"{name}.npy", array)
        return f"{name}.npy"

    def add(layer, variant, ex, inputs, expected=None, kind="vm", tile=None):
        t0 = time.perf_counter()
        name = f"{layer}-{variant}"
        backend.export(ex, out / f"{name}.so", spec)
        plan["modules"].append({"name": name, "layer": layer, "variant": variant, "kind": kind, "inputs": inputs,
                                "expected": expected, "tile": tile})
        print(f"built {name} ({(out / f'{name}.so').stat().st_size / 1e3:.0f} kB, {time.perf_counter() - t0:.0f} s export)", flush=True)

    def build(mod):
        return B.build(B.schedule(B.legalize(mod, spec), spec), spec)

    for layer in layers:
        t0 = time.perf_counter()
        x, w = _layer_data(layer, rng)
        ref = _int_ref(layer, x, w)
        x_file, ref_file = save(f"{layer}-x", x), save(f"{layer}-int8-expected", ref.astype(np.int32))
        mod = B.schedule(B.legalize(_module(layer, "uint8", w), spec), spec)
        add(layer, "int8", B.build(mod, spec), [x_file], ref_file, tile=_tile_of(mod, C.TILE_ATTR))
        print(f"  int8 build {time.perf_counter() - t0:.0f} s", flush=True)
        wf = (rng.standard_normal(w.shape) * 0.05).astype(np.float32)
        for variant, fp32 in (("fp32", _module(layer, "float32", wf)), ("fp32-winograd", None)):
            if variant == "fp32-winograd":
                if layer == "dense" or LAYERS[layer][1][1] != 3 or LAYERS[layer][2] != 1:
                    continue
                fp32 = winograd(_module(layer, "float32", wf), spec=spec)
            # float weights lifted to parameters, random on the GPU: the timing is the same
            lifted, values = lift_constants(B.schedule(B.legalize(fp32, spec), spec))
            inputs = [{"random": list(x.shape), "dtype": "float32"}]
            inputs += [{"random": [int(d) for d in v.shape], "dtype": str(v.dtype)} for v in values]
            add(layer, variant, B.build(lifted, spec), inputs)
        if layer == "c64_56":
            scale = ((np.arange(w.shape[0]) % 7 + 1) * 2e-5).astype(np.float32)
            add(layer, "int8-requant", build(_module(layer, "uint8", w, requant=scale)), [x_file],
                save(f"{layer}-requant-expected", requant_ref(ref, scale)))
            zp_ref = _int_ref(layer, x, w, ZERO_POINT).astype(np.int32)
            add(layer, "int8-zp", build(_module(layer, "uint8", w, zero_point=ZERO_POINT)), [x_file], save(f"{layer}-zp-expected", zp_ref))
        if variants and spec.kind == "cuda":
            out_shape = list(ref.shape)
            for values in _VARIANTS["dense" if layer == "dense" else "conv"]:
                tile = C.GemmTile(*values)
                try:
                    ex, packed = _variant_module(layer, x, w, tile, spec)
                except Exception as e:  # noqa: BLE001 -- a tile that does not fit this layer
                    print(f"  skip {layer} {values}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
                w_file = save(f"{layer}-w{packed.shape[0]}x{packed.shape[1]}", packed)
                add(layer, "v" + "_".join(map(str, values)), ex, [x_file, w_file, {"zeros": out_shape, "dtype": "int32"}],
                    ref_file, kind="tir", tile=list(values))
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"wrote {out / 'plan.json'}")


def _tile_of(mod, attr: str):
    for func in mod.functions.values():
        script = func.script() if hasattr(func, "script") else ""
        if attr in script:
            line = script[script.index(attr) :].split("]", 1)[0]
            return [int(v) for v in line.split("[", 1)[1].split(",")]
    return None


# ---------------------------------------------------------------------------- run (GPU machine)


def _timer(module, name: str, dev, reps: int):
    """``f(*args)`` -> seconds per call of ``module[name]``: TVM's ``time_evaluator`` (a C++
    loop between two device synchronizations), a Python loop where the runtime lacks it."""
    try:
        evaluator = module.time_evaluator(name, dev, number=reps, repeat=1)
        return lambda *args: evaluator(*args).mean
    except Exception:  # noqa: BLE001
        func = module[name]

        def loop(*args):
            dev.sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                func(*args)
            dev.sync()
            return (time.perf_counter() - t0) / reps

        return loop


def host_input(spec, plan_dir: Path, rng, scale: float = 0.1) -> np.ndarray:
    """A module argument from its plan entry: ``{"zeros": shape, "dtype"}``, ``{"random": shape,
    "dtype"}`` (integers: uniform over the type's range, at least -127; floats: normal times
    ``scale``) or the name of a ``.npy`` file in ``plan_dir``."""
    if isinstance(spec, dict) and "zeros" in spec:
        return np.zeros(spec["zeros"], spec["dtype"])
    if isinstance(spec, dict) and np.dtype(spec["dtype"]).kind in "iu":
        info = np.iinfo(spec["dtype"])
        return rng.integers(max(info.min, -127), info.max, spec["random"], endpoint=True).astype(spec["dtype"])
    if isinstance(spec, dict):
        return (rng.standard_normal(spec["random"]) * scale).astype(spec["dtype"])
    return np.load(plan_dir / spec)


def time_interleaved(timers: dict, rounds: int) -> dict:
    """``{name: (timer, args)}`` -> ``{name: [seconds per call, one per round]}``, every
    module timed once per round in turn (the machine's drift spreads over all of them)."""
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, (timer, args) in timers.items():
            times[name].append(timer(*args))
    return times


def add_run_args(parser, reps: int) -> None:
    """The options of a GPU tool's ``run`` (the plan directory, the runtime bundle, timing)."""
    parser.add_argument("plan_dir", type=Path)
    parser.add_argument("--site", type=Path, default=ROOT / ".dev" / "site")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--json", type=Path, default=None)


def run(plan_dir: Path, site: Path, rounds: int, reps: int, device: str = "cuda") -> dict:
    """Check and time every module of ``plan_dir`` (``device="cpu"``: a plan built for the
    host, to try this runner where there is no GPU)."""
    if device == "cuda":
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_gpu import _load_cuda_runtime

        tvm = _load_cuda_runtime(site)
        dev = tvm.cuda(0)
        if not dev.exist:
            raise SystemExit("no CUDA device visible to TVM's runtime")
    else:
        import tvm

        dev = tvm.cpu(0)
    from tvm.runtime.vm import VirtualMachine

    plan = json.loads((plan_dir / "plan.json").read_text())
    results = {"device": dev.device_name, "modules": {}}
    timers = {}
    rng = np.random.default_rng(0)
    for entry in plan["modules"]:
        name = entry["name"]
        lib = tvm.runtime.load_module(str(plan_dir / f"{name}.so"))
        args = [tvm.runtime.tensor(host_input(spec, plan_dir, rng), dev) for spec in entry["inputs"]]
        if entry["kind"] == "vm":
            vm = VirtualMachine(lib, dev)
            got = vm["main"](*args).numpy()
            timer = _timer(vm, "main", dev, reps)
        else:
            lib["main"](*args)
            got = args[-1].numpy()
            timer = _timer(lib, "main", dev, reps)
        check = {}
        if entry["expected"]:
            expected = np.load(plan_dir / entry["expected"])
            same_shape = got.shape == expected.shape
            check = {"exact": bool(same_shape and np.array_equal(got, expected)),
                     "mismatches": int((got != expected).sum()) if same_shape else -1}
        results["modules"][name] = {**{k: entry[k] for k in ("layer", "variant", "tile")}, **check}
        print(f"{name}: {check}", flush=True)
        timers[name] = (timer, args)
    for name, ts in time_interleaved(timers, rounds).items():
        results["modules"][name]["ms"] = statistics.median(ts) * 1e3
        results["modules"][name]["rounds_ms"] = [t * 1e3 for t in ts]
    return results


def table(results: dict) -> str:
    lines = [f"device: {results['device']}", "", "| layer | variant | tile | int8 result | ms | fp32 / this |", "|---|---|---|---|---:|---:|"]
    mods = results["modules"]
    for name, r in mods.items():
        base = mods.get(f"{r['layer']}-fp32")
        ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        check = "-" if "exact" not in r else ("exact" if r["exact"] else f"WRONG ({r['mismatches']})")
        lines.append(f"| {r['layer']} | {r['variant']} | {r['tile']} | {check} | {r['ms']:.4f} | {ratio} |")
    lines += ["", "fp32 / this: time of the layer's fp32 build (hwc default CUDA schedule) / this module's (> 1: faster)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", default="cuda-sm90", help="a CUDA target name or TOML path (the GPU's arch)")
    p.add_argument("--variants", action="store_true", help="also the int8 kernel alone for several tiles")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of LAYERS")
    r = sub.add_parser("run")
    add_run_args(r, reps=50)
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: try the runner on a host-built plan")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        sys.path.insert(0, str(ROOT))
        prepare(args.out, args.target, args.variants, [name for name in args.layers.split(",") if name])
        return 0
    results = run(args.plan_dir, args.site, args.rounds, args.reps, args.device)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("exact", True) for r in results["modules"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
