"""Reading and writing the device-code blob of an exported TVM library (CUDA modules).

``export_library`` links the serialized imported modules into the library under the symbol
``__tvm_ffi__library_bin``. This module parses and re-serializes that blob (``_Blob``), splits a
serialized CUDA module into format, function table and code, and tells which GPU archs a piece
of CUDA code is for (cubin ``e_flags``, fatbin entry headers, PTX ``.target``).

``device_archs(path)`` reads an exported library back and says which SASS/PTX archs it holds;
``cuda_modules(path)`` lists the format and archs of each embedded CUDA module.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArtifactError

_BLOB_SYMBOL = "__tvm_ffi__library_bin"

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
