"""NPU programs: tensors, commands, shape inference and validation.

A :class:`Program` is what the NPU stub executes: a table of int8 activation and constant
tensors plus an ordered list of commands (CONV2D, DENSE, MAX_POOL2D, AVG_POOL2D, ADD).
``stream.py`` serializes it (layout and exact integer semantics: ``docs/npu-command-stream.md``),
``reference.py`` executes it in numpy.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import ClassVar, Union

import numpy as np

MAX_RANK = 4


class DType(enum.IntEnum):
    INT8 = 1
    INT32 = 2

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(np.int8 if self is DType.INT8 else "<i4")


class Activation(str, enum.Enum):
    """Fused activations; a command stores only the int8 clamp bounds they map to."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"


@dataclass(frozen=True, eq=False)
class Tensor:
    """One tensor of a program.

    Activations (``data is None``) are int8 with a per-tensor ``zero_point``; constants carry
    their ``data`` (int8 weights, int32 bias / multipliers / shifts) and have zero point 0.
    """

    shape: tuple[int, ...]
    dtype: DType = DType.INT8
    zero_point: int = 0
    data: np.ndarray | None = None

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.numpy.itemsize

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        same_data = (self.data is None and other.data is None) or (
            self.data is not None and other.data is not None and np.array_equal(self.data, other.data))
        return (tuple(self.shape), self.dtype, self.zero_point) == (
            tuple(other.shape), other.dtype, other.zero_point) and same_data


@dataclass(frozen=True)
class _Command:
    """Base of commands: ``_WORDS`` lists (field, number of int32 words) in stream order."""

    OPCODE: ClassVar[int] = 0
    _WORDS: ClassVar[tuple[tuple[str, int], ...]] = ()
    _READS: ClassVar[tuple[str, ...]] = ("input",)

    def words(self) -> list[int]:
        out: list[int] = []
        for name, n in self._WORDS:
            value = getattr(self, name)
            if n == 1:
                out.append(-1 if value is None else int(value))
            else:
                out.extend(int(v) for v in value)
        return out

    @classmethod
    def from_words(cls, words: list[int]) -> "_Command":
        kwargs, i = {}, 0
        for name, n in cls._WORDS:
            kwargs[name] = words[i] if n == 1 else tuple(words[i:i + n])
            i += n
        if "bias" in kwargs and kwargs["bias"] == -1:
            kwargs["bias"] = None
        return cls(**kwargs)

    def reads(self) -> list[int]:
        """Ids of the tensors the command reads (activations and constants)."""
        return [getattr(self, n) for n in self._READS if getattr(self, n) is not None]


@dataclass(frozen=True)
class Conv2D(_Command):
    """NHWC conv: weight ``[C_out, KH, KW, C_in / groups]``; depthwise is ``groups == C_in``.
    ``multiplier``/``shift`` are int32 constants of length 1 or ``C_out``."""

    input: int
    weight: int
    bias: int | None
    multiplier: int
    shift: int
    output: int
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    act_min: int = -128
    act_max: int = 127
    OPCODE: ClassVar[int] = 1
    _READS: ClassVar = ("input", "weight", "bias", "multiplier", "shift")
    _WORDS: ClassVar = (("input", 1), ("weight", 1), ("bias", 1), ("multiplier", 1), ("shift", 1),
                        ("output", 1), ("strides", 2), ("padding", 4), ("dilation", 2), ("groups", 1),
                        ("act_min", 1), ("act_max", 1))


@dataclass(frozen=True)
class Dense(_Command):
    """``[N, C_in] x [C_out, C_in]^T``; an NHWC input is read as ``[N, H * W * C]`` (row-major,
    free). Requant constants as in :class:`Conv2D`."""

    input: int
    weight: int
    bias: int | None
    multiplier: int
    shift: int
    output: int
    act_min: int = -128
    act_max: int = 127
    OPCODE: ClassVar[int] = 2
    _READS: ClassVar = Conv2D._READS
    _WORDS: ClassVar = (("input", 1), ("weight", 1), ("bias", 1), ("multiplier", 1), ("shift", 1),
                        ("output", 1), ("act_min", 1), ("act_max", 1))


@dataclass(frozen=True)
class MaxPool2D(_Command):
    """NHWC max pool; padded positions are skipped; output zero point = input zero point."""

    input: int
    output: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    act_min: int = -128
    act_max: int = 127
    OPCODE: ClassVar[int] = 3
    _WORDS: ClassVar = (("input", 1), ("output", 1), ("kernel", 2), ("strides", 2), ("padding", 4),
                        ("act_min", 1), ("act_max", 1))


@dataclass(frozen=True)
class AvgPool2D(_Command):
    """NHWC average pool, round half up; output zero point = input zero point."""

    input: int
    output: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    act_min: int = -128
    act_max: int = 127
    count_include_pad: bool = False
    OPCODE: ClassVar[int] = 4
    _WORDS: ClassVar = MaxPool2D._WORDS + (("count_include_pad", 1),)


