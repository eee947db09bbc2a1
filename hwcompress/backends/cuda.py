"""CUDA backend: dlight GPU default schedules; device code compiled ahead of time with nvcc.

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

``device_archs(path)`` reads an exported library back and says which SASS/PTX archs it holds.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArtifactError, BuildError
from . import Backend
from .common import vm_finalize_pipeline

# ---------------------------------------------------------------------------- schedules / passes


def _default_schedule(target):
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    )


def _finalize(target):
    from tvm.relax.backend.cuda import pipeline

    return vm_finalize_pipeline(pipeline)(target)


# ---------------------------------------------------------------------------- nvcc

_POSTPROC = "tvm_callback_cuda_postproc"
_COMPILE = "tvm_callback_cuda_compile"
_BLOB_SYMBOL = "__tvm_ffi__library_bin"

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


# ---------------------------------------------------------------------------- serialized modules
#
# The blob that ``export_library`` links into the library (symbol ``__tvm_ffi__library_bin``):
#   u64 nbytes | import tree (u64 n, n x u64 row_ptr; u64 m, m x u64 child) |
#   per module: str kind, then (unless kind == "_lib") bytes payload
# where str/bytes are u64 length + data. A ``cuda`` payload is
#   str fmt | map<str, FunctionInfo> | bytes code        (fmt: cuda = source, ptx, cubin, fatbin)


class _Reader:
    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.o = data, offset

    def u64(self) -> int:
        if self.o + 8 > len(self.data):
            raise ValueError("truncated module blob")
        (v,) = struct.unpack_from("<Q", self.data, self.o)
        self.o += 8
        return v

    def skip(self, n: int) -> None:
        if self.o + n > len(self.data):
            raise ValueError("truncated module blob")
        self.o += n

    def bytes_(self) -> bytes:
        n = self.u64()
        if self.o + n > len(self.data):
            raise ValueError("truncated module blob")
        v = self.data[self.o : self.o + n]
        self.o += n
        return v


def _pack_bytes(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


@dataclass
class _Blob:
    tree: bytes  # the import tree, kept verbatim
    modules: list[tuple[str, bytes | None]] = field(default_factory=list)  # (kind, payload)

    @classmethod
    def parse(cls, data: bytes) -> "_Blob":
        r = _Reader(data)
        nbytes = r.u64()
        end = 8 + nbytes
        if end > len(data):
            raise ValueError("module blob shorter than its header says")
        start = r.o
        for _ in range(2):  # CSR row_ptr, then child indices
            r.skip(8 * r.u64())
        blob = cls(tree=data[start : r.o])
        while r.o < end:
            kind = r.bytes_().decode()
            blob.modules.append((kind, None if kind == "_lib" else r.bytes_()))
        return blob

    def serialize(self) -> bytes:
        body = bytearray(self.tree)
        for kind, payload in self.modules:
            body += _pack_bytes(kind.encode())
            if payload is not None:
                body += _pack_bytes(payload)
        return struct.pack("<Q", len(body)) + bytes(body)


def _split_cuda_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """(fmt, serialized function table, code) of a serialized CUDA module."""
    r = _Reader(payload)
    fmt = r.bytes_().decode()
    fmap_start = r.o
    for _ in range(r.u64()):  # map<str, FunctionInfo>
        r.bytes_()  # key
        r.bytes_()  # FunctionInfo.name
        r.skip(4 * r.u64())  # arg_types: DLDataType
        for _ in range(r.u64()):  # launch_param_tags
            r.bytes_()
        r.skip(4 * r.u64())  # arg_extra_tags: int32
    fmap = payload[fmap_start : r.o]
    code = r.bytes_()
    if r.o != len(payload):
        raise ValueError("unexpected layout of a serialized CUDA module")
    return fmt, fmap, code


def _join_cuda_payload(fmt: str, fmap: bytes, code: bytes) -> bytes:
    return _pack_bytes(fmt.encode()) + fmap + _pack_bytes(code)


# ---------------------------------------------------------------------------- arch inspection

_EM_CUDA = 190
_FATBIN_MAGIC = 0xBA55ED50


def code_archs(fmt: str, code: bytes) -> set[str]:
    """Archs of one CUDA module's code: ``sm_XX`` for SASS, ``compute_XX`` for PTX,
    ``cuda-source`` when it is still CUDA C++ (to be compiled at load time)."""
    if fmt == "cuda":
        return {"cuda-source"}
    if code[:4] == b"\x7fELF":
        return {_cubin_arch(code)}
    if len(code) >= 16 and struct.unpack_from("<I", code, 0)[0] == _FATBIN_MAGIC:
        return _fatbin_archs(code)
    text = code.decode("latin-1")
    if ".target" in text:  # PTX text
        for line in text.splitlines():
            parts = line.split()
            if parts[:1] == [".target"] and len(parts) > 1:
                return {"compute_" + parts[1].rstrip(",").removeprefix("sm_")}
    raise ValueError(f"unrecognized CUDA code (format {fmt!r})")


def _cubin_arch(elf: bytes) -> str:
    (machine,) = struct.unpack_from("<H", elf, 18)
    if machine != _EM_CUDA:
        raise ValueError(f"ELF for machine {machine}, not CUDA")
    (flags,) = struct.unpack_from("<I", elf, 48)
    abi_version = elf[8]
    # EF_CUDA_SM moved from bits 0-7 to bits 8-15 with ELF ABI version 8 (CUDA 12.8+). The
    # arch-specific suffix (sm_90a, sm_100f) is not in e_flags: sm_90a reads as sm_90.
    sm = (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF
    return f"sm_{sm}"


def _fatbin_archs(fat: bytes) -> set[str]:
    archs = set()
    _, _, header_size, fat_size = struct.unpack_from("<IHHQ", fat, 0)
    o, end = header_size, header_size + fat_size
    while o + 32 <= min(end, len(fat)):
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", fat, o)
        (arch,) = struct.unpack_from("<I", fat, o + 28)
        archs.add(f"compute_{arch}" if kind == 1 else f"sm_{arch}")
        o += entry_header + size
    return archs


def cuda_modules(module_path: str | Path) -> list[tuple[str, set[str]]]:
    """``(fmt, archs)`` of every CUDA module embedded in an exported library (.so)."""
    path = Path(module_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read: {e.strerror}") from None
    offset = _elf_symbol_offset(data, _BLOB_SYMBOL)
    if offset is None:
        raise ArtifactError(f"{path}: no {_BLOB_SYMBOL} (not an exported TVM library with device code)")
    (nbytes,) = struct.unpack_from("<Q", data, offset)
    try:
        blob = _Blob.parse(data[offset : offset + 8 + nbytes])
        out = []
        for kind, payload in blob.modules:
            if kind == "cuda":
                fmt, _, code = _split_cuda_payload(payload)
                out.append((fmt, code_archs(fmt, code)))
    except (ValueError, struct.error) as e:
        raise ArtifactError(f"{path}: embedded modules unreadable: {e}") from None
    return out


def device_archs(module_path: str | Path) -> set[str]:
    """Which GPU archs the CUDA code in an exported ``module.so`` is for: ``sm_87`` (SASS),
    ``compute_87`` (PTX, JIT-compiled by the driver), ``cuda-source`` (CUDA C++ that the
    runtime would compile at load time). Empty when the library holds no CUDA module."""
    archs: set[str] = set()
    for _, a in cuda_modules(module_path):
        archs |= a
    return archs


def _elf_symbol_offset(elf: bytes, name: str) -> int | None:
    """File offset of a defined symbol in a little-endian ELF64 file (.symtab or .dynsym)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ArtifactError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    want = name.encode()
    for _, sh_type, _, _, sym_off, sym_size, link, _, _, entsize in sections:
        if sh_type not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        str_off = sections[link][4]
        for k in range(sym_size // entsize):
            st_name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", elf, sym_off + k * entsize)
            if shndx == 0 or shndx >= len(sections):
                continue
            end = elf.index(b"\0", str_off + st_name)
            if elf[str_off + st_name : end] == want:
                sec = sections[shndx]
                return sec[4] + (value - sec[3])  # sh_offset + (st_value - sh_addr)
    return None


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
)
