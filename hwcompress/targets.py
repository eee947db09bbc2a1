"""TargetSpec: one TOML file per device, the only place where hardware facts live.

A target file has a name, a description, an optional ``base`` it inherits from (tables are
merged key by key), and the tables ``[tvm]`` (handed to ``tvm.target.Target`` as a dict),
``[toolchain]``, ``[hardware]``, ``[runtime]``, ``[tuning]`` and, for NPUs, ``[npu]``.
Every field is validated on load; a bad file is a ``TargetError`` naming file and field.

``mcpu = "host"`` and ``num-cores = "auto"`` in ``[tvm]`` are resolved on load from this
machine, so the ``host`` target always describes the CPU it runs on.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TargetError


class Int8Kind(str, enum.Enum):
    """Which integer dot-product instructions the device has."""

    VNNI = "vnni"
    AVX2 = "avx2"
    SDOT = "sdot"
    NEON = "neon"  # aarch64 without dotprod: widening multiplies (smull / sadalp)
    DP4A = "dp4a"
    IMMA = "imma"
    NONE = "none"


class DataLayout(str, enum.Enum):
    """Activation layout of 2D convolutions (``[hardware].conv_layout``, ``hwc --layout``).

    ``NCHW`` is the ONNX import layout; ``NCHW{b}c`` is blocked NCHW with ``b`` channels
    innermost (one SIMD vector of float32 for ``b`` = 4 / 8 / 16: SSE or NEON, AVX2, AVX-512).
    """

    NCHW = "NCHW"
    NHWC = "NHWC"
    NCHW4C = "NCHW4c"
    NCHW8C = "NCHW8c"
    NCHW16C = "NCHW16c"


@dataclass(frozen=True)
class Hardware:
    """Facts the compression and optimization passes read."""

    channel_multiple: int = 1
    int8: Int8Kind = Int8Kind.NONE
    sparse_2_4: bool = False
    winograd: bool = False
    peak_gflops_fp32: float = 0.0
    cpu_features: tuple[str, ...] = ()
    conv_layout: DataLayout = DataLayout.NCHW


@dataclass(frozen=True)
class Toolchain:
    """How the module is linked: ``cc`` is the C++ compiler for ``export_library``."""

    cc: str | None = None


@dataclass(frozen=True)
class Runtime:
    """How an artifact for this target runs away from the device: ``emulator`` (e.g.
    ``qemu-aarch64``) runs the deploy runner on this host; ``sysroot`` is passed as ``-L``."""

    emulator: str | None = None
    sysroot: str | None = None


@dataclass(frozen=True)
class Tuning:
    rpc_key: str | None = None


@dataclass(frozen=True)
class Npu:
    """Constraints and cost model of an NPU stub (used by the NPU issue's passes)."""

    supported_ops: tuple[str, ...] = ()
    in_channel_multiple: int = 1
    out_channel_multiple: int = 1
    pow2_scales: bool = False
    # channel multiples as hard limits (other counts stay on the host) rather than the idle MAC
    # lanes the cost model charges (docs/npu-command-stream.md, "Cost model")
    strict_channels: bool = False
    macs_per_cycle: int = 0
    bytes_per_cycle: int = 0


@dataclass(frozen=True)
class TargetSpec:
    """A validated, fully resolved target description."""

    name: str
    description: str
    tvm: dict[str, Any]
    toolchain: Toolchain = field(default_factory=Toolchain)
    hardware: Hardware = field(default_factory=Hardware)
    runtime: Runtime = field(default_factory=Runtime)
    tuning: Tuning = field(default_factory=Tuning)
    npu: Npu | None = None
    path: str | None = None

    @property
    def kind(self) -> str:
        """The TVM target kind of the device code (``llvm``, ``cuda``)."""
        return self.tvm["kind"]

    @property
    def host_triple(self) -> str:
        """The triple of the CPU code: the target's own, or its ``host`` for GPUs."""
        cpu = self.tvm.get("host", self.tvm) if self.kind != "llvm" else self.tvm
        return cpu.get("mtriple", "x86_64-linux-gnu")

    @property
    def arch(self) -> str:
        """CPU architecture of the host code, e.g. ``x86_64`` or ``aarch64``."""
        return self.host_triple.split("-")[0]

    def tvm_target(self):
        """The ``tvm.target.Target`` for this spec (imports TVM)."""
        import tvm

        return tvm.target.Target(self.tvm)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description for manifests."""
        from dataclasses import asdict

        out = asdict(self)
        out["hardware"]["int8"] = self.hardware.int8.value
        out["hardware"]["conv_layout"] = self.hardware.conv_layout.value
        return out


# ---------------------------------------------------------------------------- loading

_TOP_KEYS = {"name", "description", "base", "tvm", "toolchain", "hardware", "runtime", "tuning", "npu"}
_TABLES: dict[str, type] = {
    "toolchain": Toolchain,
    "hardware": Hardware,
    "runtime": Runtime,
    "tuning": Tuning,
    "npu": Npu,
}


def data_dir(name: str) -> Path:
    """A shipped top-level data folder (``targets``, ``schedules``): from the source checkout
    this package sits in, else from the installed wheel (``hwcompress._<name>``)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    return Path(__file__).resolve().parent / f"_{name}"


def targets_dir() -> Path:
    """The folder of shipped target files."""
    return data_dir("targets")


def list_targets() -> list[TargetSpec]:
    """Every shipped target, sorted by name."""
    return [load_target(p.stem) for p in sorted(targets_dir().glob("*.toml"))]


def load_target(name_or_path: "str | TargetSpec") -> TargetSpec:
    """Load a target by shipped name (``host``, ``jetson-orin``) or by TOML path."""
    if isinstance(name_or_path, TargetSpec):
        return name_or_path
    return _load_cached(str(name_or_path))


@functools.lru_cache(maxsize=None)
def _load_cached(name_or_path: str) -> TargetSpec:
    path = _find(name_or_path)
    raw = _read_merged(path, seen=())
    return _build_spec(raw, path)


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or os.sep in name_or_path:
        if not p.is_file():
            raise TargetError(f"target file not found: {name_or_path}")
        return p.resolve()
    shipped = targets_dir() / f"{name_or_path}.toml"
    if not shipped.is_file():
        known = ", ".join(sorted(q.stem for q in targets_dir().glob("*.toml")))
        raise TargetError(f"unknown target '{name_or_path}' (known: {known}; or pass a .toml path)")
    return shipped


def _read_merged(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise TargetError(f"{path}: base: inheritance cycle through {', '.join(p.name for p in seen)}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise TargetError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise TargetError(f"{path}: base: expected a target name, got {base!r}")
    base_path = path.parent / f"{base}.toml" if (path.parent / f"{base}.toml").is_file() else _find(base)
    merged = _read_merged(base_path, seen + (path,))
    merged.pop("name", None)
    merged.pop("description", None)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _build_spec(raw: dict[str, Any], path: Path) -> TargetSpec:
    where = str(path)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise TargetError(f"{where}: name: required, a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise TargetError(f"{where}: description: expected a string")
    tvm_table = raw.get("tvm")
    if not isinstance(tvm_table, dict) or not isinstance(tvm_table.get("kind"), str):
        raise TargetError(f"{where}: [tvm].kind: required (e.g. kind = \"llvm\")")
    tables = {}
    for key, cls in _TABLES.items():
        if key in raw:
            tables[key] = _table(cls, raw[key], f"{where}: [{key}]")
    spec = TargetSpec(
        name=name,
        description=description,
        tvm=_resolve_tvm(tvm_table, where),
        path=str(path),
        **tables,
    )
    _check_tvm_target(spec, where)
    return spec


def _table(cls: type, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise TargetError(f"{where}: expected a table")
    fields = cls.__dataclass_fields__
    unknown = set(raw) - set(fields)
    if unknown:
        raise TargetError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(fields[key].type, value, f"{where}.{key}")
    return cls(**values)


def _coerce(annotation: str, value: Any, where: str):
    expect = annotation.replace(" ", "")
    if expect == "Int8Kind":
        if value == "auto":
            return detect_int8()
        try:
            return Int8Kind(value)
        except ValueError:
            choices = ", ".join(k.value for k in Int8Kind)
            raise TargetError(f"{where}: expected one of {choices} or auto, got {value!r}") from None
    if expect == "DataLayout":
        try:
            return DataLayout(value)
        except ValueError:
            choices = ", ".join(k.value for k in DataLayout)
            raise TargetError(f"{where}: expected one of {choices}, got {value!r}") from None
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "bool": lambda v: isinstance(v, bool),
        "str|None": lambda v: isinstance(v, str),
        "tuple[str,...]": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    }
    if not checks[expect](value):
        readable = {"str|None": "a string", "tuple[str,...]": "a list of strings"}.get(expect, expect)
        qualifier = " >= 0" if expect in ("int", "float") else ""
        raise TargetError(f"{where}: expected {readable}{qualifier}, got {value!r}")
    if expect == "tuple[str,...]":
        return tuple(value)
    if expect == "float":
        return float(value)
    return value


def _resolve_tvm(table: dict[str, Any], where: str) -> dict[str, Any]:
    resolved = dict(table)
    if resolved.get("mtriple") == "host":
        # LLVM's own system triple names the wheel's build toolchain (x86_64-conda-linux-gnu)
        resolved["mtriple"] = f"{host_arch()}-linux-gnu"
    if resolved.get("mcpu") == "host":
        resolved["mcpu"] = host_cpu_name()
    if resolved.get("num-cores") == "auto":
        resolved["num-cores"] = os.cpu_count() or 1
    host = resolved.get("host")
    if isinstance(host, dict):
        resolved["host"] = _resolve_tvm(host, where)
    return resolved


def _check_tvm_target(spec: TargetSpec, where: str) -> None:
    import tvm

    try:
        tvm.target.Target(spec.tvm)
    except Exception as e:  # TVM raises several types; the message is what matters
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TargetError(f"{where}: [tvm]: TVM rejects this target: {first}") from None
    # LLVM silently emits generic code for a CPU name it does not know: refuse it instead
    for table, label in ((spec.tvm, "[tvm]"), (spec.tvm.get("host"), "[tvm].host")):
        if isinstance(table, dict) and table.get("kind") == "llvm" and "mcpu" in table:
            triple = table.get("mtriple", f"{host_arch()}-linux-gnu")
            if not tvm.target.codegen.llvm_is_valid_cpu(table["mcpu"], triple):
                raise TargetError(f"{where}: {label}.mcpu: LLVM does not know CPU {table['mcpu']!r} for {triple}")


# ---------------------------------------------------------------------------- host facts

def host_arch() -> str:
    """This machine's architecture in triple spelling (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """CPU flags of this machine as /proc/cpuinfo spells them (``avx2``, ``avx512f``, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``, ``sapphirerapids``)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


@functools.lru_cache(maxsize=1)
def host_llc_bytes() -> int:
    """This machine's last-level cache in bytes (the largest ``cpu0`` cache sysfs lists; 32 MiB
    when sysfs cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 << 20)


def detect_int8() -> Int8Kind:
    """The best integer dot-product instructions of this machine."""
    flags = host_cpu_features()
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return Int8Kind.VNNI
    if "avx2" in flags:
        return Int8Kind.AVX2
    if "asimddp" in flags:
        return Int8Kind.SDOT
    if "asimd" in flags:
        return Int8Kind.NEON
    return Int8Kind.NONE


def runnable_here(spec: TargetSpec) -> tuple[bool, str]:
    """Whether code for ``spec`` runs on this machine natively, and if not, why not."""
    if spec.kind == "cuda":
        import tvm

        if tvm.cuda(0).exist:
            return True, ""
        return False, "no CUDA GPU on this machine"
    if spec.arch != host_arch():
        return False, f"built for {spec.arch}, this machine is {host_arch()}"
    missing = [f for f in spec.hardware.cpu_features if f not in host_cpu_features()]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    return True, ""


def spec_from_dict(data: dict[str, Any]) -> TargetSpec:
    """Rebuild a resolved TargetSpec from ``TargetSpec.to_dict()`` (e.g. an artifact's manifest)."""
    try:
        hardware = dict(data.get("hardware", {}))
        hardware["int8"] = Int8Kind(hardware.get("int8", "none"))
        hardware["cpu_features"] = tuple(hardware.get("cpu_features", ()))
        hardware["conv_layout"] = DataLayout(hardware.get("conv_layout", "NCHW"))
        npu = data.get("npu")
        if npu is not None:
            npu = Npu(**{**npu, "supported_ops": tuple(npu.get("supported_ops", ()))})
        return TargetSpec(
            name=data["name"],
            description=data.get("description", ""),
            tvm=dict(data["tvm"]),
            toolchain=Toolchain(**data.get("toolchain", {})),
            hardware=Hardware(**hardware),
            runtime=Runtime(**data.get("runtime", {})),
            tuning=Tuning(**data.get("tuning", {})),
            npu=npu,
            path=data.get("path"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TargetError(f"target description is malformed: {e}") from None
