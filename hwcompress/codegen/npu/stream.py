"""The NPU command stream: the versioned little-endian binary form of a :class:`Program`.

Layout (every field explained): ``docs/npu-command-stream.md``. ``simulator.c`` parses the same
bytes; keep the three in step and bump the version on any change of meaning.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .program import COMMANDS, MAX_RANK, DType, Program, Tensor, validate

MAGIC = b"HWNP"
VERSION_MAJOR = 1
VERSION_MINOR = 0
FLAG_POW2_SCALES = 1

_HEADER = struct.Struct("<4sHHIIIIIIII")  # magic, major, minor, flags, total, counts x4, data off/size
_TENSOR = struct.Struct("<BBBBi4III")  # dtype, kind, rank, reserved, zero point, dims[4], off, size
_CMD_HEAD = struct.Struct("<HH")  # opcode, number of int32 fields
_DATA_ALIGN = 16


def encode(program: Program) -> bytes:
    """Validate ``program`` and serialize it to the version-1 command stream."""
    validate(program)
    data, records = bytearray(), []
    for x in program.tensors:
        off = size = 0
        if x.is_constant:
            data.extend(b"\0" * (-len(data) % _DATA_ALIGN))
            raw = np.ascontiguousarray(x.data, dtype=x.dtype.numpy).tobytes()
            off, size = len(data), len(raw)
            data.extend(raw)
        dims = list(x.shape) + [0] * (MAX_RANK - len(x.shape))
        records.append(_TENSOR.pack(x.dtype, int(x.is_constant), len(x.shape), 0, x.zero_point, *dims, off, size))
    body = bytearray()
    body += struct.pack(f"<{len(program.inputs)}I", *program.inputs)
    body += struct.pack(f"<{len(program.outputs)}I", *program.outputs)
    body += b"".join(records)
    for cmd in program.commands:
        words = cmd.words()
        body += _CMD_HEAD.pack(cmd.OPCODE, len(words)) + struct.pack(f"<{len(words)}i", *words)
    data_off = _HEADER.size + len(body)
    data_off += -data_off % _DATA_ALIGN
    total = data_off + len(data)
    header = _HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, FLAG_POW2_SCALES if program.pow2_scales else 0,
                          total, len(program.tensors), len(program.inputs), len(program.outputs),
                          len(program.commands), data_off, len(data))
    return bytes(header + body + b"\0" * (data_off - _HEADER.size - len(body)) + data)


def decode(stream: bytes) -> Program:
    """Parse a command stream; ``ValueError`` names what is wrong (magic, version, truncation)."""
    stream = bytes(stream)
    if len(stream) < _HEADER.size:
        raise ValueError(f"npu stream truncated: {len(stream)} bytes, the header alone is {_HEADER.size}")
    magic, major, minor, flags, total, nt, ni, no, nc, data_off, data_size = _HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise ValueError(f"not an npu command stream: magic {magic!r}, expected {MAGIC!r}")
    if major != VERSION_MAJOR or minor > VERSION_MINOR:
        raise ValueError(f"npu stream version {major}.{minor} is not supported (this reader: "
                         f"{VERSION_MAJOR}.{VERSION_MINOR})")
    if flags & ~FLAG_POW2_SCALES:
        raise ValueError(f"npu stream: unknown flags 0x{flags:x}")
    if len(stream) < total or data_off + data_size > total:
        raise ValueError(f"npu stream truncated: {len(stream)} bytes, header says {total}")
    pos = _HEADER.size

    def take(fmt: struct.Struct | str):
        nonlocal pos
        s = struct.Struct(fmt) if isinstance(fmt, str) else fmt
        if pos + s.size > data_off:
            raise ValueError(f"npu stream truncated: tables run past the data section at byte {pos}")
        out = s.unpack_from(stream, pos)
        pos += s.size
        return out

    inputs, outputs = list(take(f"<{ni}I")), list(take(f"<{no}I"))
    tensors = []
    for i in range(nt):
        dtype, kind, rank, _, zp, *rest = take(_TENSOR)
        dims, off, size = rest[:MAX_RANK], rest[MAX_RANK], rest[MAX_RANK + 1]
        if dtype not in (1, 2) or kind not in (0, 1) or not 1 <= rank <= MAX_RANK:
            raise ValueError(f"npu stream: tensor {i}: bad dtype/kind/rank {dtype}/{kind}/{rank}")
        shape, dt = tuple(dims[:rank]), DType(dtype)
        data = None
        if kind == 1:
            if off + size > data_size or size != math.prod(shape) * dt.numpy.itemsize:
                raise ValueError(f"npu stream: tensor {i}: constant data out of bounds or wrong size")
            data = np.frombuffer(stream, dt.numpy, math.prod(shape), data_off + off).astype(dt.numpy.type)
        tensors.append(Tensor(shape, dt, zp, data))
    commands = []
    for k in range(nc):
        opcode, n = take(_CMD_HEAD)
        cls = COMMANDS.get(opcode)
        if cls is None:
            raise ValueError(f"npu stream: command {k}: unknown opcode {opcode}")
        expected = sum(w for _, w in cls._WORDS)
        if n != expected:
            raise ValueError(f"npu stream: command {k} ({cls.__name__}): {n} fields, expected {expected}")
        commands.append(cls.from_words(list(take(f"<{n}i"))))
    program = Program(tensors, commands, inputs, outputs, bool(flags & FLAG_POW2_SCALES))
    validate(program)
    return program