@dataclass(frozen=True)
class Add(_Command):
    """Elementwise add of two same-shape int8 tensors with their own scales:
    ``zo + rshift((a - za) * multiplier_a + (b - zb) * multiplier_b, shift)``."""

    input_a: int
    input_b: int
    output: int
    multiplier_a: int
    multiplier_b: int
    shift: int
    act_min: int = -128
    act_max: int = 127
    OPCODE: ClassVar[int] = 5
    _READS: ClassVar = ("input_a", "input_b")
    _WORDS: ClassVar = (("input_a", 1), ("input_b", 1), ("output", 1), ("multiplier_a", 1),
                        ("multiplier_b", 1), ("shift", 1), ("act_min", 1), ("act_max", 1))


Command = Union[Conv2D, Dense, MaxPool2D, AvgPool2D, Add]
COMMANDS: dict[int, type] = {c.OPCODE: c for c in (Conv2D, Dense, MaxPool2D, AvgPool2D, Add)}


@dataclass
class Program:
    """Tensors, commands, which tensors are inputs / outputs, and the pow2-scales flag."""

    tensors: list[Tensor] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    pow2_scales: bool = False

    def add_tensor(self, shape, zero_point: int = 0) -> int:
        """Add an int8 activation tensor; returns its id."""
        self.tensors.append(Tensor(tuple(int(d) for d in shape), DType.INT8, int(zero_point)))
        return len(self.tensors) - 1

    def add_constant(self, data: np.ndarray) -> int:
        """Add a constant (int8 or int32 array); returns its id."""
        data = np.ascontiguousarray(data)
        dtype = {np.dtype(np.int8): DType.INT8, np.dtype(np.int32): DType.INT32}.get(data.dtype)
        if dtype is None:
            raise ValueError(f"constants must be int8 or int32, got {data.dtype}")
        self.tensors.append(Tensor(data.shape if data.ndim else (1,), dtype, 0, data.reshape(-1)))
        return len(self.tensors) - 1

    def add(self, command: Command) -> Command:
        self.commands.append(command)
        return command


def activation_bounds(kind: Activation, zero_point: int, scale: float) -> tuple[int, int]:
    """The int8 clamp ``(act_min, act_max)`` that fuses ``kind`` into a command's output with
    quantization ``(scale, zero_point)``: relu clamps at the zero point, relu6 also at
    ``zero_point + round(6 / scale)``."""
    kind = Activation(kind)
    lo = zero_point if kind is not Activation.NONE else -128
    hi = zero_point + int(np.round(6.0 / scale)) if kind is Activation.RELU6 else 127
    return max(-128, lo), min(127, hi)


# ------------------------------------------------------------------------------ shapes


def conv_out(size: int, k: int, stride: int, pad_a: int, pad_b: int, dilation: int = 1) -> int:
    return (size + pad_a + pad_b - dilation * (k - 1) - 1) // stride + 1


def output_shape(program: Program, cmd: Command) -> tuple[int, ...]:
    """The shape ``cmd`` produces given its input tensors (raises ``ValueError`` on misuse)."""
    t = program.tensors
    if isinstance(cmd, Conv2D):
        n, h, w, c = _shape(t, cmd.input, 4)
        co, kh, kw, ci = _shape(t, cmd.weight, 4)
        g = cmd.groups
        if g < 1 or c % g or co % g or ci != c // g:
            raise ValueError(f"conv2d: weight {t[cmd.weight].shape} does not fit input {t[cmd.input].shape}"
                             f" with groups={g}")
        (sh, sw), (pt, pl, pb, pr), (dh, dw) = cmd.strides, cmd.padding, cmd.dilation
        return n, conv_out(h, kh, sh, pt, pb, dh), conv_out(w, kw, sw, pl, pr, dw), co
    if isinstance(cmd, Dense):
        x = t[cmd.input].shape
        if len(x) not in (2, 4):
            raise ValueError(f"dense: input must be [N, C] or NHWC (flattened), got {x}")
        n, c = x[0], math.prod(x[1:])
        co, ci = _shape(t, cmd.weight, 2)
        if ci != c:
            raise ValueError(f"dense: weight {t[cmd.weight].shape} does not fit input {t[cmd.input].shape}")
        return n, co
    if isinstance(cmd, (MaxPool2D, AvgPool2D)):
        n, h, w, c = _shape(t, cmd.input, 4)
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = cmd.kernel, cmd.strides, cmd.padding
        if max(pt, pb) >= kh or max(pl, pr) >= kw:
            raise ValueError("pool: padding must be smaller than the kernel (no empty windows)")
        return n, conv_out(h, kh, sh, pt, pb), conv_out(w, kw, sw, pl, pr), c
    if isinstance(cmd, Add):
        a, b = t[cmd.input_a].shape, t[cmd.input_b].shape
        if a != b:
            raise ValueError(f"add: input shapes differ: {a} vs {b}")
        return a
    raise ValueError(f"unknown command {cmd!r}")


