"""Autotuning with MetaSchedule's XGBoost cost model, resumable, with live progress.

The tasks are the fused kernels of the model *as it will be built* (after the recipe and
``build.legalize``), so the database matches what ``hwc build --db`` looks up. The work dir
holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) and ``hwc_tune_state.json`` (trials run per task, whether
the search finished it, the default schedule's latency). Running ``tune`` again continues:
trials already run count toward ``trials``; tasks whose search finished are not measured
again.

Every task's database starts with the backend's default schedule (the kernel a build without
the database gets), measured like any candidate. MetaSchedule applies the fastest record of a
kernel, so a tuned schedule replaces the default only where it measured faster, and the
evolutionary search starts from the default.

Ctrl-C stops after the batch being measured (its results are kept; ``TuningInterrupted``);
a second Ctrl-C ends the process at once (exit code 130) after saving the state. Either way
``tune`` resumes from the work dir.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import HwcError
from .targets import TargetSpec, load_target
from .tuning_seed import mean_seconds, seed_default_schedules, seed_schedule  # noqa: F401 (public here)
from .tuning_workers import (  # noqa: F401 (public here; workers unpickle build_candidate by this path)
    BUILD_TIMEOUT_S,
    CtrlC,
    StopAfterBatch,
    build_candidate,
    candidate_builder,
    ignore_sigint,
    import_tensor_intrin,
    kill_workers,
    quiet_metaschedule_console,
)

STATE = "hwc_tune_state.json"
DB_FILES = ("database_workload.json", "database_tuning_record.json")




class TuningError(HwcError):
    """Tuning cannot start or its work dir is unusable."""


class TuningInterrupted(HwcError):
    """Ctrl-C stopped tuning; what was measured is in the work dir and tuning again resumes."""

    exit_code = 130


@dataclass
class TaskReport:
    name: str
    flops: float = 0.0
    trials: int = 0
    errors: int = 0
    best_ms: float | None = None
    finished: bool = False
    default_ms: float | None = None  # the seed: the backend's default schedule, measured
    skipped: str | None = None  # why it is not tuned (keeps its default schedule)


@dataclass
class TuneResult:
    work_dir: Path
    target: str
    trials_requested: int
    trials_run_now: int
    seconds: float
    tasks: list[TaskReport] = field(default_factory=list)

    @property
    def trials_total(self) -> int:
        return sum(t.trials for t in self.tasks)

    def to_dict(self) -> dict:
        return {
            "work_dir": str(self.work_dir),
            "target": self.target,
            "trials_requested": self.trials_requested,
            "trials_run_now": self.trials_run_now,
            "trials_total": self.trials_total,
            "seconds": round(self.seconds, 1),
            "tasks": [asdict(t) for t in self.tasks],
        }

    def table(self) -> str:
        """One row per task; "speedup" is default ms / best ms (below 1: the build keeps the
        default schedule, the database's fastest record of that kernel)."""
        rows = [("task", "MFLOPs", "trials", "errors", "default ms", "best ms", "speedup", "done")]
        for t in self.tasks:
            default = f"{t.default_ms:.4g}" if t.default_ms is not None else "-"
            best = f"{t.best_ms:.4g}" if t.best_ms is not None else "-"
            speedup = f"{t.default_ms / t.best_ms:.3g}x" if t.default_ms and t.best_ms else "-"
            done = "yes" if t.finished else (f"skipped ({t.skipped})" if t.skipped else "")
            rows.append((t.name, f"{t.flops / 1e6:.2f}", str(t.trials), str(t.errors), default, best, speedup, done))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def default_work_dir(model, spec: TargetSpec) -> Path:
    stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
    return Path("tuning") / f"{stem}-{spec.name}"


def tune(
    model,
    target: str | TargetSpec = "host",
    trials: int = 64,
    work_dir: str | os.PathLike | None = None,
    tracker: str | None = None,
    key: str | None = None,
    input_shapes=None,
    recipe=None,
    *,
    trials_per_iter: int = 16,
    seed: int | None = None,
    progress=None,
    optimize=None,
) -> TuneResult:
    """Tune the kernels of ``model`` for ``target`` and write a JSON database in ``work_dir``.

    Parameters
    ----------
    trials : total measurement trials for the model, counting those already in ``work_dir``
    tracker, key : measure on farm devices through a TVM RPC tracker (``HOST:PORT``); ``key``
        defaults to the target file's ``[tuning].rpc_key``
    progress : callable receiving one status line per measured batch (default: stderr)
    optimize : as in ``compile`` (``Optimize``): the build that will use the database must use
        the same settings, or its kernels will not match the database
    """
    if trials < 1:
        raise TuningError(f"--trials must be >= 1, got {trials}")
    spec = load_target(target)
    work = Path(work_dir) if work_dir is not None else default_work_dir(model, spec)
    mod = legalized_model(model, spec, input_shapes, recipe, optimize)
    return tune_module(mod, spec, trials, work, tracker, key, trials_per_iter=trials_per_iter, seed=seed, progress=progress)


def legalized_model(model, spec: TargetSpec, input_shapes=None, recipe=None, optimize=None):
    """The legalized module whose kernels ``tune`` tunes: the model imported and lowered as a
    build with the same ``recipe`` and ``optimize`` lowers it (the kernels a database matches)."""
    from .api import import_model
    from .build import legalize
    from .optimize import as_optimize

    optimize = as_optimize(optimize)
    return legalize(import_model(model, spec, input_shapes, recipe, optimize=optimize).mod, spec, fuse=optimize.fuse, blocks=optimize.blocks)


# Kernels below this share of the model's time (their measured default schedule x how often
# they run; FLOPs where nothing was measured) are not tuned: MetaSchedule's task scheduler gives
# every task a full batch of trials before it looks at gradients, and a reshape or a bias add
# would take as many as the convolutions.
MIN_SHARE = 0.005


def tune_module(
    mod,
    spec: TargetSpec,
    trials: int,
    work: Path,
    tracker=None,
    key=None,
    *,
    trials_per_iter=16,
    seed=None,
    progress=None,
    min_share: float = MIN_SHARE,
) -> TuneResult:
    """Tune an already legalized module (see ``tune``); kernels with less than ``min_share``
    of the module's time keep their default schedule (``small_tasks``)."""
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    work.mkdir(parents=True, exist_ok=True)
    repair_database(work)
    state = _load_state(work)
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target) if not hand_scheduled(t)]
    reports = {t.task_name: TaskReport(**state.get(t.task_name, {"name": t.task_name})) for t in extracted}
    already = sum(r.trials for r in reports.values())
    _count_flops(extracted, reports)
    pending = [t for t in extracted if not reports[t.task_name].finished]
    budget = trials - already
    start = time.perf_counter()
    if budget <= 0 or not pending:
        return TuneResult(work, spec.name, trials, 0, 0.0, list(reports.values()))

    emit = progress or _stderr
    quiet_metaschedule_console()
    builder, runner = candidate_builder(), _runner(spec, tracker, key)
    import_tensor_intrin()  # what the tune contexts import, quickly
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(pending, str(work), seed=seed)
    database = ms.database.JSONDatabase(work_dir=str(work))
    ctrl_c = CtrlC(stop_now=lambda: (_save_state(work, reports), kill_workers()))
    callback = _progress_callback(reports, work, budget, emit, ctrl_c)
    try:
        with ctrl_c:
            postprocs = {c.task_name: list(c.space_generator.postprocs) for c in contexts}
            seed_default_schedules(extracted, reports, spec, builder, runner, database, emit, postprocs)
            contexts, weights = _without_small(contexts, weights, extracted, reports, min_share)
            if not ctrl_c.requested and contexts:
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=str(work),
                    max_trials_global=budget,
                    max_trials_per_task=budget,
                    num_trials_per_iter=min(trials_per_iter, budget),
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model="xgb",
                    # ours after AddToDatabase: a stop it asks for keeps the batch's records
                    measure_callbacks=[
                        ms.measure_callback.AddToDatabase(),
                        ms.measure_callback.RemoveBuildArtifact(),
                        callback,
                        ms.measure_callback.UpdateCostModel(),
                    ],
                )
                if sum(r.trials for r in reports.values()) - already < budget:
                    # the budget was not used up, so every search ended on its own: space exhausted
                    for context in contexts:
                        reports[context.task_name].finished = True
    except BaseException:
        if not ctrl_c.requested:
            raise
    finally:
        _save_state(work, reports)
    run_now = sum(r.trials for r in reports.values()) - already
    if ctrl_c.requested:
        kill_workers()
        total = sum(r.trials for r in reports.values())
        raise TuningInterrupted(
            f"tuning stopped by Ctrl-C: {run_now} trials now, {total} in all, kept in {work}; "
            f"run the same `hwc tune` command again (same --work-dir) to resume"
        )
    return TuneResult(work, spec.name, trials, run_now, time.perf_counter() - start, list(reports.values()))


