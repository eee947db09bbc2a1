"""XGBoost vs random cost model: measured trials MetaSchedule needs on the same tasks and budget.

Takes the K heaviest tasks (FLOPs x weight) of a model as hwcompress builds it
(``api.import_model`` + ``build.legalize``, then ``ms.relax_integration.extract_tasks``) and
tunes each task alone twice with ``ms.tune.tune_tasks``: once with ``cost_model="xgb"``
(XGBoost, what ``hwc tune`` uses) and once with ``"random"``, with the same builder
(``hwcompress.tuning.candidate_builder()``), runner (``"local"``), trials per batch, search
seed and cost-model seed, in separate work dirs (``WORK_ROOT/<task>/<cost model>``, wiped
first). A measure callback records every measured trial in measurement order (a failed build
or run counts as a trial with no latency), giving each run's best-so-far curve.

Per task and in aggregate it reports the trials each method needed to get within 5% of the
best latency *either* method found (latency <= 1.05 x best), each method's final best, and
random / xgb trials. Results (curves included) go to ``WORK_ROOT/efficiency.json`` and
``curves.csv``; with matplotlib installed also ``curves.png``.

Note: MetaSchedule's XGBModel returns random scores until it has ``num_warmup_samples`` (100)
measured samples, so on budgets below ~100 trials per task the two methods differ only by
chance; the comparison means something from a few hundred trials per task.

    .venv/bin/python tools/bench_tuning_efficiency.py --model fashion --tasks 2 --trials 32
    .venv/bin/python tools/bench_tuning_efficiency.py --model resnet18 --tasks 4 --trials 256
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("xgb", "random")
WITHIN = 1.05  # "reached": latency <= 1.05 x the best either method found


# ---------------------------------------------------------------------------- pure helpers

def best_so_far(latencies: list[float | None]) -> list[float | None]:
    """Running minimum of per-trial latencies (``None``: a failed trial); ``None`` until the
    first valid one."""
    out, best = [], None
    for x in latencies:
        if x is not None and (best is None or x < best):
            best = x
        out.append(best)
    return out


def trials_to_reach(curve: list[float | None], threshold: float) -> int | None:
    """1-based number of trials after which the best-so-far ``curve`` is <= ``threshold``;
    ``None`` if it never gets there."""
    for i, x in enumerate(curve, 1):
        if x is not None and x <= threshold:
            return i
    return None


def trials_ratio(random_trials: int | None, xgb_trials: int | None, budget: int) -> tuple[float | None, str]:
    """random / xgb trials; a method that never got within 5% is counted as ``budget``
    (so the ratio is then a bound, marked ``>=`` or ``<=``)."""
    if random_trials is None and xgb_trials is None:
        return None, "-"
    r = random_trials if random_trials is not None else budget
    x = xgb_trials if xgb_trials is not None else budget
    ratio = r / x
    mark = ">=" if random_trials is None else "<=" if xgb_trials is None else ""
    return ratio, f"{mark}{ratio:.2f}"


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---------------------------------------------------------------------------- models and tasks

def _zoo():
    spec = importlib.util.spec_from_file_location("_hwc_tools_zoo", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = {
    # name: (model factory, input shapes) -- as tools/pretune.py tunes them
    "fashion": (lambda: str(ROOT / "examples" / "fashion_resnet.onnx"), {"input": (1, 1, 28, 28)}),
    "small_cnn": (lambda: str(ROOT / "examples" / "small_cnn.onnx"), {"input": (1, 3, 32, 32)}),
    "resnet18": (lambda: _zoo().resnet18(), {"input": (1, 3, 224, 224)}),
    "mobilenet_v2": (lambda: _zoo().mobilenet_v2(), {"input": (1, 3, 224, 224)}),
}


@dataclass
class TaskInfo:
    name: str
    flops: float
    weight: int

    @property
    def cost(self) -> float:
        return self.flops * self.weight


def model_tasks(model: str, spec):
    """``[(ExtractedTask, TaskInfo)]`` of ``model`` as hwcompress builds it (default recipe and
    optimizations, like ``hwc tune``), heaviest (FLOPs x weight) first."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from hwcompress.api import import_model
    from hwcompress.build import legalize
    from hwcompress.optimize import as_optimize

    make, shapes = MODELS[model]
    optimize = as_optimize(None)
    mod = legalize(import_model(make(), spec, shapes, optimize=optimize).mod, spec, fuse=optimize.fuse)
    out = []
    for task in ms.relax_integration.extract_tasks(mod, spec.tvm_target()):
        flops = float(estimate_tir_flops(task.dispatched[0]))
        out.append((task, TaskInfo(str(task.task_name), flops, int(task.weight))))
    out.sort(key=lambda t: -t[1].cost)
    return out


# ---------------------------------------------------------------------------- one tuning run

