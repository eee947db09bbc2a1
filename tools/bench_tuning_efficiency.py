"""XGBoost vs random cost model: measured trials MetaSchedule needs on the same tasks and budget.

Takes the K heaviest tasks (FLOPs x weight) of a model as hwcompress builds it
(``api.import_model`` + ``build.legalize``, then ``ms.relax_integration.extract_tasks``) and
tunes each task alone twice with ``ms.tune.tune_tasks``: once with ``cost_model="xgb"``
(XGBoost, what ``hwc tune`` uses) and once with ``"random"``, with the same builder
(``hwcompress.tuning.candidate_builder()``), runner (``"local"``), evolutionary search
(``EvolutionarySearch(population_size=--population)``, MetaSchedule's defaults otherwise),
trials per batch, search seed and cost-model seed, in separate work dirs
(``WORK_ROOT/<task>/<cost model>``, wiped first). numpy's global generator is seeded before each
run: XGBModel draws its warm-up scores from it and RandomModel seeds it, so both draw the same
score stream. The two runs pick the same first batch only if the search itself is
reproducible, which it is not with more than one search thread (``--search-threads``, default
MetaSchedule's: the physical cores): its threads take population slots dynamically, each with
its own random stream. A measure callback records every measured trial in measurement order (a
failed build or run counts as a trial with no latency), giving each run's best-so-far curve.

Per task and in aggregate it reports the trials each method needed to get within 5% of the
best latency *either* method found (latency <= 1.05 x best), each method's final best, and
random / xgb trials. Results (curves included) go to ``WORK_ROOT/efficiency.json`` and
``curves.csv`` after every measured batch, so an interrupted run keeps its finished tasks (the
aggregate counts only tasks both methods finished; ``--report`` prints the tables from the
JSON without tuning); with matplotlib installed also ``curves.png`` at the end.

Cost per trial: each batch costs one evolutionary search (sample a population, 4 rounds of
mutation, each candidate scored by the cost model; ~50-100 s on one core for a Winograd task at
the default population of 512) plus one build and run per candidate. A larger ``--per-iter``
(MetaSchedule's own default is 64) spreads that search over more trials; a smaller
``--population`` makes it cheaper but leaves the cost model fewer candidates to rank, which
narrows the gap it can make. MetaSchedule's XGBModel returns random scores until it has
``num_warmup_samples`` (100) measured samples, and the model only changes between batches: with
``--per-iter 32`` or 64 the first 128 trials of both methods are random picks, so the
comparison means something from a few hundred trials per task.

    .venv/bin/python tools/bench_tuning_efficiency.py --model fashion --tasks 2 --trials 32
    .venv/bin/python tools/bench_tuning_efficiency.py --model resnet18 --tasks 3 --trials 256 --per-iter 64
    .venv/bin/python tools/bench_tuning_efficiency.py --model resnet18 --report
    .venv/bin/python tools/bench_tuning_efficiency.py --model mobilenet_v2 --report --work-root A --work-root B  # seeds combined
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
PER_ITER = (8, 16, 32, 64)
POPULATION = 512  # EvolutionarySearch's default population_size


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
    mod = legalize(import_model(make(), spec, shapes, optimize=optimize).mod, spec, fuse=optimize.fuse, blocks=optimize.blocks)
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
    partial: bool = False  # still tuning, or stopped before its search ended

    @property
    def curve(self) -> list[float | None]:
        return best_so_far(self.latencies_ms)

    @property
    def best_ms(self) -> float | None:
        return self.curve[-1] if self.latencies_ms else None

    @property
    def errors(self) -> int:
        return sum(1 for x in self.latencies_ms if x is None)

    def to_dict(self) -> dict:
        return {"work_dir": self.work_dir, "seconds": self.seconds, "partial": self.partial, "trials": len(self.latencies_ms),
                "errors": self.errors, "best_ms": self.best_ms, "latencies_ms": self.latencies_ms, "best_so_far_ms": self.curve}


def tune_task(task, run: Run, trials: int, per_iter: int, population: int, seed: int, on_batch=lambda: None,
              search_threads: int | str = "physical") -> Run:
    """Tune one extracted task alone with cost model ``run.method`` into a fresh ``run.work_dir``,
    appending to ``run.latencies_ms`` and calling ``on_batch()`` after every measured batch."""
    import numpy as np
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.cost_model import RandomModel, XGBModel
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    from hwcompress.tuning import candidate_builder, import_tensor_intrin, mean_seconds, quiet_metaschedule_console

    work = Path(run.work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    quiet_metaschedule_console()
    strategy = ms.search_strategy.EvolutionarySearch(population_size=population)
    import_tensor_intrin()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task], str(work), strategy=strategy, num_threads=search_threads, seed=seed)
    cores = contexts[0].num_threads
    np.random.seed(seed)  # XGBModel's warm-up scores come from here (see the module docstring)
    if run.method == "xgb":
        # as tune_tasks builds it for cost_model="xgb", plus our seed
        cost_model = XGBModel(config=XGBConfig(seed=seed), num_tuning_cores=cores, tree_method="auto")
    elif run.method == "random":
        cost_model = RandomModel(seed=seed)
    else:
        raise ValueError(run.method)
    start = time.perf_counter()

    @derived_object
    class _Record(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for b, r in zip(builder_results, runner_results):
                secs = None if b.error_msg or r.error_msg else mean_seconds(r.run_secs)
                run.latencies_ms.append(None if secs is None else 1e3 * secs)
            run.seconds = time.perf_counter() - start
            on_batch()

    run.partial = True
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
    run.partial = False
    return run


# ---------------------------------------------------------------------------- comparison

@dataclass
class TaskResult:
    task: TaskInfo
    runs: dict[str, Run]  # a method missing: not tuned yet
    budget: int

    @property
    def complete(self) -> bool:
        return all(m in self.runs and not self.runs[m].partial for m in METHODS)

    @property
    def best_ms(self) -> float | None:
        bests = [r.best_ms for r in self.runs.values() if r.best_ms is not None]
        return min(bests) if bests else None

    def trials_to_5pct(self, method: str) -> int | None:
        if self.best_ms is None or method not in self.runs:
            return None
        return trials_to_reach(self.runs[method].curve, WITHIN * self.best_ms)

    def ratio(self) -> tuple[float | None, str]:
        return trials_ratio(self.trials_to_5pct("random"), self.trials_to_5pct("xgb"), self.budget)

    def to_dict(self) -> dict:
        return {
            "task": asdict(self.task),
            "complete": self.complete,
            "best_either_ms": self.best_ms,
            "trials_to_within_5pct": {m: self.trials_to_5pct(m) for m in self.runs},
            "random_over_xgb_trials": self.ratio()[0] if self.complete else None,
            "runs": {m: r.to_dict() for m, r in self.runs.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, budget: int) -> "TaskResult":
        runs = {m: Run(m, r["work_dir"], r["latencies_ms"], r["seconds"], r.get("partial", False)) for m, r in d["runs"].items()}
        return cls(TaskInfo(**d["task"]), runs, budget)


def _n(x: int | None, budget: int) -> str:
    return str(x) if x is not None else f">{budget}"


def _ms(x: float | None) -> str:
    return f"{x:.4g}" if x is not None else "-"


def summary(results: list[TaskResult], budget: int) -> dict:
    """Aggregate over the tasks that both methods finished (``TaskResult.complete``)."""
    results = [r for r in results if r.complete]
    out = {"tasks": len(results)}
    for m in METHODS:
        reached = [r.trials_to_5pct(m) for r in results]
        out[f"{m}_trials_to_5pct_sum"] = sum(x if x is not None else budget for x in reached)
        out[f"{m}_never_reached"] = sum(1 for x in reached if x is None)
        # the model time of these kernels if each were tuned with this method alone
        bests = [(r.task.weight, r.runs[m].best_ms) for r in results]
        out[f"{m}_weighted_best_ms"] = sum(w * b for w, b in bests) if bests and all(b is not None for _, b in bests) else None
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


def markdown(results: list[TaskResult], agg: dict, meta: dict) -> str:
    """The results table; ``meta`` is the run's settings as ``efficiency.json`` keeps them."""
    budget = meta["trials"]
    lines = [
        f"XGBoost vs random cost model, `{meta['model']}` on `{meta['target']}`, {meta['tasks']} heaviest tasks, "
        f"{budget} trials per task per method, {meta['per_iter']} per batch, evolutionary search population "
        f"{meta.get('population', POPULATION)}, seed {meta['seed']}.",
        "",
        "| task | weight | MFLOP | best ms xgb | best ms random | trials to 5% xgb | trials to 5% random | random / xgb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.complete:
            to5 = [_n(r.trials_to_5pct(m), budget) for m in METHODS] + [r.ratio()[1]]
        else:  # what it has so far; no trial counts against an unfinished run
            to5 = [f"({len(r.runs[m].latencies_ms)} trials{' so far' if r.runs[m].partial else ', done'})" if m in r.runs
                   else "(not run)" for m in METHODS] + ["-"]
        bests = [_ms(r.runs[m].best_ms) if m in r.runs else "-" for m in METHODS]
        lines.append(f"| `{r.task.name}` | {r.task.weight} | {r.task.flops / 1e6:.2f} | {bests[0]} | {bests[1]} | {' | '.join(to5)} |")
    g, tot = agg["random_over_xgb_trials_geomean"], agg["random_over_xgb_trials_total"]
    ratio = f"{tot:.2f} (sum), {g:.2f} (geomean)" if tot is not None and g is not None else "-"
    lines += [
        f"| **all {agg['tasks']} finished** | | | {_ms(agg['xgb_weighted_best_ms'])} (x weight) | {_ms(agg['random_weighted_best_ms'])} "
        f"(x weight) | {agg['xgb_trials_to_5pct_sum']} | {agg['random_trials_to_5pct_sum']} | {ratio} |",
        "",
        f"Trials to 5%: measured trials until the best-so-far latency is <= {WITHIN} x the best either method found for the "
        f"task (`>{budget}`: never; counted as {budget} in sums and ratios, which are then bounds). "
        f"xgb needed fewer trials on {agg['xgb_fewer_trials_tasks']} task(s), random on {agg['random_fewer_trials_tasks']}."
        + (f" Wall time: xgb {agg['xgb_seconds']:.0f} s, random {agg['random_seconds']:.0f} s "
           f"({agg['seconds_per_trial']:.2f} s per measured trial overall)." if agg["seconds_per_trial"] else ""),
    ]
    return "\n".join(lines)


def combined_report(runs: list[tuple[dict, list[TaskResult]]]) -> str:
    """Each run's table, then (for several runs, e.g. one per seed) the aggregate over every
    (task, run) pair both methods finished. Each pair keeps its own 5% threshold (the best
    either method found in that run); the runs must share the trial budget."""
    out = [markdown(results, summary(results, meta["trials"]), meta) for meta, results in runs]
    if len(runs) < 2:
        return out[0]
    budgets = {meta["trials"] for meta, _ in runs}
    if len(budgets) != 1:
        raise SystemExit(f"error: the runs have different trial budgets ({sorted(budgets)}): not combinable")
    budget = budgets.pop()
    pairs = [r for _, results in runs for r in results]
    agg = summary(pairs, budget)
    seeds = ", ".join(str(meta["seed"]) for meta, _ in runs)
    g, tot = agg["random_over_xgb_trials_geomean"], agg["random_over_xgb_trials_total"]
    out.append(
        f"**All {len(runs)} runs (seeds {seeds}), {agg['tasks']} finished (task, seed) pairs**: trials to 5% "
        f"xgb {agg['xgb_trials_to_5pct_sum']} ({agg['xgb_never_reached']} never), random {agg['random_trials_to_5pct_sum']} "
        f"({agg['random_never_reached']} never); random / xgb "
        + (f"{tot:.2f} (sum), {g:.2f} (geomean)" if tot is not None and g is not None else "-")
        + f"; xgb needed fewer trials on {agg['xgb_fewer_trials_tasks']} pair(s), random on {agg['random_fewer_trials_tasks']}."
    )
    return "\n\n".join(out)


def save(root: Path, meta: dict, results: list[TaskResult]) -> dict:
    """Write ``efficiency.json`` and ``curves.csv`` (unfinished runs included); returns the summary."""
    agg = summary(results, meta["trials"])
    out = {**meta, "within": WITHIN, "summary": agg, "per_task": [r.to_dict() for r in results]}
    tmp = root / "efficiency.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(root / "efficiency.json")  # a reader never sees half a file
    write_curves_csv(results, root / "curves.csv")
    return agg


def load(root: Path) -> tuple[dict, list[TaskResult]]:
    data = json.loads((root / "efficiency.json").read_text())
    meta = {k: v for k, v in data.items() if k not in ("within", "summary", "per_task")}
    return meta, [TaskResult.from_dict(d, meta["trials"]) for d in data["per_task"]]


def write_curves_csv(results: list[TaskResult], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "trial", "latency_ms", "best_so_far_ms"])
        for r in results:
            for m, run in r.runs.items():
                for i, (lat, best) in enumerate(zip(run.latencies_ms, run.curve), 1):
                    w.writerow([r.task.name, m, i, "" if lat is None else f"{lat:.6g}", "" if best is None else f"{best:.6g}"])
    return path


