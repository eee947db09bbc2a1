"""Tuning seeds every task with the default schedule, so a tuned kernel replaces the default
one only where it measured faster (MetaSchedule applies the fastest record of a kernel)."""

import json
import logging

import pytest
import tvm_ffi

import hwcompress
from hwcompress import build as B
from hwcompress.api import import_model
from hwcompress.targets import load_target
from hwcompress.tuning import STATE, TaskReport, TuneResult, seed_default_schedules, tune
from model_builders import tiny_cnn

TRIALS = 2  # the seeds are what is tested; the search only has to run


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    spec = load_target("host")
    work = tmp_path_factory.mktemp("seeded")
    result = tune(tiny_cnn(batch=1), spec, trials=TRIALS, work_dir=work, trials_per_iter=TRIALS, progress=lambda _: None)
    mod = B.legalize(import_model(tiny_cnn(batch=1), spec).mod, spec)  # what tune and compile build
    return spec, mod, work, result


def _records_by_workload(work) -> dict[int, list[list]]:
    """Workload index -> its records' JSON, in the order they were committed."""
    by_workload = {}
    for line in (work / "database_tuning_record.json").read_text().splitlines():
        index, record = json.loads(line)
        by_workload.setdefault(index, []).append(record)
    return by_workload


def _mean_secs(record_json) -> float:
    run_secs = record_json[1]  # [trace, run_secs, target, args_info]
    return sum(float(s) for s in run_secs) / len(run_secs)


def test_every_task_is_seeded_and_the_seed_is_the_default_schedule(tuned, tmp_path):
    spec, mod, work, result = tuned
    assert {t.name for t in result.tasks} == set(B.kernels(mod))
    assert all(t.default_ms is not None and t.default_ms > 0 for t in result.tasks), result.table()
    by_workload = _records_by_workload(work)
    workloads = (work / "database_workload.json").read_text().splitlines()
    assert sorted(by_workload) == list(range(len(workloads))) and len(workloads) == len(result.tasks)
    records = sum(len(r) for r in by_workload.values())
    assert records == len(result.tasks) + result.trials_total  # one seed per task, then the trials

    # a database of the seeds alone (each workload's first record) gives the default kernels
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "database_workload.json").write_text("\n".join(workloads) + "\n")
    (seeds / "database_tuning_record.json").write_text(
        "".join(json.dumps([i, recs[0]]) + "\n" for i, recs in sorted(by_workload.items()))
    )
    from_seeds = B.apply_database(mod, spec.tvm_target(), seeds)
    default = B.default_schedule(mod, spec)
    assert B.scheduled_kernels(from_seeds) == B.kernels(mod)
    for name in B.kernels(mod):
        assert tvm_ffi.structural_equal(from_seeds[name].body, default[name].body), name


def test_the_applied_record_is_the_seed_or_faster(tuned):
    from tvm.s_tir import meta_schedule as ms

    spec, mod, work, result = tuned
    target = spec.tvm_target()
    db = ms.database.JSONDatabase(work_dir=str(work))
    default_ms = {t.name: t.default_ms for t in result.tasks}
    for task in ms.relax_integration.extract_tasks(mod, target):
        top = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
        assert len(top) == 1, task.task_name
        top_ms = 1e3 * sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
        assert top_ms <= default_ms[task.task_name] * (1 + 1e-6), task.task_name


def test_build_with_the_seeded_database_matches_onnxruntime(tuned, tmp_path):
    spec, mod, work, _ = tuned
    artifact = hwcompress.compile(tiny_cnn(batch=1), out=tmp_path / "a", databases=[work])
    assert artifact.manifest["kernels"]["default_schedule"] == []  # every kernel from the database
    assert artifact.manifest["verification"]["status"] == "passed"  # vs ONNX Runtime, rtol 1e-3 atol 1e-4


def test_table_shows_default_and_speedup():
    result = TuneResult("w", "host", 4, 4, 1.0, [TaskReport("k", default_ms=2.0, best_ms=1.0, trials=4)])
    header, _, row = result.table().splitlines()
    assert "default ms" in header and "speedup" in header
    assert "2" in row and "2x" in row


def test_old_state_without_default_ms_loads(tmp_path):
    from hwcompress.tuning import _load_state

    old = {"tasks": [{"name": "k", "flops": 1.0, "trials": 3, "errors": 0, "best_ms": 0.5, "finished": False}]}
    (tmp_path / STATE).write_text(json.dumps(old))
    report = TaskReport(**_load_state(tmp_path)["k"])
    assert report.trials == 3 and report.default_ms is None