@dataclass
class Run:
    method: str
    work_dir: str
    latencies_ms: list[float | None] = field(default_factory=list)  # per trial, measurement order
    seconds: float = 0.0

    @property
    def curve(self) -> list[float | None]:
        return best_so_far(self.latencies_ms)

    @property
    def best_ms(self) -> float | None:
        return self.curve[-1] if self.latencies_ms else None

    @property
    def errors(self) -> int:
        return sum(1 for x in self.latencies_ms if x is None)


def tune_task(task, method: str, work: Path, trials: int, per_iter: int, seed: int) -> Run:
    """Tune one extracted task alone with cost model ``method`` into a fresh ``work``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.cost_model import RandomModel, XGBModel
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    from hwcompress.tuning import candidate_builder, mean_seconds, quiet_metaschedule_console

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    quiet_metaschedule_console()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(work), seed=seed)
    cores = contexts[0].num_threads
    if method == "xgb":
        # as tune_tasks builds it for cost_model="xgb", plus our seed
        cost_model = XGBModel(config=XGBConfig(seed=seed), num_tuning_cores=cores, tree_method="auto")
    elif method == "random":
        cost_model = RandomModel(seed=seed)
    else:
        raise ValueError(method)
    run = Run(method, str(work))

    @derived_object
    class _Record(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for b, r in zip(builder_results, runner_results):
                secs = None if b.error_msg or r.error_msg else mean_seconds(r.run_secs)
                run.latencies_ms.append(None if secs is None else 1e3 * secs)

    start = time.perf_counter()
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work),
        max_trials_global=trials,
        max_trials_per_task=trials,
        num_trials_per_iter=min(per_iter, trials),
        builder=candidate_builder(),
        runner="local",
        database=ms.database.JSONDatabase(work_dir=str(work)),
        cost_model=cost_model,
        measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [_Record()],
    )
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------- comparison

@dataclass
class TaskResult:
    task: TaskInfo
    runs: dict[str, Run]
    budget: int

    @property
    def best_ms(self) -> float | None:
        bests = [r.best_ms for r in self.runs.values() if r.best_ms is not None]
        return min(bests) if bests else None

    def trials_to_5pct(self, method: str) -> int | None:
        if self.best_ms is None:
            return None
        return trials_to_reach(self.runs[method].curve, WITHIN * self.best_ms)

    def ratio(self) -> tuple[float | None, str]:
        return trials_ratio(self.trials_to_5pct("random"), self.trials_to_5pct("xgb"), self.budget)

    def to_dict(self) -> dict:
        return {
            "task": asdict(self.task),
            "best_either_ms": self.best_ms,
            "trials_to_within_5pct": {m: self.trials_to_5pct(m) for m in self.runs},
            "random_over_xgb_trials": self.ratio()[0],
            "runs": {m: {"work_dir": r.work_dir, "seconds": r.seconds, "trials": len(r.latencies_ms), "errors": r.errors,
                         "best_ms": r.best_ms, "latencies_ms": r.latencies_ms, "best_so_far_ms": r.curve} for m, r in self.runs.items()},
        }


def _n(x: int | None, budget: int) -> str:
    return str(x) if x is not None else f">{budget}"


def _ms(x: float | None) -> str:
    return f"{x:.4g}" if x is not None else "-"


def summary(results: list[TaskResult], budget: int) -> dict:
    out = {"tasks": len(results)}
    for m in METHODS:
        reached = [r.trials_to_5pct(m) for r in results]
        out[f"{m}_trials_to_5pct_sum"] = sum(x if x is not None else budget for x in reached)
        out[f"{m}_never_reached"] = sum(1 for x in reached if x is None)
        # the model time of these kernels if each were tuned with this method alone
        bests = [(r.task.weight, r.runs[m].best_ms) for r in results]
        out[f"{m}_weighted_best_ms"] = sum(w * b for w, b in bests) if all(b is not None for _, b in bests) else None
        out[f"{m}_seconds"] = sum(r.runs[m].seconds for r in results)
        out[f"{m}_trials"] = sum(len(r.runs[m].latencies_ms) for r in results)
    x, rnd = out["xgb_trials_to_5pct_sum"], out["random_trials_to_5pct_sum"]
    out["random_over_xgb_trials_total"] = rnd / x if x else None
    out["random_over_xgb_trials_geomean"] = geomean([r.ratio()[0] for r in results if r.ratio()[0]])
    out["xgb_fewer_trials_tasks"] = sum(1 for r in results if (r.ratio()[0] or 1) > 1)
    out["random_fewer_trials_tasks"] = sum(1 for r in results if (r.ratio()[0] or 1) < 1)
    trials = out["xgb_trials"] + out["random_trials"]
    out["seconds_per_trial"] = (out["xgb_seconds"] + out["random_seconds"]) / trials if trials else None
    return out


def markdown(results: list[TaskResult], agg: dict, args) -> str:
    lines = [
        f"XGBoost vs random cost model, `{args.model}` on `{args.target}`, {args.tasks} heaviest tasks, "
        f"{args.trials} trials per task per method, {args.per_iter} per batch, seed {args.seed}.",
        "",
        "| task | weight | MFLOP | best ms xgb | best ms random | trials to 5% xgb | trials to 5% random | random / xgb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r.task.name}` | {r.task.weight} | {r.task.flops / 1e6:.2f} | {_ms(r.runs['xgb'].best_ms)} | {_ms(r.runs['random'].best_ms)} "
            f"| {_n(r.trials_to_5pct('xgb'), args.trials)} | {_n(r.trials_to_5pct('random'), args.trials)} | {r.ratio()[1]} |"
        )
    g = agg["random_over_xgb_trials_geomean"]
    tot = agg["random_over_xgb_trials_total"]
    lines += [
        f"| **all** | | | {_ms(agg['xgb_weighted_best_ms'])} (x weight) | {_ms(agg['random_weighted_best_ms'])} (x weight) "
        f"| {agg['xgb_trials_to_5pct_sum']} | {agg['random_trials_to_5pct_sum']} | {tot:.2f} (sum), {g:.2f} (geomean) |"
        if tot is not None and g is not None else
        f"| **all** | | | {_ms(agg['xgb_weighted_best_ms'])} | {_ms(agg['random_weighted_best_ms'])} | {agg['xgb_trials_to_5pct_sum']} | {agg['random_trials_to_5pct_sum']} | - |",
        "",
        f"Trials to 5%: measured trials until the best-so-far latency is <= {WITHIN} x the best either method found for the "
        f"task (`>{args.trials}`: never; counted as {args.trials} in sums and ratios, which are then bounds). "
        f"xgb needed fewer trials on {agg['xgb_fewer_trials_tasks']} task(s), random on {agg['random_fewer_trials_tasks']}. "
        f"Wall time: xgb {agg['xgb_seconds']:.0f} s, random {agg['random_seconds']:.0f} s "
        f"({agg['seconds_per_trial']:.2f} s per measured trial overall).",
    ]
    return "\n".join(lines)


def write_curves(results: list[TaskResult], root: Path) -> list[Path]:
    paths = [root / "curves.csv"]
    with paths[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "trial", "latency_ms", "best_so_far_ms"])
        for r in results:
            for m, run in r.runs.items():
                for i, (lat, best) in enumerate(zip(run.latencies_ms, run.curve), 1):
                    w.writerow([r.task.name, m, i, "" if lat is None else f"{lat:.6g}", "" if best is None else f"{best:.6g}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for m, run in r.runs.items():
            xs = [i for i, b in enumerate(run.curve, 1) if b is not None]
            ax.step(xs, [b for b in run.curve if b is not None], where="post", label=m)
        if r.best_ms:
            ax.axhline(WITHIN * r.best_ms, color="grey", linestyle=":", label="1.05 x best")
        ax.set_title(r.task.name, fontsize=8)
        ax.set_xlabel("measured trials")
        ax.set_ylabel("best-so-far ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(root / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--tasks", type=int, default=4, help="the K heaviest tasks (FLOPs x weight)")
    p.add_argument("--trials", type=int, default=256, help="measured trials per task per method")
    p.add_argument("--per-iter", type=int, default=16, choices=(8, 16), help="trials per measured batch")
    p.add_argument("--target", default="host")
    p.add_argument("--seed", type=int, default=0, help="search and cost-model seed, the same for both methods")
    p.add_argument("--work-root", type=Path, default=None, help="default: tuning/efficiency-<model>-<target>")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.trials < 1:
        p.error("--tasks and --trials must be >= 1")

    from hwcompress.targets import load_target

    spec = load_target(args.target)
    root = args.work_root or ROOT / "tuning" / f"efficiency-{args.model}-{spec.name}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks = model_tasks(args.model, spec)
    chosen = tasks[: args.tasks]
    print(f"{args.model}: {len(tasks)} tasks ({time.perf_counter() - t0:.0f} s to import and extract); tuning "
          + ", ".join(f"{i.name} ({i.flops / 1e6:.1f} MFLOP x {i.weight})" for _, i in chosen), file=sys.stderr, flush=True)

    results = []
    for task, info in chosen:
        runs = {}
        for method in METHODS:
            run = tune_task(task, method, root / info.name / method, args.trials, args.per_iter, args.seed)
            runs[method] = run
            print(f"  {info.name} {method}: {len(run.latencies_ms)} trials, {run.errors} failed, best {_ms(run.best_ms)} ms, "
                  f"{run.seconds:.0f} s", file=sys.stderr, flush=True)
        results.append(TaskResult(info, runs, args.trials))

    agg = summary(results, args.trials)
    out = {"model": args.model, "target": spec.name, "tasks": args.tasks, "trials": args.trials, "per_iter": args.per_iter,
           "seed": args.seed, "within": WITHIN, "summary": agg, "per_task": [r.to_dict() for r in results]}
    (root / "efficiency.json").write_text(json.dumps(out, indent=1))
    files = write_curves(results, root)
    print(markdown(results, agg, args))
    print(f"\nwritten: {root / 'efficiency.json'}, " + ", ".join(str(f) for f in files)
          + ("" if len(files) > 1 else " (no matplotlib: no plot)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
