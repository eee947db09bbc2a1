"""Per-family code generation backends, looked up by the TVM target kind of a TargetSpec.

A backend says how kernels get their default schedules, which Relax passes finish the VM
program, how codegen is set up (e.g. nvcc ahead of time), and how the module is exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TargetError


@dataclass(frozen=True)
class Backend:
    name: str
    default_schedule: Callable  # (tvm Target) -> tvm.transform.Pass
    finalize_pipeline: Callable  # (tvm Target) -> tvm.transform.Pass
    codegen_context: Callable  # (TargetSpec) -> context manager around tvm.compile
    export: Callable  # (Executable, Path, TargetSpec) -> None
    # (tvm Target) -> (PrimFunc | IRModule -> traced s_tir.Schedule | None): the default
    # schedule as a trace, to seed tuning with; None: tuning starts without a seed
    default_trace: Callable | None = None
    # (tvm Target, winograd=bool) -> {op name: LegalizeFunc}: the backend's own lowering of
    # some ops (e.g. a conv with its weight repacked for the kernel), used by ``build.legalize``;
    # ``winograd=False``: no Winograd in those kernels either (the build's Winograd is off)
    legalize_map: Callable | None = None
    # (tvm Target, m, n, k, W float32 [n, k], variant name | None) -> (scheduled PrimFunc
    # ``(x[m, k], *weights, y[m, n])``, weights): the 2:4 sparse GEMM of ``backends.sparse_lower``
    # and its weight operands made from W (numpy arrays; raises ValueError for shapes it does not
    # take); the variant as ``sparse_pick`` named it, None: the backend's default
    sparse_kernel: Callable | None = None
    # ``sparse_kernel`` also takes ``epilogue=`` (``sparse_lower.Epilogue``) and ``perm=`` (the
    # input-channel permutation, int array): the kernel then reads ``x`` through the permutation
    # and applies bias, residual and clamp as it writes ``y`` (ValueError where a variant
    # cannot), its signature ``(x, *weights, [bias], [res], y)`` (``perm``'s operand among the
    # weights): ``sparse_lower.fuse_epilogues``
    sparse_epilogue: bool = False
    # (tvm Target, m, n, k, pairs=bool) -> the name of the fastest variant of ``sparse_kernel``
    # for that shape, measured on this machine (the target runs here); ``pairs``: the weights'
    # row pairs share positions (``Sparse24.pairs``); None: one variant only
    sparse_pick: Callable | None = None
    # (tvm Target, m, n, k, W int8 [n, k]) -> (scheduled PrimFunc ``(x uint8 [m, k], *weights,
    # y int32 [m, n])``, weights): the 2:4 INT8 GEMM and the weight packed for it
    # (raises ValueError for shapes it does not take)
    sparse_kernel_int8: Callable | None = None
    # (m, n, k) -> why a 2:4 layer of that GEMM shape should stay dense, or None: the rule
    # ``sparsify``'s ``decide="auto"`` follows where it cannot time the layer (a target that
    # does not run here), drawn from measurements on the backend's hardware; None: every
    # eligible layer goes sparse unmeasured
    sparse_unmeasured_rule: Callable | None = None
    # (tvm Target, min_bytes=None, sparse=False) -> [tvm.transform.Pass]: graph rewrites into
    # the backend's multi-layer kernels (e.g. ``cpu_block``'s inverted residuals), run by
    # ``build.legalize`` before legalization when fusion is on; ``min_bytes`` overrides the
    # size rule; ``sparse``: after ``sparse-2-4``, leave the layers with 2:4 weights alone
    fusion_passes: Callable | None = None


def get_backend(spec) -> Backend:
    if spec.kind == "llvm":
        from .cpu import BACKEND
    elif spec.kind == "cuda":
        from .cuda import BACKEND
    else:
        raise TargetError(f"{spec.path or spec.name}: [tvm].kind: no backend for '{spec.kind}' (llvm, cuda)")
    return BACKEND
