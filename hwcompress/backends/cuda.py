"""CUDA backend: dlight GPU default schedules; device code compiled ahead of time."""

from __future__ import annotations

from pathlib import Path

from . import Backend
from .common import no_context, vm_finalize_pipeline


def _default_schedule(target):
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    )


def _finalize(target):
    from tvm.relax.backend.cuda import pipeline

    return vm_finalize_pipeline(pipeline)(target)


def _export(executable, path: Path, spec) -> None:
    if spec.toolchain.cc:
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(spec.toolchain.cc))
    else:
        executable.export_library(str(path))


BACKEND = Backend(
    name="cuda",
    default_schedule=_default_schedule,
    finalize_pipeline=_finalize,
    codegen_context=no_context,
    export=_export,
)
