"""Dense vs 2:4 sparse GEMM on this host (float32, or INT8 with ``--int8``): batch-1 dense
layers and 1x1 convs as GEMM.

    .venv/bin/python tools/bench_sparse.py                      # 1 and 2 threads, all shapes
    .venv/bin/python tools/bench_sparse.py --threads 1 --shapes 1x1024x1024,49x2048x512
    .venv/bin/python tools/bench_sparse.py --trials 64 --work-dir /tmp/sp_tune   # dense tuned too
    .venv/bin/python tools/bench_sparse.py --json out.json
    .venv/bin/python tools/bench_sparse.py --cold               # weights streamed from DRAM
    .venv/bin/python tools/bench_sparse.py --int8 --threads 1   # 2:4 INT8 vs dense INT8
    .venv/bin/python tools/bench_sparse.py --pairs --shapes 49x2048x512,196x1024x256   # Sparse24(pairs=True)
    .venv/bin/python tools/bench_sparse.py --pairs --each-variant --shapes 784x128x512   # every candidate kernel too

A shape ``MxNxK`` is ``y[M, N] = x[M, K] @ W[N, K].T`` with ``W`` 2:4-masked random weights.
Dense: a Relax ``R.matmul(x, W.T)`` by a constant, built the way hwc builds it
(``build.legalize``, ``build.default_schedule``, ``build.build``); with ``--trials N`` it is also
MetaSchedule-tuned (``tuning.tune_module``, N trials) and the faster of default and tuned is kept.
Sparse: ``cpu_sparse.sparse24_kernel`` with the variant ``pick_variant`` measures fastest,
called with ``relax.call_tir`` on its constant weights (``kernel_operands``) and built the same way.
Both run through the Relax VM, timed with ``time_evaluator`` in alternating rounds (median of
the rounds' medians). Also given: the ratio of the two fastest rounds (noise only ever adds
time), the 10th-90th percentiles of the per-round ratio, and the share of each kernel's rounds
slower than 1.2x its fastest: on the shared VMs this was measured on, the sparse kernels have
slow phases that dense barely feels (many ``--rounds`` show them). ``--each-variant``: every
candidate of ``cpu_sparse.variants`` for the shape is timed in the same rounds too (a second
table: dense over each); every kernel's output must match dense.

``--int8``: ``x`` uint8, ``W`` int8 in the range the quantizer makes for this host (``[-63,
63]`` with ``int8 = "avx2"``, else ``[-127, 127]``) 2:4-masked, int32 out; dense is the uint8 x int8 ``R.matmul`` on hwc's INT8 kernel,
sparse the same graph marked as sparsified, so that ``sparse_lower`` gives it the 2:4 INT8
kernel (``cpu_sparse_int8``, its default variant): both exactly as a build makes them, and
both must agree exactly.

Warm (default): one layer timed over and over, so its weights stay in the caches (all but
4096x4096 fit in a 32 MB L3) -- unlike a model, whose layers evict each other. ``--cold``: C
copies of the layer (different random weights, same shape, dense and sparse alike), C chosen
so that the *sparse* copies alone exceed twice the L3 (``--l3-mb``, default read from sysfs;
at most 1 GB of outputs: ``COLD_OUTPUT_BYTES``),
run in sequence by one VM function returning all outputs; the time reported is per layer
(total / C). Each thread count runs in its own process (``TVM_NUM_THREADS`` is read
once, before the first kernel), pinned to that many CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# batch-1 dense layers (N = K, and a 1000-class head) and ResNet-50 1x1 convs as GEMM
SHAPES = "1x512x512,1x1024x1024,1x2048x2048,1x4096x4096,1x1000x2048,49x2048x512,49x512x2048,196x1024x256"


def _parse(shape: str) -> tuple[int, int, int]:
    m, n, k = (int(v) for v in shape.lower().split("x"))
    return m, n, k


def _relax(m: int, k: int, n: int, body, copies: int = 1, dtype: str = "float32"):
    """``main(x)``: ``body(bb, x, i)`` for each copy ``i``; one output, or a tuple of all."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(body(bb, x, i)) for i in range(copies)]
            out = bb.emit_output(outs[0] if copies == 1 else relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def dense_vm(ws: list[np.ndarray], m: int, spec, trials: int = 0, work_dir: Path | None = None):
    """{label: VM} of ``x @ w.T`` by a constant for each ``w`` of ``ws`` (same shape), default
    schedule, and with ``trials`` also MetaSchedule-tuned."""
    import tvm
    from tvm import relax

    from hwcompress import build as B

    n, k = ws[0].shape
    w_kn = [relax.const(np.ascontiguousarray(w.T)) for w in ws]
    mod = B.legalize(_relax(m, k, n, lambda bb, x, i: relax.op.matmul(x, w_kn[i]), len(ws)), spec)
    vm = relax.VirtualMachine(B.build(B.default_schedule(mod, spec), spec), tvm.cpu())
    if not trials:
        return {"default": vm}
    from hwcompress.tuning import tune_module

    work = Path(work_dir or "tuning/bench_sparse") / f"{m}x{n}x{k}"
    tune_module(mod, spec, trials, work, trials_per_iter=8)
    tuned = relax.VirtualMachine(B.build(B.schedule(mod, spec, [work]), spec), tvm.cpu())
    return {"default": vm, "tuned": tuned}


def sparse_vm(ws: list[np.ndarray], m: int, spec, variant):
    """VM of the 2:4 kernel on ``compress(w)`` for each ``w`` of ``ws`` (same shape)."""
    import tvm
    from tvm import relax

    from hwcompress import build as B
    from hwcompress.backends.cpu_sparse import kernel_operands, sparse24_kernel
    from hwcompress.passes.sparsity.mask24 import compress

    n, k = ws[0].shape
    cs = [compress(w) for w in ws]
    target = spec.tvm_target()

    def body(bb, x, i):
        gv = bb.add_func(sparse24_kernel(m, n, k, target, variant), "sparse24_matmul")  # added once
        weights = [relax.const(w) for w in kernel_operands(variant, cs[i])]
        return relax.call_tir(gv, [x, *weights], relax.TensorType((m, n), "float32"))

    mod = _relax(m, k, n, body, len(ws))
    return relax.VirtualMachine(B.build(B.default_schedule(mod, spec), spec), tvm.cpu())


def int8_vms(ws: list[np.ndarray], m: int, spec) -> dict:
    """{"dense_default": VM, "sparse": VM} of ``x (uint8) @ w.T (int8)`` for each ``w`` of ``ws``:
    the same graph, built plain and marked as sparsified (``build.has_sparsity``)."""
    import tvm
    from tvm import relax

    from hwcompress import build as B
    from hwcompress.passes.sparsity.sparse24 import REPORT_ATTR

    n, k = ws[0].shape
    w_kn = [relax.const(np.ascontiguousarray(w.T)) for w in ws]
    mod = _relax(m, k, n, lambda bb, x, i: relax.op.matmul(x, w_kn[i], out_dtype="int32"), len(ws), "uint8")
    vms = {}
    for name, variant in (("dense_default", mod), ("sparse", mod.with_attr(REPORT_ATTR, json.dumps({"layers": []})))):
        lowered = B.legalize(variant, spec)
        if name == "sparse":
            assert any(gv.name_hint.startswith("sparse24_gemm") for gv in lowered.functions), "no 2:4 INT8 kernel"
        vms[name] = relax.VirtualMachine(B.build(B.default_schedule(lowered, spec), spec), tvm.cpu())
    return vms


def int8_kind(spec, k: int, qmax: int) -> str:
    """Which 2:4 INT8 kernel a build gives this layer (``cpu_sparse_int8.kind_for``), its
    default variant."""
    from hwcompress.backends.cpu_sparse_int8 import kind_for

    return f"int8 {kind_for(spec.tvm_target(), k, qmax).value} default"


def bench_shape(m, n, k, spec, args) -> dict:
    import tvm

    from hwcompress.backends.cpu_sparse import pick_variant
    from hwcompress.passes.sparsity.mask24 import decompress, compress, shared_mask_2to4

    rng = np.random.default_rng(0)
    qmax = None
    copies = cold_copies(m, n, k, args.l3_mb, args.int8) if args.cold else 1
    if args.int8:
        from hwcompress.passes.quantize.int8 import weight_qmax

        qmax = weight_qmax(spec)
        ws = [decompress(compress(rng.integers(-qmax, qmax + 1, (n, k)).astype(np.int8))) for _ in range(copies)]
        x = tvm.runtime.tensor(rng.integers(0, 256, (m, k)).astype(np.uint8))
        vms, variant = int8_vms(ws, m, spec), None
    else:
        raw = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(copies)]
        ws = [decompress(compress(w * shared_mask_2to4(w, n) if args.pairs else w)) for w in raw]  # masked
        x = tvm.runtime.tensor(rng.standard_normal((m, k)).astype(np.float32))
        variant, _ = pick_variant(m, n, k, spec.tvm_target(), number=args.number, repeat=5, pairs=args.pairs)
        vms = {f"dense_{name}": vm for name, vm in dense_vm(ws, m, spec, args.trials, args.work_dir).items()}
        vms["sparse"] = sparse_vm(ws, m, spec, variant)
        if args.each_variant:
            from hwcompress.backends.cpu_sparse import variants

            for v in variants(m, n, k, spec.tvm_target(), args.pairs):
                vms[f"variant {v.name}"] = sparse_vm(ws, m, spec, v)
    first = lambda out: (out[0] if copies > 1 else out).numpy()  # noqa: E731
    outs = {name: first(vm["main"](x)) for name, vm in vms.items()}
    ref = outs["dense_default"]
    rel = {name: float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)) for name, out in outs.items()}
    err = rel["sparse"]
    if max(rel.values()) > 1e-4:
        raise SystemExit(f"{m}x{n}x{k}: a 2:4 kernel differs from dense: {max(rel, key=rel.get)} (rel. err {max(rel.values()):.1e})")
    if args.int8 and err:
        raise SystemExit(f"{m}x{n}x{k}: the 2:4 INT8 kernel differs from the dense INT8 one (rel. err {err:.1e})")
    number = max(1, args.number // copies) if copies > 1 else args.number
    evals = {name: vm.time_evaluator("main", tvm.cpu(), number=number, repeat=1) for name, vm in vms.items()}
    rounds = {name: [] for name in vms}
    for _ in range(args.rounds):  # alternate so that machine noise hits all alike
        for name, fn in evals.items():
            rounds[name].append(fn(x).median / copies)
    ms = {name: statistics.median(ts) * 1e3 for name, ts in rounds.items()}
    dense_best = min((v, name) for name, v in ms.items() if name.startswith("dense"))
    dense_rounds, sparse_rounds = np.array(rounds[dense_best[1]]), np.array(rounds["sparse"])
    per_round = dense_rounds / sparse_rounds  # the two timed back to back in each round
    return {
        "shape": f"{m}x{n}x{k}", "m": m, "n": n, "k": k, "variant": variant.name if variant else int8_kind(spec, k, qmax), "copies": copies,
        "dense_ms": dense_best[0], "dense_kind": dense_best[1].removeprefix("dense_"),
        "sparse_ms": ms["sparse"], "ratio": dense_best[0] / ms["sparse"], "rel_err": err, "all_ms": ms,
        # the fastest round of each (noise only adds time), the spread of the per-round ratio and
        # the share of rounds over 1.2x a kernel's fastest (slow phases: docs/platform-findings.md)
        "ratio_best": dense_rounds.min() / sparse_rounds.min(), "ratio_p10_p90": [float(v) for v in np.percentile(per_round, [10, 90])],
        "slow_rounds": {"dense": float((dense_rounds > SLOW * dense_rounds.min()).mean()), "sparse": float((sparse_rounds > SLOW * sparse_rounds.min()).mean())},
        "variants": {name.removeprefix("variant "): dense_best[0] / t for name, t in ms.items() if name.startswith("variant ")},
    }  # fmt: skip


# A round slower than this times the kernel's fastest round counts as slow (``slow_rounds``)
SLOW = 1.2

# Bytes the C copies' outputs may take (one VM function returns them all): 3136x64x256's
# ~1,950 copies (0.8 MB of output each) were killed for memory
COLD_OUTPUT_BYTES = 1 << 30


def cold_copies(m: int, n: int, k: int, l3_mb: float | None, int8: bool = False) -> int:
    """Copies of an ``m x n x k`` layer whose 2:4 compressed weights exceed twice the L3, at
    most as many as ``COLD_OUTPUT_BYTES`` of outputs (such a layer's activations stream from
    memory anyway: its outputs alone exceed the L3 many times over)."""
    from hwcompress.targets import host_llc_bytes

    l3 = int(l3_mb * (1 << 20)) if l3_mb else host_llc_bytes()
    sparse = n * (k // 2) * (1 if int8 else 4) + n * ((k + 7) // 8)
    return max(2, min(-(-2 * l3 // sparse) + 1, COLD_OUTPUT_BYTES // (m * n * 4)))


def worker(args) -> None:
    """One thread count, this process: every shape, one JSON line per shape on stdout."""
    from hwcompress.targets import load_target

    spec = load_target("host")
    for shape in args.shapes.split(","):
        row = bench_shape(*_parse(shape), spec, args)
        row["threads"] = int(os.environ["TVM_NUM_THREADS"])
        print(json.dumps(row), flush=True)
        print(f"  {row['threads']}T {row['shape']:>14}: dense {row['dense_ms']:.4f} ms, sparse {row['sparse_ms']:.4f} ms "
              f"({row['variant']}), x{row['ratio']:.2f}", file=sys.stderr, flush=True)  # fmt: skip


def run_threads(threads: int, args) -> list[dict]:
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs available")
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", "--shapes", args.shapes, "--rounds", str(args.rounds),
           "--number", str(args.number), "--trials", str(args.trials)]  # fmt: skip
    if args.cold:
        cmd += ["--cold"] + (["--l3-mb", str(args.l3_mb)] if args.l3_mb else [])
    if args.int8:
        cmd += ["--int8"]
    if args.pairs:
        cmd += ["--pairs"]
    if args.each_variant:
        cmd += ["--each-variant"]
    if args.work_dir:
        cmd += ["--work-dir", str(args.work_dir)]
    # 1 thread on the last CPU (the first takes most of the machine's other work)
    pin = ["taskset", "-c", ",".join(str(c) for c in cpus[-threads:])]
    out = subprocess.run(pin + cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def table(rows: list[dict], trials: int, cold: bool = False) -> str:
    dense = f"dense (best of default / tuned {trials} trials)" if trials else "dense (hwc default schedule)"
    regime = "cold: per layer of C copies" if cold else "warm"
    lines = [f"| shape MxNxK | threads | {dense} ms ({regime}) | 2:4 sparse ms | dense / sparse | fastest rounds | per round p10-p90 "
             "| slow rounds dense / sparse | sparse variant | C | rel. err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for r in rows:
        kind = f" ({r['dense_kind']})" if trials else ""
        lo, hi = r["ratio_p10_p90"]
        slow = f"{r['slow_rounds']['dense']:.0%} / {r['slow_rounds']['sparse']:.0%}"
        lines.append(f"| {r['shape']} | {r['threads']} | {r['dense_ms']:.4f}{kind} | {r['sparse_ms']:.4f} | {r['ratio']:.2f}x | "
                     f"{r['ratio_best']:.2f}x | {lo:.2f}-{hi:.2f}x | {slow} | {r['variant']} | {r['copies']} | {r['rel_err']:.1e} |")  # fmt: skip
    if any(r.get("variants") for r in rows):  # --each-variant
        lines += ["", "| shape MxNxK | threads | candidate variant | dense / it |", "|---|---:|---|---:|"]
        lines += [f"| {r['shape']} | {r['threads']} | {name} | {ratio:.2f}x |" for r in rows for name, ratio in r["variants"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxNxK")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    ap.add_argument("--number", type=int, default=20, help="runs per timing")
    ap.add_argument("--trials", type=int, default=0, help="also MetaSchedule-tune dense with N trials")
    ap.add_argument("--work-dir", type=Path, default=None, help="tuning databases (default tuning/bench_sparse)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--cold", action="store_true", help="C copies of each layer, weights > 2x L3 (per-layer time)")
    ap.add_argument("--l3-mb", type=float, default=None, help="L3 size for --cold (default: sysfs)")
    ap.add_argument("--int8", action="store_true", help="uint8 x 2:4 int8 against hwc's dense INT8 kernel")
    ap.add_argument("--pairs", action="store_true", help="row pairs share positions (Sparse24.pairs): the pairs kernels too")
    ap.add_argument("--each-variant", action="store_true", help="also time every candidate kernel variant of each shape")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.int8 and args.trials:
        ap.error("--trials tunes the float dense kernel; the INT8 kernels are hand-scheduled (drop --trials)")
    if args.int8 and args.pairs:
        ap.error("--pairs: the 2:4 INT8 kernels have no pairs variant (drop one)")
    if args.int8 and args.each_variant:
        ap.error("--each-variant: the 2:4 INT8 kernels run their default variant (drop one)")
    if args.worker:
        return worker(args)
    rows = [row for t in args.threads.split(",") for row in run_threads(int(t), args)]
    print(table(rows, args.trials, args.cold))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
