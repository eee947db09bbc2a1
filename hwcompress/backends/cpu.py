"""CPU (LLVM) backend: x86 and ARM, native or cross-compiled."""

from __future__ import annotations

from pathlib import Path

from . import Backend
from .common import no_context, vm_finalize_pipeline


def _default_schedule(target):
    from .cpu_schedule import default_cpu_schedule

    return default_cpu_schedule(target)


def _default_trace(target):
    from .cpu_schedule import default_trace

    return default_trace(target)


def _legalize_map(target, winograd: bool = True):
    from .cpu_conv import legalize_conv2d
    from .cpu_int8 import legalize_matmul_int8
    from .cpu_schedule import CpuFacts

    from .cpu_dense import legalize_matmul

    facts = CpuFacts.from_target(target)
    conv = legalize_conv2d(facts, winograd)
    return {"relax.nn.conv2d": conv, "relax.matmul": legalize_matmul(legalize_matmul_int8(facts), conv)}


def _sparse_kernel(target, m, n, k, weight, variant: str | None = None, epilogue=None, perm=None):
    from ..passes.sparsity.mask24 import compress, pairs_share_positions
    from .cpu_sparse import kernel_operands, sparse24_kernel, variant_named

    c = compress(weight)
    chosen = variant_named(m, n, k, target, variant, pairs_share_positions(c.meta))
    return sparse24_kernel(m, n, k, target, chosen, epilogue), kernel_operands(chosen, c, perm)


def _sparse_pick(target, m, n, k, pairs: bool = False) -> str:
    from .cpu_sparse import pick_variant

    # 5 rounds, the fastest of each kept: with 3, tools/bench_sparse.py's pick once took a
    # 16-lane variant at 196x256x1024, 2 threads: 1.16x over dense where by_m measures ~1.5x
    # (the host's slow phases: docs/platform-findings.md)
    return pick_variant(m, n, k, target, number=10, repeat=5, pairs=pairs)[0].name


def _sparse_kernel_int8(target, m, n, k, weight):
    from .cpu_int8 import _max_abs_weight
    from .cpu_sparse_int8 import kind_for, pack, sparse24_int8_kernel, variants8

    kind = kind_for(target, k, _max_abs_weight(weight))
    values, meta = pack(weight, kind)
    return sparse24_int8_kernel(m, n, k, target, variants8(m, n, k, kind)[0]), [values, meta]


def _fusion_passes(target, min_bytes: int | None = None, sparse: bool = False):
    from .cpu_block import fuse_inverted_residuals
    from .cpu_schedule import CpuFacts

    facts = CpuFacts.from_target(target)
    regs = 32 if facts.vector_bits >= 512 else 16
    return [fuse_inverted_residuals(lanes=8, regs=regs, bands=facts.num_cores, min_bytes=min_bytes, skip_2to4=sparse)]


def _finalize(target):
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline

    from .cpu_prefetch import inject_prefetch

    return tvm.transform.Sequential([inject_prefetch(), vm_finalize_pipeline(pipeline)(target)])


def _export(executable, path: Path, spec) -> None:
    if spec.toolchain.cc:
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(spec.toolchain.cc))
    else:
        executable.export_library(str(path))


BACKEND = Backend(
    name="cpu",
    default_schedule=_default_schedule,
    finalize_pipeline=_finalize,
    codegen_context=no_context,
    export=_export,
    default_trace=_default_trace,
    legalize_map=_legalize_map,
    sparse_kernel=_sparse_kernel,
    sparse_epilogue=True,
    sparse_pick=_sparse_pick,
    sparse_kernel_int8=_sparse_kernel_int8,
    fusion_passes=_fusion_passes,
)
