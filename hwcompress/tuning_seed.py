"""Seeding a tuning task with the backend's default schedule (the kernel an untuned build
gets), measured like any candidate: MetaSchedule applies a kernel's fastest record, so a tuned
schedule replaces the default only where it measured faster, and the evolutionary search
starts from the default."""

from __future__ import annotations

import logging

log = logging.getLogger("hwcompress.tuning")

# MetaSchedule records a failed run as 1e10 s
FAILED_SECS = 1e9


def mean_seconds(run_secs) -> float | None:
    """Mean of a measurement's ``run_secs``; None for a failed run (no times, or MetaSchedule's
    1e10 s marker)."""
    if not run_secs:
        return None
    secs = sum(float(s) for s in run_secs) / len(run_secs)
    return None if secs >= FAILED_SECS else secs


def seed_default_schedules(tasks, reports, spec, builder, runner, database, emit, postprocs=None) -> int:
    """Commit the default schedule of every task that has no seed yet to ``database``.

    The seed is the backend's default schedule of the task's kernel as a trace, measured with
    the search's own builder and runner and committed as MetaSchedule's ``AddToDatabase``
    commits a candidate, so that it competes with the tuned records on equal terms. Its
    latency goes to ``TaskReport.default_ms``. A task that cannot be seeded is logged and
    tuned without a seed: seeding never stops tuning. Returns the number of seeds committed.

    ``postprocs`` (task name -> the search's postprocessors) are checked on each seed: the
    evolutionary search replays the database's best records through them and aborts the whole
    tuning run if one fails.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    from .backends import get_backend

    make = get_backend(spec).default_trace
    todo = [t for t in tasks if reports[t.task_name].default_ms is None]
    if make is None or not todo:
        return 0
    target = spec.tvm_target()
    schedule_of = make(target)
    seeds = []  # (task name, workload module, schedule)
    for task in todo:
        workload_mod = task.dispatched[0]  # the module the task's TuneContext tunes
        try:
            sch = _checked_seed(schedule_of, workload_mod, (postprocs or {}).get(task.task_name, ()))
        except Exception as e:  # noqa: BLE001 (a rule's or a check's failure: tune unseeded)
            log.warning("%s: tuning without the default schedule as seed: %s", task.task_name, last_line(e))
            continue
        seeds.append((task.task_name, workload_mod, sch))
    if not seeds:
        return 0
    emit(f"tune: measuring the default schedule of {len(seeds)} kernel(s), the baseline tuned ones must beat")
    try:
        built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in seeds])
        ran = []
        for seed, result in zip(seeds, built):
            if result.error_msg:
                log.warning("%s: the default schedule does not build: %s", seed[0], last_line(result.error_msg))
            else:
                ran.append((seed, result.artifact_path, ms.arg_info.ArgInfo.from_entry_func(seed[2].mod, remove_preproc=True)))
        # the device type string MetaSchedule's task scheduler gives the runner ("cpu", "cuda")
        device_type = tvm.runtime.device(target.get_target_device_type()).type
        futures = runner.run([ms.runner.RunnerInput(path, device_type, args) for _, path, args in ran])
        committed = 0
        for ((name, workload_mod, sch), path, args), future in zip(ran, futures):
            result = future.result()
            remove_build_dir(path)
            secs = None if result.error_msg else mean_seconds(result.run_secs)
            if secs is None:
                log.warning("%s: the default schedule does not run: %s", name, last_line(result.error_msg or "no time"))
                continue
            workload = database.commit_workload(workload_mod)
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args))
            reports[name].default_ms = 1e3 * secs
            committed += 1
    except Exception as e:  # noqa: BLE001 (e.g. the farm is gone: the search will say so)
        log.warning("tuning without default-schedule seeds: %s", last_line(e))
        return 0
    return committed


def seed_schedule(schedule_of, workload_mod):
    """The seed of a tuning task: ``schedule_of(workload_mod)`` (the backend's default
    schedule, a traced ``Schedule``), or where no default rule fits, the kernel as legalized
    (what the build leaves it as) with a trace of one no-op instruction: MetaSchedule's
    databases skip records whose trace is empty (``get_top_k``, ``query_schedule``)."""
    from tvm import s_tir

    sch = schedule_of(workload_mod)
    if sch is None:
        sch = s_tir.Schedule(workload_mod)
        sch.get_sblock("root")
    return sch


def _checked_seed(schedule_of, workload_mod, postprocs):
    """``seed_schedule``, checked the way the database and the search will use it."""
    import tvm_ffi
    from tvm import s_tir

    sch = seed_schedule(schedule_of, workload_mod)
    replayed = s_tir.Schedule(workload_mod)
    sch.trace.apply_to_schedule(replayed, remove_postproc=False)  # as query_schedule does
    if not tvm_ffi.structural_equal(replayed.mod, sch.mod):
        raise ValueError("its trace does not replay to the same kernel")
    searched = s_tir.Schedule(workload_mod)
    sch.trace.apply_to_schedule(searched, remove_postproc=True)  # as the evolutionary search does
    searched.enter_postproc()
    for postproc in postprocs:
        if not postproc.apply(searched):
            raise ValueError(f"MetaSchedule's postprocessor {type(postproc).__name__} rejects it")
    return sch


def last_line(e) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
