"""Inverted-residual blocks as one kernel (``backends.cpu_block``) vs three kernels.

    python tools/bench_blocks.py layers [--threads 1] [--rounds 15] [--all]
    python tools/bench_blocks.py model [--threads 2] [--rounds 30] [--runs 3]

``layers``: each of MobileNetV2's inverted-residual block shapes (batch 1, 224x224 input) built
through ``build.legalize`` twice, ``blocks=False`` (expand, depthwise and project kernels, each
with its bias, clip and residual add: what hwc builds without the fused kernel) and with the
fused kernel (the size rule bypassed), timed interleaved in one process, warm (the same input
again and again: the three-kernel build's intermediates stay in cache, which favours it), with
the max difference between the two. ``--all`` also times the blocks below the size rule.

``model``: MobileNetV2 built by ``hwcompress.compile`` (no tuning databases) with
``Optimize(blocks=False)`` and with the default (blocks fused where the rule takes them), and
ONNX Runtime (same threads), interleaved; outputs compared with ONNX Runtime's. A throwaway
build is timed first in each round: it runs right after ONNX Runtime, whose pool threads keep
spinning after each run and took the cores from it (2.5x slower than the same build timed
later, on a 2-core VM; ``tools/bench.py``'s first variant, ``plain``, is in that slot too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import interleaved  # noqa: E402

# MobileNetV2's blocks with an expansion (t = 6): (input hw, in, expanded, out, stride, residual), count
MOBILENET_V2_BLOCKS = [
    ((112, 16, 96, 24, 2, False), 1),
    ((56, 24, 144, 24, 1, True), 1),
    ((56, 24, 144, 32, 2, False), 1),
    ((28, 32, 192, 32, 1, True), 2),
    ((28, 32, 192, 64, 2, False), 1),
    ((14, 64, 384, 64, 1, True), 3),
    ((14, 64, 384, 96, 1, False), 1),
    ((14, 96, 576, 96, 1, True), 2),
    ((14, 96, 576, 160, 2, False), 1),
    ((7, 160, 960, 160, 1, True), 2),
    ((7, 160, 960, 320, 1, False), 1),
]


def block_weights(b, seed: int = 0) -> dict:
    """Random input and weights of block ``b`` (``cpu_block.Block``), in the kernel's layouts."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((1, b.h, b.w, b.ci)).astype(np.float32),
        "we": (rng.standard_normal((b.ci, b.ce)) * 0.3).astype(np.float32),
        "be": rng.standard_normal(b.ce).astype(np.float32),
        "wd": (rng.standard_normal((9, b.ce)) * 0.3).astype(np.float32),
        "bd": rng.standard_normal(b.ce).astype(np.float32),
        "wp": (rng.standard_normal((b.ce, b.co)) * 0.1).astype(np.float32),
        "bp": rng.standard_normal(b.co).astype(np.float32),
    }


def block_graph(b, a: dict, reuse_expanded: bool = False):
    """Block ``b`` as hwc imports it (NHWC / OHWI convs, bias adds, clips [, residual add]);
    ``reuse_expanded``: the expanded tensor is a second output (read twice)."""
    from tvm import relax

    c, conv = relax.const, relax.op.nn.conv2d
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, b.h, b.w, b.ci), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            we = np.ascontiguousarray(a["we"].T.reshape(b.ce, 1, 1, b.ci))
            e = bb.emit(conv(x, c(we), data_layout="NHWC", kernel_layout="OHWI"))
            e = bb.emit(relax.op.clip(relax.op.add(e, c(a["be"])), *b.clip_e))
            wd = np.ascontiguousarray(a["wd"].T.reshape(b.ce, 3, 3, 1))
            d = bb.emit(conv(e, c(wd), strides=[b.stride] * 2, padding=[1] * 4, groups=b.ce, data_layout="NHWC", kernel_layout="OHWI"))
            d = bb.emit(relax.op.clip(relax.op.add(d, c(a["bd"])), *b.clip_d))
            wp = np.ascontiguousarray(a["wp"].T.reshape(b.co, 1, 1, b.ce))
            p = bb.emit(conv(d, c(wp), data_layout="NHWC", kernel_layout="OHWI"))
            p = bb.emit(relax.op.add(p, c(a["bp"].reshape(1, 1, 1, b.co))))
            if b.residual:
                p = bb.emit(relax.op.add(x, p))
            out = bb.emit_output(relax.Tuple([p, e]) if reuse_expanded else p)
        bb.emit_func_output(out)
    return bb.get()


def _vm(mod, spec, fused: bool):
    import tvm

    from hwcompress import build as B

    if fused:  # the backend's pass, whatever the size rule says; then the usual legalization
        target = spec.tvm_target()
        with target:
            mod = tvm.transform.Sequential(B.get_backend(spec).fusion_passes(target, min_bytes=0))(mod)
    legal = B.legalize(mod, spec, blocks=False)
    return tvm.relax.VirtualMachine(B.build(B.schedule(legal, spec), spec), tvm.cpu())


