"""The stage wiring: ``compile(model, target, out, input_shapes, recipe) -> Artifact``."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import VerificationError
from .recipe import Recipe
from .targets import TargetSpec, load_target

log = logging.getLogger("hwcompress")

# Verification tolerance of int8 builds (rtol, and atol as a fraction of the largest reference
# output): fused int8 epilogues round float sums differently from the graph run op by op
# (FMA contraction), so a requantization now and then lands one step over, and the outputs
# move by quantization steps (Fashion classifier: under 0.5% of the largest logit).
INT8_TOLERANCE = 2e-2
# ... and of int8 layers run on an NPU: its requantization rounds half up after an int32 bias
# (docs/npu-command-stream.md) where the int8 graph rounds half to even after a float bias, so
# single activations move by one step and the steps compound over the layers (MNIST CNN, 100
# random inputs: 2.7% of the largest logit; real images: under 1%).
NPU_TOLERANCE = 5e-2


@contextlib.contextmanager
def _stage(name: str):
    start = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s done (%.1f s)", name, time.perf_counter() - start)


def find_shipped_databases(spec: TargetSpec) -> list[Path]:
    """Pre-tuned MetaSchedule databases shipped for this target (``schedules/<name>/``)."""
    from .targets import data_dir

    db = data_dir("schedules") / spec.name
    return [db] if db.is_dir() else []


@dataclass(frozen=True)
class Imported:
    """A model after import and compression: what lowering, tuning and verification start from."""

    original: Any  # onnx.ModelProto, shapes fixed: the verification reference
    inputs: list[dict]
    outputs: list[dict]
    mod: Any  # Relax IRModule after the recipe
    before: Any  # analysis.Summary of the imported module
    after: Any  # analysis.Summary after the recipe
    recipe: Recipe  # the steps that ran: the user's recipe plus the default optimizations
    verify_inputs: list[np.ndarray] | None = None


def import_model(model, spec: TargetSpec, input_shapes=None, recipe=None, verify_inputs=None, optimize=None) -> Imported:
    """Frontend + compression + graph optimization stages: load, normalize, import, then the
    recipe's steps with the default optimizations around them (``optimize.effective_recipe``)."""
    from . import analysis, frontend
    from .frontend.importer import import_prepared, io_signature
    from .frontend.load import fix_input_shapes, load_model
    from .optimize import as_optimize, effective_recipe

    optimize = as_optimize(optimize)
    recipe = effective_recipe(recipe, optimize, spec)
    with _stage("import"):
        original = fix_input_shapes(load_model(model), input_shapes)
        proto = frontend.prepare_onnx(original, fold_bn=optimize.fold_bn)
        inputs, outputs = io_signature(proto)
        checked = _user_inputs(verify_inputs, inputs)
        mod = import_prepared(proto)
        before = analysis.summarize(mod)
    if not (optimize.blocks and optimize.fuse):  # for the steps that ask how the build will run
        from .build import BLOCKS_ATTR

        mod = mod.with_attr(BLOCKS_ATTR, False)
    after = before
    if recipe.steps:
        with _stage("compress + optimize"):
            mod = recipe.apply(mod, spec)
            after = analysis.summarize(mod)
    if not optimize.winograd_on(spec):
        from .build import WINOGRAD_ATTR

        mod = mod.with_attr(WINOGRAD_ATTR, False)
    return Imported(original, inputs, outputs, mod, before, after, recipe, checked)


