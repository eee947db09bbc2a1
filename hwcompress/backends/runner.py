"""The C++ deploy runner (``runner/hwc_runner.cc``): where it is built, which files an
artifact must carry, and how to run an artifact's module through it (natively, or under an
emulator such as ``qemu-aarch64 -L <sysroot>``).

The runner is built per architecture by ``runner/build.sh ARCH`` into ``build/runner/ARCH/``
(``hwc_runner`` plus ``libtvm_runtime.so`` and ``libtvm_ffi.so`` from the TVM wheels of that
architecture; rpath ``$ORIGIN``). ``HWC_RUNNER_ROOT`` overrides ``build/runner``.

Kept light: numpy is imported only when a module is run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArtifactError

if TYPE_CHECKING:  # pragma: no cover
    import numpy

RUNNER_NAME = "hwc_runner"
RUNNER_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_ERROR_PREFIX = "hwc_runner: error: "


def _norm_arch(arch: str) -> str:
    arch = arch.strip().lower()
    return _ARCH_ALIASES.get(arch, arch)


def runner_root() -> Path:
    """The directory holding one ``ARCH/`` folder per built runner."""
    env = os.environ.get("HWC_RUNNER_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "runner"


def runner_dir(arch: str) -> Path:
    """Where the runner for ``arch`` and its libraries were built."""
    arch = _norm_arch(arch)
    d = runner_root() / arch
    missing = [n for n in (RUNNER_NAME, *RUNNER_LIBS) if not (d / n).is_file()]
    if missing:
        raise ArtifactError(
            f"no deploy runner built for {arch} ({d / missing[0]} is missing): "
            f"run `runner/build.sh {arch}`"
        )
    return d


def runner_files(arch: str) -> list[Path]:
    """The runner binary and the shared libraries it needs; an artifact carries them all,
    side by side (the runner finds the libraries through its rpath ``$ORIGIN``)."""
    d = runner_dir(arch)
    return [d / RUNNER_NAME, *(d / n for n in RUNNER_LIBS)]


def _find_runner(workdir: Path) -> Path:
    for cand in (workdir / RUNNER_NAME, workdir / "runner" / RUNNER_NAME):
        if cand.is_file():
            return cand
    raise ArtifactError(f"{workdir}: no {RUNNER_NAME} in the artifact (copy runner_files(arch) into it)")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(_ERROR_PREFIX):
            return ln[len(_ERROR_PREFIX):]
    return lines[-1] if lines else ""


def run_with_runner(
    workdir: Path,
    module_file: str,
    inputs: "list[numpy.ndarray]",
    emulator: str | None,
    sysroot: str | None,
    repeat: int = 0,
    warmup: int = 0,
    *,
    runner: Path | None = None,
    threads: int | None = None,
    timeout: float | None = None,
) -> "tuple[list[numpy.ndarray], list[float] | None]":
    """Run ``main`` of ``module_file`` (relative to ``workdir`` or absolute) with the deploy
    runner found in ``workdir`` (or ``runner``), under ``emulator -L sysroot`` when an
    emulator is given. Returns the outputs and, when ``repeat > 0``, the latencies of the
    ``repeat`` timed runs in milliseconds (after ``warmup`` untimed ones), else ``None``.
    """
    import numpy as np

    workdir = Path(workdir)
    runner = Path(runner) if runner is not None else _find_runner(workdir)
    module = Path(module_file)
    if not module.is_absolute():
        module = workdir / module
    if not module.is_file():
        raise ArtifactError(f"{module}: module file not found")

    with tempfile.TemporaryDirectory(prefix="hwc_run_") as tmp:
        tmp_path = Path(tmp)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        cmd: list[str] = []
        if emulator:
            cmd += shlex.split(emulator)
            if sysroot:
                cmd += ["-L", str(sysroot)]
        cmd += [str(runner.resolve()), str(module.resolve())]
        for i, arr in enumerate(inputs):
            arr = np.asarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f = tmp_path / f"in{i}.npy"
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            cmd += ["--input", str(f)]
        cmd += ["--output-dir", str(out_dir), "--json"]
        if repeat > 0:
            cmd += ["--repeat", str(int(repeat)), "--warmup", str(int(warmup))]
        if threads:
            cmd += ["--threads", str(int(threads))]

        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except FileNotFoundError:
            raise ArtifactError(
                f"cannot run {runner.name}: '{cmd[0]}' not found"
                + (" (install qemu-user)" if emulator and "qemu" in emulator else "")
            ) from None
        except OSError as e:  # e.g. exec format error: an aarch64 runner without an emulator
            raise ArtifactError(f"cannot run {runner}: {e.strerror or e} (does it need an emulator?)") from None
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"{runner.name}: timed out after {timeout} s running {module.name}") from None

        if proc.returncode != 0:
            line = _one_line(proc.stderr)
            if proc.returncode < 0:
                line = f"{runner.name} killed by signal {-proc.returncode}" + (f": {line}" if line else "")
            raise ArtifactError(line or f"{runner.name} failed with exit code {proc.returncode}")

        summary = None
        for ln in reversed(proc.stdout.splitlines()):
            if ln.startswith("{"):
                try:
                    summary = json.loads(ln)
                except ValueError:
                    pass
                break
        if summary is None:
            raise ArtifactError(f"{runner.name}: no JSON summary on stdout: {proc.stdout.strip()[-200:]!r}")
        outputs = [np.load(Path(o["file"]), allow_pickle=False) for o in summary.get("outputs", [])]
        latencies = [float(x) for x in summary.get("latencies_ms", [])] if repeat > 0 else None
    return outputs, latencies