def hand_scheduled(task) -> bool:
    """Whether an extracted task is one of the backends' hand-written kernels (marked
    ``tirx.is_scheduled``: 2:4 sparse GEMMs, fused inverted residuals): nothing to tune."""
    return any(bool(f.attrs and f.attrs.get("tirx.is_scheduled", False)) for f in task.dispatched[0].functions.values())


def _runner(spec: TargetSpec, tracker: str | None, key: str | None):
    if tracker is None:
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.LocalRunner(initializer=ignore_sigint)  # what "local" gives, plus that
    from .farm import rpc_runner

    key = key or spec.tuning.rpc_key
    if not key:
        raise TuningError(f"target {spec.name} has no [tuning].rpc_key; pass --key")
    return rpc_runner(tracker, key)


def _progress_callback(reports: dict[str, TaskReport], work: Path, budget: int, emit, ctrl_c=None):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    start = time.perf_counter()
    counted = [0]

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            record = task_scheduler.tasks_[task_id]
            report = reports[record.ctx.task_name]
            report.flops = float(record.flop)
            for b, r in zip(builder_results, runner_results):
                report.trials += 1
                counted[0] += 1
                secs = None if b.error_msg or r.error_msg else mean_seconds(r.run_secs)
                if secs is None:
                    report.errors += 1
                    continue
                ms_ = 1e3 * secs
                report.best_ms = ms_ if report.best_ms is None else min(report.best_ms, ms_)
            if counted[0] < budget:
                # a task the scheduler ended before the budget ran out exhausted its search
                for rec in task_scheduler.tasks_:
                    if rec.is_terminated:
                        reports[rec.ctx.task_name].finished = True
            _save_state(work, reports)
            elapsed = time.perf_counter() - start
            eta = elapsed / counted[0] * max(budget - counted[0], 0)
            done = sum(1 for r in reports.values() if r.finished)
            best = f"{report.best_ms:.4g} ms" if report.best_ms is not None else "no valid run yet"
            emit(
                f"tune: {counted[0]}/{budget} trials, {done}/{len(reports)} tasks done; "
                f"{report.name}: {report.trials} trials, best {best}; ETA {_duration(eta)}"
            )
            if ctrl_c is not None and ctrl_c.requested:
                raise StopAfterBatch()  # propagates out of the C++ task scheduler's tune loop

    return _Progress()


