"""CUDA backend: dlight GPU default schedules (Winograd kernels: ``cuda_winograd``; uint8 x int8 convs and matmuls: ``cuda_int8`` with dp4a); device code compiled ahead of time with nvcc.

An artifact for a CUDA target (``cuda-sm80``, ``jetson-orin``) carries SASS for exactly the
target's ``[tvm].arch``, compiled at build time; the device needs no CUDA compiler (no NVRTC,
no nvcc), only the driver and a TVM runtime built with CUDA.

How the binary gets there (TVM 0.27):

* ``BuildCUDA`` generates CUDA C++ and calls the global ``tvm_callback_cuda_postproc`` on it,
  then hands the source to ``ffi.Module.create.cuda``. When TVM's CUDA runtime is loaded
  (a machine with a driver), that factory JIT-compiles the source at once through the global
  ``tvm_callback_cuda_compile`` (NVRTC by default). Without a driver the runtime library does
  not load, the factory is missing, and codegen keeps the *source* in a placeholder module
  (format ``cuda``) that would be compiled when the artifact is loaded.
* ``codegen_context`` therefore hooks both callbacks for the duration of ``tvm.compile``:
  the post-processing hook compiles every CUDA translation unit with nvcc for the target's arch
  (so compile errors surface as a ``BuildError`` at build time) and keeps the cubin; the
  compile hook hands that cubin to the real runtime factory where there is one.
* ``export`` packs the imported modules itself (``fpack_imports``): it serializes them with
  TVM's own packer, replaces any CUDA module still holding source by the nvcc cubin (same
  serialized layout: format, function table, code), checks that every CUDA module holds SASS
  for exactly the target's arch, and links the blob in with an ``.incbin`` assembly file.

``device_archs(path)`` reads an exported library back and says which SASS/PTX archs it holds
(defined with the rest of the blob parsing in ``cuda_binary``, re-exported here).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import shutil
from pathlib import Path

from ..errors import BuildError
from . import Backend
from .common import vm_finalize_pipeline
from .cuda_binary import (  # noqa: F401  (cuda_modules, device_archs: re-exported)
    _BLOB_SYMBOL,
    _Blob,
    _join_cuda_payload,
    _split_cuda_payload,
    code_archs,
    cuda_modules,
    device_archs,
)

# ---------------------------------------------------------------------------- schedules / passes


def _default_schedule(target):
    from tvm.s_tir import dlight as dl

    from .cuda_int8 import int8_rule
    from .cuda_winograd import winograd_rule

    return dl.ApplyDefaultSchedule(
        int8_rule(),
        winograd_rule(),
        _declining(dl.gpu.Matmul()),
        _declining(dl.gpu.GEMV()),
        _declining(dl.gpu.Reduction()),
        # spreads the reduction over threads: not for a depthwise conv's few taps
        _declining(dl.gpu.GeneralReduction(), min_reduction=_MIN_THREAD_REDUCTION),
        dl.gpu.Fallback(),
    )


# A kernel whose every reduction is shorter than this (a depthwise conv's 9 taps) runs one
# thread per output (``Fallback``) rather than one thread block per output row: measured on an
# H100, GeneralReduction's depthwise kernels made MobileNetV2 1.27x slower than running
# nothing fused (BENCHMARKS.md, "GPU").
_MIN_THREAD_REDUCTION = 32
# 2:4 GEMMs with at most this many rows run on the CUDA-core GEMV (``sparse24_gemv_cuda``), more
# on sparse tensor cores: on an H100 the GEMV measured 2.0-5.7x faster than ``mma.sp`` at 1-8
# rows (an MMA is 8 rows wide; ``tools/bench_gpu_sparse.py``)
SPARSE_GEMV_MAX_ROWS = 8


def _declining(rule, min_reduction: int = 0):
    """``rule`` that declines (returns None, so the next rule is tried) where it raises a
    ScheduleError, or where no reduction of the kernel is ``min_reduction`` long.

    dlight's ``GeneralReduction`` raises on kernels whose reduction stages feed each other
    (e.g. a Winograd kernel's transform stages) instead of declining, which failed the whole
    build; ``Fallback`` schedules such kernels."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
    from tvm.s_tir.schedule import ScheduleError

    class Declining(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if min_reduction and _longest_reduction(func) < min_reduction:
                return None
            try:
                return rule.apply(func, target, tunable)
            except ScheduleError:
                return None

        def __repr__(self):
            return f"Declining({type(rule).__name__})"

    return Declining()


def _longest_reduction(func) -> int:
    """The largest product of reduction-axis extents over the blocks of ``func`` (0: none;
    symbolic extents count as long)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import SBlock

    blocks = []
    tvm_ffi.structural_walk(func.body, (SBlock, blocks.append), order="post")
    longest = 0
    for block in blocks:
        axes = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
        if axes:
            longest = max(longest, math.prod(int(e) if isinstance(e, tvm.tirx.IntImm) else 1 << 30 for e in axes))
    return longest


def _legalize_map(target, winograd: bool = True):  # noqa: ARG001 (no integer Winograd on CUDA)
    from .cuda_int8 import legalize_map

    return legalize_map(target)


def _on_sparse_gemv(m: int, k: int) -> bool:
    """Whether a 2:4 GEMM of ``m`` rows and reduction ``k`` runs on the CUDA-core GEMV (else
    ``mma.sp``): few rows, and whole meta bytes per row (``k % 8 == 0``), which it needs."""
    return m <= SPARSE_GEMV_MAX_ROWS and k % 8 == 0


def _sparse_kernel(target, m, n, k, weight, variant=None):  # noqa: ARG001 (one variant per shape)
    from ..passes.sparsity.mask24 import compress
    from .cuda_sparse import sparse24_gemv_cuda, sparse24_kernel_cuda

    kernel = sparse24_gemv_cuda(m, n, k) if _on_sparse_gemv(m, k) else sparse24_kernel_cuda(m, n, k, target)
    c = compress(weight)
    return kernel, [c.values, c.meta]


def _sparse_unmeasured_rule(m: int, n: int, k: int) -> str | None:  # noqa: ARG001
    """One-row layers the GEMV does not take (``K`` not a multiple of 8) stay dense: ``mma.sp``
    measured 0.24-0.74x of the dense float32 GEMV at one row on an H100, the 2:4 GEMV
    1.4-3.0x (``tools/bench_gpu_sparse.py``, BENCHMARKS.md)."""
    if m == 1 and not _on_sparse_gemv(m, k):
        return (f"a GEMV with K = {k} (not a multiple of 8, which the 2:4 GEMV needs): the sparse tensor-core kernel "
                "measured slower than the dense GEMV on an H100 (not measured on this target)")
    return None


def _finalize(target):
    from tvm.relax.backend.cuda import pipeline

    return vm_finalize_pipeline(pipeline)(target)


# ---------------------------------------------------------------------------- nvcc

_POSTPROC = "tvm_callback_cuda_postproc"
_COMPILE = "tvm_callback_cuda_compile"

# (sha256 of the CUDA source, arch) -> cubin; filled at codegen, read at export
_CUBINS: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
_CUBIN_CACHE_SIZE = 16


def find_nvcc() -> str | None:
    """The nvcc TVM will run (TVM's nvcc wrapper runs ``nvcc`` from ``PATH``)."""
    return shutil.which("nvcc")


def target_arch(spec) -> str:
    """The SASS arch of a CUDA target file, e.g. ``sm_87``."""
    arch = spec.tvm.get("arch")
    if not isinstance(arch, str) or not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise BuildError(f"{spec.path or spec.name}: [tvm].arch: expected the GPU's SASS arch like 'sm_87', got {arch!r}")
    return arch


def _require_nvcc(spec) -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError(
            f"{spec.name}: nvcc not found on PATH; CUDA targets compile device code ahead of time "
            f"for {spec.tvm.get('arch')} (install the CUDA toolkit or add its bin/ to PATH)"
        )
    return nvcc


def _source_key(source: str | bytes, arch: str) -> tuple[str, str]:
    data = source.encode() if isinstance(source, str) else bytes(source)
    return hashlib.sha256(data).hexdigest(), arch


def compile_cuda_source(source: str, spec) -> bytes:
    """Compile one CUDA translation unit with nvcc into a cubin for exactly ``spec``'s arch."""
    arch = target_arch(spec)
    key = _source_key(source, arch)
    cached = _CUBINS.get(key)
    if cached is not None:
        _CUBINS.move_to_end(key)
        return cached
    _require_nvcc(spec)
    import tvm
    from tvm.support import nvcc

    num = arch[3:]
    gencode = ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    try:
        with tvm.target.Target({"kind": "cuda", "arch": arch}):
            cubin = bytes(nvcc.compile_cuda(source, target_format="cubin", arch=gencode, compiler="nvcc"))
    except Exception as e:  # nvcc's own message is in the last lines of the error
        raise BuildError(f"nvcc for {arch} failed: {_nvcc_error_line(str(e))}") from None
    _CUBINS[key] = cubin
    while len(_CUBINS) > _CUBIN_CACHE_SIZE:
        _CUBINS.popitem(last=False)
    return cubin


def _nvcc_error_line(text: str) -> str:
    """The first error line of nvcc's output (TVM's message is source + marker + output)."""
    text = text.rsplit("Compilation error:", 1)[-1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "fatal" in ln or "error" in ln:
            return ln
    return lines[-1] if lines else "unknown error"


@contextlib.contextmanager
def _global_func(name: str, func):
    import tvm_ffi

    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(name)
        else:
            tvm_ffi.register_global_func(name, previous, override=True)


@contextlib.contextmanager
def codegen_context(spec):
    """Around ``tvm.compile``: compile the generated CUDA with nvcc for the target's arch.

    Raises ``BuildError`` when nvcc is missing; never leaves NVRTC-at-load-time as the plan.
    """
    target_arch(spec)
    _require_nvcc(spec)

    def postproc(code, _target=None):
        compile_cuda_source(str(code), spec)  # errors surface here, at build time
        return code

    def compile_hook(code, _target=None):
        # Called by TVM's CUDA runtime factory where a driver is present: hand it the cubin.
        return compile_cuda_source(str(code), spec)

    with _global_func(_POSTPROC, postproc), _global_func(_COMPILE, compile_hook):
        yield


# ---------------------------------------------------------------------------- export


def _packed_imports(module, spec) -> bytes:
    """TVM's serialization of ``module``'s imports, CUDA source replaced by nvcc cubins."""
    import tvm_ffi

    tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module)
    blob = _Blob.parse(tensor.numpy().tobytes())
    arch = target_arch(spec)
    for i, (kind, payload) in enumerate(blob.modules):
        if kind != "cuda":
            continue
        fmt, fmap, code = _split_cuda_payload(payload)
        if fmt == "cuda":
            try:
                fmt, code = "cubin", compile_cuda_source(code.decode(), spec)
            except BuildError as e:
                raise BuildError(f"export for {spec.name}: {e}") from None
            blob.modules[i] = (kind, _join_cuda_payload(fmt, fmap, code))
        archs = code_archs(fmt, code)
        if archs != {arch.rstrip("af")}:  # e_flags do not record the sm_90a-style suffix
            raise BuildError(
                f"{spec.name}: the module's CUDA code is for {', '.join(sorted(archs))}, the target is {arch} "
                f"(was it built outside hwcompress.build?)"
            )
    return blob.serialize()


def _fpack_imports(spec):
    def pack(module, is_system_lib, symbol_prefix, workspace_dir):
        if is_system_lib or symbol_prefix:
            raise BuildError(f"{spec.name}: system-lib export is not supported for CUDA targets")
        blob_path = os.path.join(workspace_dir, "devc.bin")
        with open(blob_path, "wb") as f:
            f.write(_packed_imports(module, spec))
        asm_path = os.path.join(workspace_dir, "devc.S")
        quoted = blob_path.replace("\\", "\\\\").replace('"', '\\"')
        with open(asm_path, "w") as f:
            f.write(
                f'\t.section .rodata.{_BLOB_SYMBOL},"a"\n'
                f"\t.globl {_BLOB_SYMBOL}\n"
                f"\t.type {_BLOB_SYMBOL}, %object\n"
                f"\t.balign 16\n"
                f"{_BLOB_SYMBOL}:\n"
                f'\t.incbin "{quoted}"\n'
                f"\t.size {_BLOB_SYMBOL}, . - {_BLOB_SYMBOL}\n"
                f'\t.section .note.GNU-stack,"",%progbits\n'
            )
        return asm_path

    return pack


def _export(executable, path: Path, spec) -> None:
    kwargs = {"fpack_imports": _fpack_imports(spec)}
    if spec.toolchain.cc:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(spec.toolchain.cc)
    try:
        executable.export_library(str(path), **kwargs)
    except BuildError:
        raise
    except Exception as e:  # the compiler's message is in the last lines
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise BuildError(f"export for {spec.name}: {lines[-1] if lines else type(e).__name__}") from e


BACKEND = Backend(
    name="cuda",
    default_schedule=_default_schedule,
    finalize_pipeline=_finalize,
    codegen_context=codegen_context,
    export=_export,
    legalize_map=_legalize_map,
    sparse_kernel=_sparse_kernel,
    sparse_unmeasured_rule=_sparse_unmeasured_rule,
)