def _shape(tensors: list[Tensor], tid: int, rank: int) -> tuple[int, ...]:
    shape = tensors[tid].shape
    if len(shape) != rank:
        raise ValueError(f"tensor {tid}: expected rank {rank}, got shape {shape}")
    return shape


def validate(program: Program) -> None:
    """Check ids, dtypes, shapes, parameter ranges and data flow; raise ``ValueError``."""
    t = program.tensors
    written = set(program.inputs) | {i for i, x in enumerate(t) if x.is_constant}

    def tensor(tid, what, const: bool | None = None, dtype: DType | None = None):
        if not isinstance(tid, (int, np.integer)) or not 0 <= tid < len(t):
            raise ValueError(f"{what}: tensor id {tid} out of range (0..{len(t) - 1})")
        if const is not None and t[tid].is_constant != const:
            raise ValueError(f"{what}: tensor {tid} must {'' if const else 'not '}be a constant")
        if dtype is not None and t[tid].dtype != dtype:
            raise ValueError(f"{what}: tensor {tid} must be {dtype.name.lower()}")
        return t[tid]

    for i, x in enumerate(t):
        if not 1 <= len(x.shape) <= MAX_RANK or min(x.shape) < 1:
            raise ValueError(f"tensor {i}: bad shape {x.shape}")
        if not x.is_constant and (x.dtype != DType.INT8 or not -128 <= x.zero_point <= 127):
            raise ValueError(f"tensor {i}: activations are int8 with a zero point in [-128, 127]")
        if x.is_constant and (x.zero_point != 0 or x.data.size != math.prod(x.shape)):
            raise ValueError(f"tensor {i}: constant with zero point or data not matching {x.shape}")
    for i in program.inputs + program.outputs:
        tensor(i, "program input/output", const=False)
    for k, cmd in enumerate(program.commands):
        what = f"command {k} ({type(cmd).__name__})"
        if not -128 <= cmd.act_min <= cmd.act_max <= 127:
            raise ValueError(f"{what}: act_min/act_max must satisfy -128 <= min <= max <= 127")
        for r in cmd.reads():
            tensor(r, what)
            if r not in written:
                raise ValueError(f"{what}: reads tensor {r} before it is written")
        if isinstance(cmd, (Conv2D, Dense)):
            tensor(cmd.weight, what, const=True, dtype=DType.INT8)
            co = t[cmd.weight].shape[0]
            for name in ("bias", "multiplier", "shift"):
                tid = getattr(cmd, name)
                if tid is not None and tensor(tid, what, const=True, dtype=DType.INT32).data.size not in (
                        (co,) if name == "bias" else (1, co)):
                    raise ValueError(f"{what}: {name} must have {co} (or, requant only, 1) values")
            _check_requant(t[cmd.multiplier].data, t[cmd.shift].data, program.pow2_scales, what)
        if isinstance(cmd, Add):
            _check_requant(np.array([cmd.multiplier_a, cmd.multiplier_b]), np.array([cmd.shift]),
                           program.pow2_scales, what)
        if isinstance(cmd, Conv2D) and (min(cmd.strides) < 1 or min(cmd.dilation) < 1 or min(cmd.padding) < 0):
            raise ValueError(f"{what}: strides/dilation must be >= 1 and padding >= 0")
        if isinstance(cmd, (MaxPool2D, AvgPool2D)) and (min(cmd.strides) < 1 or min(cmd.kernel) < 1
                                                       or min(cmd.padding) < 0):
            raise ValueError(f"{what}: kernel/strides must be >= 1 and padding >= 0")
        shape = output_shape(program, cmd)
        out = tensor(cmd.output, what, const=False)
        if min(shape) < 1 or tuple(out.shape) != tuple(shape):
            raise ValueError(f"{what}: output tensor {cmd.output} has shape {out.shape}, command makes {shape}")
        if isinstance(cmd, (MaxPool2D, AvgPool2D)) and out.zero_point != t[cmd.input].zero_point:
            raise ValueError(f"{what}: pools keep the quantization: output zero point must equal input's")
        if cmd.output in written:
            raise ValueError(f"{what}: tensor {cmd.output} is written twice (or is an input)")
        written.add(cmd.output)
    missing = [o for o in program.outputs if o not in written]
    if missing:
        raise ValueError(f"program outputs {missing} are never written")


def _check_requant(mult: np.ndarray, shift: np.ndarray, pow2: bool, what: str) -> None:
    mult, shift = np.asarray(mult, np.int64), np.asarray(shift, np.int64)
    if mult.min() < 0 or mult.max() > 2**31 - 1 or shift.min() < 0 or shift.max() > 62:
        raise ValueError(f"{what}: multipliers must be in [0, 2^31 - 1] and shifts in [0, 62]")
    if pow2 and np.any((mult & (mult - 1)) != 0):
        raise ValueError(f"{what}: the program asks for pow2 scales but a multiplier is not a power of two")