def bench_layers(target: str, rounds: int, reps: int, every: bool, only: int | None = None) -> list[dict]:
    """One row per block shape (``only``: the first that many)."""
    import tvm

    from hwcompress.backends.cpu_block import MIN_BYTES, Block
    from hwcompress.targets import load_target

    spec = load_target(target)
    rows = []
    for (hw, ci, ce, co, s, res), count in MOBILENET_V2_BLOCKS:
        b = Block(hw, hw, ci, ce, co, s, res)
        big = 4 * hw * hw * ce >= MIN_BYTES
        if not (big or every):
            continue
        if only is not None and len(rows) >= only:
            break
        a = block_weights(b)
        mod = block_graph(b, a)
        vms = {name: _vm(mod, spec, name == "fused") for name in ("separate", "fused")}
        x = tvm.runtime.tensor(a["x"])
        outs = {k: vm["main"](x).numpy() for k, vm in vms.items()}
        ms = {k: v * 1e3 for k, v in interleaved({k: (lambda vm=vm: vm["main"](x)) for k, vm in vms.items()}, rounds, reps).items()}
        row = {
            "block": f"{hw}x{hw} {ci}->{ce}->{co} s{s}{' +x' if res else ''}",
            "count": count,
            "fused_by_default": big,
            "separate_ms": ms["separate"],
            "fused_ms": ms["fused"],
            "speedup": ms["separate"] / ms["fused"],
            "gflop_s": b.flops / ms["fused"] / 1e6,
            "max_diff": float(np.abs(outs["fused"] - outs["separate"]).max()),
        }
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def bench_model(target: str, threads: int, rounds: int, runs: int) -> dict:
    import tvm

    import hwcompress
    import zoo
    from bench import ort_session

    model, shapes = zoo.mobilenet_v2(), {"input": (1, 3, 224, 224)}
    x = np.random.default_rng(0).standard_normal(shapes["input"]).astype(np.float32)
    runners, outs, fused = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, blocks in (("throwaway", False), ("three kernels", False), ("fused blocks", True)):
            artifact = hwcompress.compile(
                model, target=target, out=Path(tmp) / variant.replace(" ", "_"), input_shapes=shapes,
                shipped_databases=False, optimize=hwcompress.Optimize(blocks=blocks),
            )  # fmt: skip
            kernels = artifact.manifest["kernels"]["default_schedule"] + artifact.manifest["kernels"]["tuned"]
            fused[variant] = sum(k.startswith("inverted_residual") for k in kernels)
            vm, device = artifact.native_vm()
            arg = tvm.runtime.tensor(x, device)
            outs[variant] = vm["main"](arg).numpy()
            runners[variant] = lambda vm=vm, arg=arg: vm["main"](arg)
        session = ort_session(model, threads)
        ref = session.run(None, {"input": x})[0]
        runners["ort"] = lambda: session.run(None, {"input": x})
        ms = {k: v * 1e3 for k, v in interleaved(runners, rounds, runs).items()}
    return {
        "threads": threads,
        "ms": {k: v for k, v in ms.items() if k != "throwaway"},
        "fused_kernels": fused["fused blocks"],
        "speedup": ms["three kernels"] / ms["fused blocks"],
        "vs_ort": {k: ms[k] / ms["ort"] for k in ("three kernels", "fused blocks")},
        "max_diff_vs_ort": {k: float(np.abs(outs[k] - ref).max()) for k in ("three kernels", "fused blocks")},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layers")
    lay.add_argument("--rounds", type=int, default=15)
    lay.add_argument("--reps", type=int, default=10)
    lay.add_argument("--all", action="store_true", help="also the blocks the size rule keeps as three kernels")
    mod = sub.add_parser("model")
    mod.add_argument("--threads", type=int, default=2)
    mod.add_argument("--rounds", type=int, default=30)
    mod.add_argument("--runs", type=int, default=3)
    for s in (lay, mod):
        s.add_argument("--target", default="host")
    args = p.parse_args(argv)
    if args.cmd == "layers":
        rows = bench_layers(args.target, args.rounds, args.reps, args.all)
        print("| block (x count in MobileNetV2) | fused by default | three kernels ms | fused ms | speedup | fused GFLOP/s | max diff |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['block']} (x{r['count']}) | {'yes' if r['fused_by_default'] else 'no'} | {r['separate_ms']:.3f} | "
                f"{r['fused_ms']:.3f} | **{r['speedup']:.2f}x** | {r['gflop_s']:.1f} | {r['max_diff']:.1e} |"
            )
        return 0
    r = bench_model(args.target, args.threads, args.rounds, args.runs)
    print(f"MobileNetV2, {r['threads']} thread(s), {r['fused_kernels']} blocks fused")
    print("| build | ms | / ORT | max diff vs ORT |")
    print("|---|---:|---:|---:|")
    for k in ("three kernels", "fused blocks"):
        print(f"| hwc, {k} | {r['ms'][k]:.3f} | {r['vs_ort'][k]:.3f} | {r['max_diff_vs_ort'][k]:.1e} |")
    print(f"| ONNX Runtime | {r['ms']['ort']:.3f} | 1.000 | |")
    print(f"fused / three kernels: **{r['speedup']:.3f}x** faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