def small_tasks(cost: dict[str, float], weight: dict[str, float], min_share: float, what: str = "time") -> dict[str, str]:
    """Tasks whose ``cost x weight`` is below ``min_share`` of the sum, with the reason."""
    total = sum(cost[name] * weight[name] for name in cost) or 1.0
    small = {}
    for name in cost:
        share = cost[name] * weight[name] / total
        if share < min_share:
            small[name] = f"{100 * share:.2g}% of {what}"
    return small


def _count_flops(tasks, reports: dict[str, TaskReport]) -> None:
    from tvm.s_tir.analysis import estimate_tir_flops

    for t in tasks:
        report = reports[t.task_name]
        report.flops = report.flops or float(estimate_tir_flops(t.dispatched[0]))


def _without_small(contexts, weights, tasks, reports: dict[str, TaskReport], min_share: float):
    """Drop the contexts of small tasks (``small_tasks`` by measured default time when every
    task has one, else by FLOPs); a task already tuned stays."""
    timed = all(reports[t.task_name].default_ms for t in tasks)
    cost = {t.task_name: reports[t.task_name].default_ms if timed else reports[t.task_name].flops for t in tasks}
    small = small_tasks(cost, {t.task_name: float(t.weight) for t in tasks}, min_share, "time" if timed else "FLOPs")
    for t in tasks:
        report = reports[t.task_name]
        report.skipped = small.get(t.task_name) if report.trials == 0 else None
    keep = [i for i, c in enumerate(contexts) if not reports[c.task_name].skipped]
    return [contexts[i] for i in keep], [weights[i] for i in keep]


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _load_state(work: Path) -> dict:
    path = work / STATE
    if not path.is_file():
        return {}
    try:
        return {t["name"]: t for t in json.loads(path.read_text())["tasks"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TuningError(f"{path}: unreadable tuning state ({e}); delete it to start the count afresh") from None


def _save_state(work: Path, reports: dict[str, TaskReport]) -> None:
    # write-then-rename: an interrupt never leaves a half-written state file
    tmp = work / f".{STATE}.tmp"
    tmp.write_text(json.dumps({"tasks": [asdict(r) for r in reports.values()]}, indent=1))
    tmp.replace(work / STATE)


def repair_database(work: Path) -> int:
    """Drop a torn last line (an interrupted append) from the JSON database files.

    MetaSchedule appends one JSON document per line; a Ctrl-C during a write can leave a
    partial line that would make the database unreadable. Returns the lines dropped.
    """
    dropped = 0
    for name in DB_FILES:
        path = work / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        good = []
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except json.JSONDecodeError:
                dropped += 1
        if len(good) != len(lines):
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text("".join(line + "\n" for line in good))
            tmp.replace(path)
    return dropped