def plot_curves(results: list[TaskResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--tasks", type=int, default=4, help="the K heaviest tasks (FLOPs x weight)")
    p.add_argument("--trials", type=int, default=256, help="measured trials per task per method")
    p.add_argument("--per-iter", type=int, default=16, choices=PER_ITER, help="trials per measured batch (one search each)")
    p.add_argument("--population", type=int, default=POPULATION,
                   help="evolutionary search population, the same for both methods (MetaSchedule's default: 512)")
    p.add_argument("--search-threads", type=int, default=None,
                   help="threads of the search (default: MetaSchedule's, the physical cores); 1 makes it reproducible")
    p.add_argument("--target", default="host")
    p.add_argument("--seed", type=int, default=0, help="search and cost-model seed, the same for both methods")
    p.add_argument("--work-root", type=Path, action="append", default=None,
                   help="default: tuning/efficiency-<model>-<target>; with --report, once per run to combine (e.g. one per seed)")
    p.add_argument("--report", action="store_true", help="print the tables from WORK_ROOT/efficiency.json; no tuning")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.trials < 1:
        p.error("--tasks and --trials must be >= 1")
    if args.population < 4 * args.per_iter:
        p.error("--population must be >= 4 x --per-iter: the cost model picks each batch from the population")

    from hwcompress.targets import load_target

    spec = load_target(args.target)
    roots = args.work_root or [ROOT / "tuning" / f"efficiency-{args.model}-{spec.name}"]
    if args.report:
        print(combined_report([load(r) for r in roots]))
        return 0
    if len(roots) > 1:
        p.error("one --work-root per tuning run (several only with --report)")
    root = roots[0]
    root.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "target": spec.name, "tasks": args.tasks, "trials": args.trials, "per_iter": args.per_iter,
            "population": args.population, "search_threads": args.search_threads, "seed": args.seed}
    t0 = time.perf_counter()
    tasks = model_tasks(args.model, spec)
    chosen = tasks[: args.tasks]
    print(f"{args.model}: {len(tasks)} tasks ({time.perf_counter() - t0:.0f} s to import and extract); tuning "
          + ", ".join(f"{i.name} ({i.flops / 1e6:.1f} MFLOP x {i.weight})" for _, i in chosen), file=sys.stderr, flush=True)

    results = []
    for task, info in chosen:
        result = TaskResult(info, {}, args.trials)
        results.append(result)
        for method in METHODS:
            run = result.runs[method] = Run(method, str(root / info.name / method))

            def progress(run=run):
                save(root, meta, results)
                print(f"  {info.name} {run.method}: {len(run.latencies_ms)}/{args.trials} trials, best {_ms(run.best_ms)} ms, "
                      f"{run.seconds:.0f} s", file=sys.stderr, flush=True)

            tune_task(task, run, args.trials, args.per_iter, args.population, args.seed, on_batch=progress,
                      search_threads=args.search_threads or "physical")
            save(root, meta, results)
            print(f"  {info.name} {method} done: {len(run.latencies_ms)} trials, {run.errors} failed, best {_ms(run.best_ms)} ms, "
                  f"{run.seconds:.0f} s", file=sys.stderr, flush=True)

    agg = save(root, meta, results)
    plot = plot_curves(results, root / "curves.png")
    print(markdown(results, agg, meta))
    print(f"\nwritten: {root / 'efficiency.json'}, {root / 'curves.csv'}" + (f", {plot}" if plot else " (no matplotlib: no plot)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