def test_seeding_failures_do_not_raise(caplog, tmp_path):
    """A backend whose default schedule raises, and a builder that raises: logged, no seeds."""
    from dataclasses import replace
    from unittest import mock

    from tvm.s_tir import meta_schedule as ms

    spec = load_target("host")
    mod = B.legalize(hwcompress.import_onnx(tiny_cnn(batch=1)), spec)
    tasks = ms.relax_integration.extract_tasks(mod, spec.tvm_target())
    reports = {t.task_name: TaskReport(t.task_name) for t in tasks}
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))

    class Broken:
        def build(self, _inputs):
            raise RuntimeError("builder down")

    def bad_rule(_target):
        def schedule_of(_mod):
            raise ValueError("rule broke")

        return schedule_of

    from hwcompress import backends

    cpu = backends.get_backend(spec)
    with caplog.at_level(logging.WARNING, logger="hwcompress.tuning"):
        with mock.patch.object(backends, "get_backend", lambda _spec: replace(cpu, default_trace=bad_rule)):
            assert seed_default_schedules(tasks, reports, spec, Broken(), None, db, lambda _: None) == 0
        assert seed_default_schedules(tasks, reports, spec, Broken(), None, db, lambda _: None) == 0
    assert "rule broke" in caplog.text and "builder down" in caplog.text
    assert all(r.default_ms is None for r in reports.values())
    assert len(db) == 0


def test_pretune_ships_only_records_faster_than_the_seed(tuned, tmp_path, monkeypatch):
    """The tuned run's records plus two synthetic ones for one kernel: an untuned kernel
    "measured" 1000x faster than its seed (shipped) and one 1000x slower (not shipped)."""
    import shutil
    from pathlib import Path

    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from tool_modules import load_tool

    pretune = load_tool("pretune")

    spec, mod, work, result = tuned
    work = Path(shutil.copytree(work, tmp_path / "work"))
    target = spec.tvm_target()
    db = ms.database.JSONDatabase(work_dir=str(work))
    task = max(result.tasks, key=lambda t: t.default_ms)
    func_mod = next(t for t in ms.relax_integration.extract_tasks(mod, target) if t.task_name == task.name).dispatched[0]
    workload = db.commit_workload(func_mod)
    untuned = s_tir.Schedule(func_mod)
    untuned.get_sblock("root")  # the kernel as legalized: not the default schedule's kernel
    untuned = untuned.trace  # (an empty trace would be skipped by MetaSchedule's databases)
    args = ms.arg_info.ArgInfo.from_entry_func(func_mod)
    for factor in (1e-3, 1e3):
        secs = task.default_ms / 1e3 * factor
        db.commit_tuning_record(ms.database.TuningRecord(untuned, workload, [secs], target, args))

    lines = []
    count = pretune.ship([work], tmp_path / "out", "host", emit=lines.append)
    rows = lines[1:]
    assert len(rows) == len(result.tasks)  # one line per workload, each with its default
    assert not any("no measured default" in row for row in rows), lines
    assert sum(row.endswith(" shipped") for row in rows) == count >= 1, lines
    (row,) = [r for r in rows if r.split()[0].endswith("/" + task.name)]
    assert row.endswith(" shipped") and "1e+03x" in row.replace("1000.00x", "1e+03x"), row
    shipped = ms.database.JSONDatabase(work_dir=str(tmp_path / "out"))
    assert len(shipped) == count
    best = shipped.get_top_k(shipped.commit_workload(func_mod), 1)[0]
    assert abs(float(best.run_secs[0]) - task.default_ms / 1e6) < 1e-3 * task.default_ms / 1e6

    # --coverage: a build of the model applies the shipped records; an empty database none
    monkeypatch.setattr(pretune, "models", lambda: {"tiny": (lambda: tiny_cnn(batch=1), None)})
    assert pretune.coverage("host", ["tiny"], emit=lines.append, databases=[tmp_path / "out"]) == {"tiny": (count, len(result.tasks))}
    assert pretune.coverage("host", ["tiny"], emit=lines.append, databases=[]) == {"tiny": (0, len(result.tasks))}
    assert lines[-1].startswith("tiny: 0 of ")


def test_a_kernel_without_default_rule_is_seeded_as_legalized():
    """No rule fits: the seed is the kernel as legalized, with a non-empty trace (MetaSchedule
    skips records with an empty one) that the database applies as a no-op."""
    from tvm.s_tir import meta_schedule as ms

    from hwcompress.tuning import seed_schedule

    spec = load_target("host")
    target = spec.tvm_target()
    mod = B.legalize(import_model(tiny_cnn(batch=1), spec).mod, spec)
    func_mod = ms.relax_integration.extract_tasks(mod, target)[0].dispatched[0]
    sch = seed_schedule(lambda _mod: None, func_mod)
    assert len(sch.trace.insts) >= 1 and tvm_ffi.structural_equal(sch.mod, func_mod)
    db = ms.database.MemoryDatabase()
    workload = db.commit_workload(func_mod)
    args = ms.arg_info.ArgInfo.from_entry_func(func_mod)
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6], target, args))
    applied = db.query_schedule(func_mod, target, workload_name="main")
    assert applied is not None and tvm_ffi.structural_equal(applied.mod, func_mod)
