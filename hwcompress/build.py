"""Lowering and building: Relax graph -> fused TIR kernels -> schedules -> executable.

Stages, each ``IRModule -> IRModule``:

1. ``legalize``: inference decompositions, constant folding, legalization to TIR, fusion.
   This is the module *as it will be built*; tuning extracts its tasks from exactly here.
2. ``schedule``: apply MetaSchedule databases (shipped ``schedules/<target>/`` and the user's),
   then the backend's default schedules for every kernel still unscheduled.
3. ``build``: VM lowering and codegen with ``tvm.compile`` (no second legalization/fusion:
   re-fusing after the database was applied would silently drop tuned kernels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .backends import get_backend
from .errors import BuildError
from .targets import TargetSpec

log = logging.getLogger(__name__)


def legalize(mod, spec: TargetSpec):
    """Graph-level lowering to fused TIR kernels (the tuning task boundary)."""
    import tvm
    from tvm import relax

    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    target = spec.tvm_target()
    return _run_stage("legalize", tvm.transform.Sequential(passes), mod, target)


def schedule(mod, spec: TargetSpec, databases: Sequence[str | Path] = ()):
    """Apply tuned databases, then default schedules to whatever is left unscheduled."""
    import tvm

    target = spec.tvm_target()
    for db_dir in databases:
        mod = apply_database(mod, target, db_dir)
    backend = get_backend(spec)
    return _run_stage("schedule", backend.default_schedule(target), mod, target)


def apply_database(mod, target, db_dir: str | Path):
    """Replace kernels that ``db_dir``'s JSON database has tuned records for."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    workload = db_dir / "database_workload.json"
    records = db_dir / "database_tuning_record.json"
    if not (workload.is_file() and records.is_file()):
        return mod
    database = ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records), allow_missing=False)
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def build(mod, spec: TargetSpec):
    """Codegen a scheduled module into a ``tvm.runtime.Executable``."""
    import tvm

    backend = get_backend(spec)
    target = spec.tvm_target()
    with backend.codegen_context(spec):
        try:
            return tvm.compile(mod, target=target, relax_pipeline=backend.finalize_pipeline(target))
        except Exception as e:  # TVM errors carry long C++ traces; keep the last line
            raise BuildError(f"codegen for {spec.name}: {_last_line(e)}") from e


def _run_stage(stage: str, seq, mod, target):
    try:
        with target:
            return seq(mod)
    except Exception as e:
        raise BuildError(f"{stage}: {_last_line(e)}") from e


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
