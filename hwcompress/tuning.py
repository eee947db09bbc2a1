"""Autotuning with MetaSchedule's XGBoost cost model, resumable, with live progress.

The tasks are the fused kernels of the model *as it will be built* (after the recipe and
``build.legalize``), so the database matches what ``hwc build --db`` looks up. The work dir
holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) and ``hwc_tune_state.json`` (trials run per task, whether
the search finished it). Running ``tune`` again continues: trials already run count toward
``trials``; tasks whose search finished are not measured again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import HwcError
from .targets import TargetSpec, load_target

STATE = "hwc_tune_state.json"
# MetaSchedule's default 30 s builder timeout fails candidates on a busy 2-core machine
BUILD_TIMEOUT_S = 120
DB_FILES = ("database_workload.json", "database_tuning_record.json")


class TuningError(HwcError):
    """Tuning cannot start or its work dir is unusable."""


@dataclass
class TaskReport:
    name: str
    flops: float = 0.0
    trials: int = 0
    errors: int = 0
    best_ms: float | None = None
    finished: bool = False


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
        rows = [("task", "MFLOPs", "trials", "errors", "best ms", "done")]
        for t in self.tasks:
            best = f"{t.best_ms:.4g}" if t.best_ms is not None else "-"
            rows.append((t.name, f"{t.flops / 1e6:.2f}", str(t.trials), str(t.errors), best, "yes" if t.finished else ""))
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
    from .api import import_model
    from .build import legalize

    if trials < 1:
        raise TuningError(f"--trials must be >= 1, got {trials}")
    spec = load_target(target)
    work = Path(work_dir) if work_dir is not None else default_work_dir(model, spec)
    from .optimize import as_optimize

    optimize = as_optimize(optimize)
    mod = legalize(import_model(model, spec, input_shapes, recipe, optimize=optimize).mod, spec, fuse=optimize.fuse)
    return tune_module(mod, spec, trials, work, tracker, key, trials_per_iter=trials_per_iter, seed=seed, progress=progress)


def tune_module(mod, spec: TargetSpec, trials: int, work: Path, tracker=None, key=None, *, trials_per_iter=16, seed=None, progress=None) -> TuneResult:
    """Tune an already legalized module (see ``tune``)."""
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    work.mkdir(parents=True, exist_ok=True)
    repair_database(work)
    state = _load_state(work)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    reports = {t.task_name: TaskReport(**state.get(t.task_name, {"name": t.task_name})) for t in extracted}
    already = sum(r.trials for r in reports.values())
    pending = [t for t in extracted if not reports[t.task_name].finished]
    budget = trials - already
    start = time.perf_counter()
    if budget <= 0 or not pending:
        return TuneResult(work, spec.name, trials, 0, 0.0, list(reports.values()))

    runner = _runner(spec, tracker, key)
    # MetaSchedule prints a full statistics table per batch to stdout at INFO; its files in
    # work_dir/logs keep everything, the console gets our one-line progress instead
    quiet_metaschedule_console()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(pending, str(work), seed=seed)
    database = ms.database.JSONDatabase(work_dir=str(work))
    callback = _progress_callback(reports, work, budget, progress or _stderr)
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work),
            max_trials_global=budget,
            max_trials_per_task=budget,
            num_trials_per_iter=min(trials_per_iter, budget),
            builder=candidate_builder(),
            runner=runner,
            database=database,
            cost_model="xgb",
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [callback],
        )
        if sum(r.trials for r in reports.values()) - already < budget:
            # the budget was not used up, so every search ended on its own: space exhausted
            for context in contexts:
                reports[context.task_name].finished = True
    finally:
        _save_state(work, reports)
    run_now = sum(r.trials for r in reports.values()) - already
    return TuneResult(work, spec.name, trials, run_now, time.perf_counter() - start, list(reports.values()))


def build_candidate(mod, target, _params):
    """MetaSchedule's default candidate build without its ``import tvm.s_tir.tensor_intrin``:
    that import parses hundreds of TVMScript functions (~30 s of CPU) in every batch's fresh
    build worker. (Tensorizing schedule rules, e.g. for INT8 dot products, will need it.)"""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def candidate_builder():
    """The builder tuning uses: ``build_candidate`` with a timeout that a busy machine meets."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate)


def quiet_metaschedule_console() -> None:
    """MetaSchedule prints a full statistics table per batch to stdout at INFO; its log files
    in ``work_dir/logs`` keep everything, the console gets our one-line progress instead.

    Also drops unnamed handlers from its logger: MetaSchedule's logging setup lists handlers
    by name, and an unnamed one (pytest's capture handler) makes a second tuning run in the
    same process fail with "'NoneType' object has no attribute 'format'".
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in logger.handlers if h.get_name() is None]:
        logger.removeHandler(handler)
    if logger.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
        logger.setLevel(logging.WARNING)


def _runner(spec: TargetSpec, tracker: str | None, key: str | None):
    if tracker is None:
        return "local"
    from .farm import rpc_runner

    key = key or spec.tuning.rpc_key
    if not key:
        raise TuningError(f"target {spec.name} has no [tuning].rpc_key; pass --key")
    return rpc_runner(tracker, key)


def _progress_callback(reports: dict[str, TaskReport], work: Path, budget: int, emit):
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
                if b.error_msg or r.error_msg or not r.run_secs:
                    report.errors += 1
                    continue
                ms_ = 1e3 * sum(float(s) for s in r.run_secs) / len(r.run_secs)
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

    return _Progress()


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
