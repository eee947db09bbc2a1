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


def legalize_passes(fuse: bool = True, legalize_map: dict | None = None, before_legalize: Sequence = ()) -> list:
    """The passes of ``legalize``; ``fuse=False`` leaves every op its own kernel;
    ``legalize_map`` overrides TVM's legalization of some ops (the backend's, see ``legalize``);
    ``before_legalize``: graph passes that need the folded constants but come before
    ``LegalizeOps`` (the sparse layers' epilogue fusion).

    ``FuseTIR`` runs either way: it only merges groups that already exist (e.g. the
    ``fuse`` technique's pattern groups), which would otherwise stay Relax functions calling
    several kernels.
    """
    from tvm import relax

    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        *before_legalize,
        relax.transform.LegalizeOps(legalize_map),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        *([relax.transform.FuseOps()] if fuse else []),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def legalize(mod, spec: TargetSpec, fuse: bool = True, blocks: bool = True):
    """Graph-level lowering to (fused) TIR kernels: the tuning task boundary. ``blocks``: the
    backend's multi-layer kernels (``Backend.fusion_passes``) where ``fuse`` is on; after 2:4
    sparsity, of the layers without 2:4 weights only (the sparse layers keep their sparse kernels)."""
    import tvm

    target = spec.tvm_target()
    sparse = has_sparsity(mod)
    variants = sparse_variants(mod)
    lmap = backend_legalize_map(spec, sparse=sparse, winograd=winograd_allowed(mod), variants=variants)
    backend = get_backend(spec)
    graph = backend.fusion_passes(target, sparse=sparse) if fuse and blocks and backend.fusion_passes else []
    epilogues = [sparse_epilogue_pass(spec, variants)] if sparse and fuse and backend.sparse_epilogue else []
    return _run_stage("legalize", tvm.transform.Sequential([*graph, *legalize_passes(fuse, lmap, epilogues)]), mod, target)


def sparse_epilogue_pass(spec: TargetSpec, variants: dict | None = None):
    """``sparse_lower.fuse_epilogues`` with ``spec``'s backend kernels (the variant per GEMM
    shape: ``sparse_variants``)."""
    from .backends.sparse_lower import fuse_epilogues

    backend, target, chosen = get_backend(spec), spec.tvm_target(), variants or {}
    return fuse_epilogues(
        lambda m, n, k, w, epilogue, perm: backend.sparse_kernel(target, m, n, k, w, chosen.get((m, n, k)), epilogue=epilogue, perm=perm)
    )


# Module attribute: False when the build's Winograd is off (``--winograd off``, or a target
# whose ``[hardware].winograd`` is false), set by ``api.import_model``; the backend's integer
# kernels then use no Winograd either (the float convs' Winograd is a recipe step).
WINOGRAD_ATTR = "hwc.winograd"


# Module attribute: False when the build makes no multi-layer block kernels (``--no-fuse``,
# ``--no-fuse-blocks``), set by ``api.import_model`` before the recipe runs: ``sparse-2-4``
# then times the layers that blocks would otherwise absorb.
BLOCKS_ATTR = "hwc.blocks"


def blocks_allowed(mod) -> bool:
    return mod.attrs is None or bool(mod.attrs.get(BLOCKS_ATTR, True))


def winograd_allowed(mod) -> bool:
    return mod.attrs is None or bool(mod.attrs.get(WINOGRAD_ATTR, True))


def has_sparsity(mod) -> bool:
    """Whether the ``sparse-2-4`` technique ran on ``mod`` (its 2:4 layers get sparse kernels)."""
    from .passes.sparsity.sparse24 import REPORT_ATTR

    return mod.attrs is not None and REPORT_ATTR in mod.attrs