def compile(  # noqa: A001 - the natural name of the verb
    model,
    target: str | TargetSpec = "host",
    out: str | os.PathLike = "artifact",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    recipe=None,
    *,
    databases: Sequence[str | os.PathLike] = (),
    verify: bool = True,
    verify_inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    optimize=None,
    shipped_databases: bool = True,
):
    """Compile an ONNX model for a target into a verified artifact directory.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
    target : shipped target name (``hwc targets``), path to a target TOML, or a TargetSpec
    out : artifact directory; replaced atomically, never left half-written
    input_shapes : ``{input name: shape}`` fixing dynamic dims
    recipe : Recipe, dict, TOML path or None
    databases : extra MetaSchedule database directories to apply (shipped ones always apply)
    verify : compare with ONNX Runtime when the target runs here (natively or emulated)
    verify_inputs : user inputs to verify on, in addition to seeded random inputs
    rtol, atol : verification tolerance, elementwise ``|out - ref| <= atol + rtol * |ref|``;
        default 1e-3 / 1e-4, and for an int8 recipe ``INT8_TOLERANCE`` / ``INT8_TOLERANCE``
        times the largest reference output
    optimize : ``Optimize`` (BN folding, fusion, Winograd); default: all on, Winograd as the
        target's ``[hardware].winograd`` says
    shipped_databases : apply ``schedules/<target>/`` (off: only ``databases``; for baselines)

    Returns
    -------
    Artifact
    """
    from . import build
    from .backends import get_backend
    from .optimize import as_optimize
    from .export import MODULE, check_destination, staging, write_manifest
    from .passes.quantize import int8_report
    from .passes.quantize.qdq import qdq_report
    from .passes.sparsity import sparsity_report
    from .runtime import how_it_runs, load
    from .verify import DEFAULT_ATOL, DEFAULT_RTOL

    spec = load_target(target)
    optimize = as_optimize(optimize)
    default_tolerance = rtol is None and atol is None
    rtol = DEFAULT_RTOL if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol

    check_destination(out)  # fail before a long build, not after
    dbs = (find_shipped_databases(spec) if shipped_databases else []) + [Path(d) for d in databases]
    for db in dbs:
        build.database_files(db)
    front = import_model(model, spec, input_shapes, recipe, verify_inputs, optimize)
    quantization = int8_report(front.mod)
    atol_fraction = None
    if quantization is not None and default_tolerance:
        rtol, atol_fraction = INT8_TOLERANCE, INT8_TOLERANCE
    graph, offload = _offload(front.mod, spec)
    if offload is not None and offload["flops_npu"] and quantization is not None and default_tolerance:
        rtol, atol_fraction = NPU_TOLERANCE, NPU_TOLERANCE
    with _stage(f"lower + schedule ({spec.name})"):
        lowered = build.apply_databases(build.legalize(graph, spec, fuse=optimize.fuse, blocks=optimize.blocks), spec, dbs)
        tuned = build.scheduled_kernels(lowered)
        all_kernels = build.kernels(lowered)
        scheduled = build.default_schedule(lowered, spec)
    with _stage("codegen"):
        executable = build.build(scheduled, spec)

    backend = get_backend(spec)
    with staging(out) as tmp:
        with _stage("export"):
            backend.export(executable, tmp / MODULE, spec)
            runner_note = _add_runner(tmp, spec)
        mode, why_not = how_it_runs(spec, tmp)
        if not verify:
            verification = {"status": "skipped", "reason": "disabled by the user"}
        elif mode is None:
            verification = {"status": "skipped", "reason": f"target cannot run here: {why_not}"}
        else:
            with _stage(f"verify ({mode})"):
                verification = _verify(tmp, spec, mode, front, rtol, atol, atol_fraction)
        manifest = {
            "hwcompress_version": __version__,
            "tvm_version": _tvm_version(),
            "built_on": {"machine": platform.machine(), "python": platform.python_version()},
            "target": spec.to_dict(),
            "recipe": front.recipe.to_dict(),
            "databases": [str(d) for d in dbs],
            "optimize": optimize.to_dict(spec),
            "kernels": {"tuned": tuned, "default_schedule": [k for k in all_kernels if k not in tuned]},
            "inputs": front.inputs,
            "outputs": front.outputs,
            "inspect": {"before": _totals(front.before), "after": front.after.to_dict()},
            "verification": verification,
        }
        if quantization is not None:
            manifest["quantization"] = quantization
        if (sparsity := sparsity_report(front.mod)) is not None:
            manifest["sparsity"] = sparsity
        if (imported := qdq_report(front.mod)) is not None:
            manifest["imported_quantization"] = imported  # a quantized model's ops: integer or float, why
        if offload is not None:
            manifest["offload"] = offload  # what runs on the NPU, why the rest does not, cycles
        if runner_note:
            manifest["runner"] = runner_note
        write_manifest(tmp, manifest)
    if mode is None:
        from .export import read_manifest
        from .runtime import Artifact

        return Artifact(out, read_manifest(out), mode=None, why_not=why_not)
    return load(out)


def _offload(mod, spec: TargetSpec):
    """A target with an ``[npu]`` table: its int8 layers go to the NPU (``codegen.npu``);
    returns the module to lower and the offload report (None: no NPU)."""
    if spec.npu is None:
        return mod, None
    from .codegen.npu.offload import offload, offload_report

    with _stage(f"npu partition + codegen ({spec.name})"):
        mod = offload(mod, spec)
    return mod, offload_report(mod)


