"""Tuning databases: a tuned build really uses the tuned kernels; tuning resumes; a torn
database line (Ctrl-C during a write) is repaired."""

import json

import numpy as np
import pytest
import tvm_ffi

import hwcompress
from hwcompress import build as B
from hwcompress.api import import_model
from hwcompress.targets import load_target
from hwcompress.tuning import STATE, repair_database, tune
from model_builders import tiny_cnn


@pytest.fixture(scope="module")
def lowered():
    spec = load_target("host")
    return spec, B.legalize(hwcompress.import_onnx(tiny_cnn(batch=1)), spec)


def _synthetic_database(spec, mod, work_dir):
    """One record per task: the last design of MetaSchedule's own space, without measuring
    (deterministic, fast), so the test checks that records are applied, not their speed."""
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    work_dir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    for task in tasks:
        func_mod = task.dispatched[0]
        ctx = ms.TuneContext(mod=func_mod, target=target, space_generator="post-order-apply", search_strategy="replay-trace", task_name=task.task_name)
        sch = ctx.generate_design_space()[-1]
        workload = db.commit_workload(func_mod)
        args = ms.arg_info.ArgInfo.from_prim_func(func_mod["main"])
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-3], target, args))
    return db, tasks


def test_tuned_build_uses_the_database_kernels(lowered, tmp_path):
    spec, mod = lowered
    db, tasks = _synthetic_database(spec, mod, tmp_path / "db")
    target = spec.tvm_target()
    tuned = B.schedule(mod, spec, [tmp_path / "db"])
    untuned = B.schedule(mod, spec)
    differs = 0
    for task in tasks:
        expected = db.query_schedule(task.dispatched[0], target, workload_name="main").mod["main"]
        assert tvm_ffi.structural_equal(tuned[task.task_name].body, expected.body), task.task_name
        differs += not tvm_ffi.structural_equal(untuned[task.task_name].body, expected.body)
    assert differs > 0, "the default schedules coincide with the database: the test would prove nothing"


def test_compile_with_db_records_tuned_kernels_and_verifies(tmp_path):
    spec = load_target("host")
    model = tiny_cnn(batch=1)
    mod = B.legalize(import_model(model, spec).mod, spec)  # as compile builds it (default optimizations)
    _synthetic_database(spec, mod, tmp_path / "db")
    artifact = hwcompress.compile(model, out=tmp_path / "a", databases=[tmp_path / "db"])
    kernels = artifact.manifest["kernels"]
    assert kernels["default_schedule"] == [] and len(kernels["tuned"]) == len(B.kernels(mod))
    assert artifact.manifest["verification"]["status"] == "passed"
    plain = hwcompress.compile(model, out=tmp_path / "b")
    assert plain.manifest["kernels"]["tuned"] == []


def test_repair_drops_only_a_torn_last_line(tmp_path):
    good = [json.dumps([i, {"x": i}]) for i in range(3)]
    (tmp_path / "database_tuning_record.json").write_text("\n".join(good) + '\n[3, {"x": ')
    (tmp_path / "database_workload.json").write_text("\n".join(good) + "\n")
    assert repair_database(tmp_path) == 1
    assert (tmp_path / "database_tuning_record.json").read_text().splitlines() == good
    assert (tmp_path / "database_workload.json").read_text().splitlines() == good


def test_tune_writes_database_and_resumes(tmp_path):
    lines = []
    result = tune(tiny_cnn(batch=1), "host", trials=4, work_dir=tmp_path, trials_per_iter=4, progress=lines.append)
    assert result.trials_run_now == result.trials_total >= 4
    assert lines and lines[-1].startswith("tune: ") and "ETA" in lines[-1]
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1
    state = json.loads((tmp_path / STATE).read_text())
    assert sum(t["trials"] for t in state["tasks"]) == result.trials_total
    again = tune(tiny_cnn(batch=1), "host", trials=4, work_dir=tmp_path, trials_per_iter=4, progress=lines.append)
    assert again.trials_run_now == 0
    assert (tmp_path / "database_tuning_record.json").read_text().splitlines() == records
    assert "fused_conv2d_add_relu" in again.table()


def test_bad_trials():
    from hwcompress.tuning import TuningError

    with pytest.raises(TuningError, match="--trials"):
        tune(tiny_cnn(batch=1), trials=0)