def sparse_variants(mod) -> dict[tuple[int, int, int], str]:
    """``{(m, n, k): variant name}``: the 2:4 kernel variant the ``sparse-2-4`` technique
    measured fastest for each GEMM shape of its sparse layers (its report's ``gemm`` and
    ``variant``; layers of one shape share it)."""
    import json

    from .passes.sparsity.sparse24 import REPORT_ATTR

    if not has_sparsity(mod):
        return {}
    layers = json.loads(str(mod.attrs[REPORT_ATTR])).get("layers", [])
    return {tuple(r["gemm"]): r["variant"] for r in layers if r.get("sparse") and r.get("variant") and r.get("gemm")}


def backend_legalize_map(spec: TargetSpec, sparse: bool = False, winograd: bool = True, variants: dict | None = None) -> dict | None:
    """The backend's own legalizations for ``spec`` (None: TVM's for every op); ``sparse``: convs
    and matmuls with 2:4 weights become the backend's sparse kernel (``backends.sparse_lower``)
    — only after the ``sparse-2-4`` technique, which keeps 2:4 weights exactly where sparse was
    chosen (an imported model that happens to be 2:4 is not run sparse unmeasured);
    ``winograd``: whether the backend's integer kernels may use Winograd (``WINOGRAD_ATTR``);
    ``variants``: the sparse kernel variant per GEMM shape (``sparse_variants``; else defaults)."""
    backend = get_backend(spec)
    target = spec.tvm_target()
    lmap = backend.legalize_map(target, winograd=winograd) if backend.legalize_map else None
    if not sparse or backend.sparse_kernel is None:
        return lmap
    import tvm

    from .backends.sparse_lower import sparse_legalize

    lmap = dict(lmap or {})
    chosen = variants or {}
    for op in ("relax.nn.conv2d", "relax.matmul"):
        inner = lmap.get(op) or tvm.ir.Op.get(op).get_attr("FLegalize")
        int8 = None if backend.sparse_kernel_int8 is None else lambda m, n, k, w: backend.sparse_kernel_int8(target, m, n, k, w)
        lmap[op] = sparse_legalize(inner, lambda m, n, k, w: backend.sparse_kernel(target, m, n, k, w, chosen.get((m, n, k))), int8)
    return lmap


def schedule(mod, spec: TargetSpec, databases: Sequence[str | Path] = ()):
    """Apply tuned databases, then default schedules to whatever is left unscheduled."""
    return default_schedule(apply_databases(mod, spec, databases), spec)


def apply_databases(mod, spec: TargetSpec, databases: Sequence[str | Path] = ()):
    """Replace kernels that any of the databases has tuned records for (first match wins)."""
    target = spec.tvm_target()
    for db_dir in databases:
        mod = apply_database(mod, target, db_dir)
    return mod


def default_schedule(mod, spec: TargetSpec):
    """The backend's default schedules for every kernel still unscheduled."""
    target = spec.tvm_target()
    return _run_stage("schedule", get_backend(spec).default_schedule(target), mod, target)


def scheduled_kernels(mod) -> list[str]:
    """Names of the kernels already carrying a schedule (e.g. from a tuning database)."""
    import tvm

    names = []
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and (
            func.attrs.get("tirx.is_scheduled") or func.attrs.get("tir.is_scheduled")
        ):
            names.append(gv.name_hint)
    return sorted(names)


def kernels(mod) -> list[str]:
    """Names of all TIR kernels of a lowered module."""
    import tvm

    return sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def apply_database(mod, target, db_dir: str | Path):
    """Replace kernels that ``db_dir``'s JSON database has tuned records for (a kernel
    already scheduled, e.g. by an earlier database, is left as it is)."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    workload, records = database_files(db_dir)
    database = ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records), allow_missing=False)
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def database_files(db_dir: str | Path) -> tuple[Path, Path]:
    """The two JSON files of a MetaSchedule database directory; ``DataError`` if absent."""
    from .errors import DataError

    db_dir = Path(db_dir)
    workload, records = db_dir / "database_workload.json", db_dir / "database_tuning_record.json"
    if not (workload.is_file() and records.is_file()):
        raise DataError(f"{db_dir}: not a tuning database (needs {workload.name} and {records.name}; `hwc tune` writes them)")
    return workload, records


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