def _totals(summary) -> dict:
    return {"params": summary.params, "flops": summary.flops, "bytes": summary.bytes}


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _add_runner(directory: Path, spec: TargetSpec) -> dict | None:
    """Copy the deploy runner and its runtime libraries into a cross-target artifact."""
    from .targets import host_arch

    if spec.kind != "llvm" or spec.arch == host_arch():
        return None
    from .backends.runner import runner_files

    files = runner_files(spec.arch)
    for f in files:
        shutil.copy2(f, directory / f.name)
    return {"binary": "hwc_runner", "arch": spec.arch, "usage": "./hwc_runner module.so --input x.npy --output-dir out/"}


def _user_inputs(verify_inputs, inputs: list[dict]) -> list[np.ndarray] | None:
    from .runtime import check_inputs

    return None if verify_inputs is None else check_inputs(inputs, verify_inputs)


def _reference_proto(original):
    """The ONNX graph ONNX Runtime checks an artifact against, and whether QOperator ops were
    rewritten for it. QLinearConv / QLinearMatMul / ConvInteger run as their exact QDQ form
    (the frontend's rewrite): ONNX Runtime's own u8 x s8 kernels for them saturate int16 sums
    on AVX2 CPUs without VNNI (off by ~9 quantization steps on full-range weights), which
    would fail a correct build."""
    from .frontend.rewrites import REWRITES, apply_rewrites

    quant = [r for r in REWRITES if r.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger")]
    if not any(n.op_type in {r.op_type for r in quant} for n in original.graph.node):
        return original, False
    return apply_rewrites(original, quant), True


def _verify(directory, spec, mode, front: Imported, rtol, atol, atol_fraction=None) -> dict:
    """Run the staged artifact on seeded random (and the user's) inputs against the reference;
    ``atol_fraction``: per case, ``atol`` is at least this times the largest reference output."""
    from .runtime import Artifact
    from .verify import compare, graph_reference, random_inputs, reference_outputs

    # the artifact is still in its staging directory: run it from there, before it is final
    artifact = Artifact(directory, {"inputs": front.inputs, "outputs": front.outputs, "target": spec.to_dict()}, mode)
    names = [i["name"] for i in front.inputs]
    cases = [("random(seed=0)", random_inputs(front.inputs, seed=0))]
    if front.verify_inputs is not None:
        cases.append(("user", front.verify_inputs))
    exact = front.recipe.exact
    # pruning changes the outputs on purpose: then the reference is the compressed graph run by
    # TVM's plain pipeline on this host (built once), which checks lowering, schedules, codegen
    proto, qoperator = _reference_proto(front.original)
    reference = (lambda arrays: reference_outputs(proto, names, arrays)) if exact else graph_reference(front.mod)
    results, skipped = [], []
    for label, arrays in cases:
        # the reference first: inputs ORT rejects (random ints that are no valid indices) can
        # crash the compiled module, whose gathers do not check bounds
        try:
            want = reference(arrays)
        except Exception as e:  # ORT's own error types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if label != "user" and front.verify_inputs is not None:
                skipped.append(f"{label}: ONNX Runtime rejects them ({first})")
                continue
            raise VerificationError(
                f"ONNX Runtime could not compute the reference on {label} inputs ({first}); "
                "give real inputs with --verify-input, or skip with --no-verify"
            ) from None
        got = artifact.run(arrays)
        case_atol = atol
        if atol_fraction is not None:
            case_atol = max([atol] + [atol_fraction * float(np.abs(w).max()) for w in want if np.size(w)])
        result = compare(got, want, rtol, case_atol)
        result["inputs"] = label
        results.append(result)
        if not result["passed"]:
            detail = result.get("reason") or f"max abs err {result['max_abs_err']:.3g}, max rel err {result['max_rel_err']:.3g}"
            raise VerificationError(
                f"verification against {'ONNX Runtime' if exact else 'the compressed graph'} failed on {label} inputs: {detail} "
                f"(tolerance rtol={rtol}, atol={case_atol:.3g}; change with --rtol/--atol or skip with --no-verify)"
            )
    source = "onnxruntime" if exact else "compressed graph (TVM default pipeline, this host)"
    if exact and qoperator:
        source += " (QOperator ops run as their QDQ form)"
    verification = {"status": "passed", "mode": mode, "reference": source, "cases": results}
    if skipped:
        verification["skipped_inputs"] = skipped
    return verification
