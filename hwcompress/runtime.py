"""Loading and running artifacts: natively, or through the deploy runner under an emulator."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import ArtifactError, DataError
from .export import MODULE, read_manifest
from .targets import TargetSpec, runnable_here, spec_from_dict

RUNNER = "hwc_runner"


def how_it_runs(spec: TargetSpec, directory: Path | None) -> tuple[str | None, str]:
    """``("native" | "emulated" | None, reason)`` for an artifact of ``spec`` on this machine."""
    native, why_not = runnable_here(spec)
    if native:
        return "native", ""
    emulator = spec.runtime.emulator
    if spec.kind == "llvm" and emulator:
        if directory is not None and not (directory / RUNNER).is_file():
            return None, f"{why_not}, and the artifact has no deploy runner to emulate"
        if shutil.which(emulator) is None:
            return None, f"{why_not}, and the emulator {emulator} is not installed"
        return "emulated", ""
    return None, why_not


class Artifact:
    """A built, verified module directory; ``run`` executes it on this machine."""

    def __init__(self, path: str | os.PathLike, manifest: dict, mode: str | None, why_not: str = ""):
        self.path = Path(path)
        self.manifest = manifest
        self.mode = mode
        self.why_not = why_not
        self.spec = spec_from_dict(manifest["target"])
        self._vm = None

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.spec.name!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, inputs) -> list[np.ndarray]:
        """Order and validate ``inputs`` (array, list in input order, or dict by name)."""
        return check_inputs(self.inputs, inputs)

    # ------------------------------------------------------------------ running

    def run(self, inputs) -> list[np.ndarray]:
        """Run the module once and return its outputs as numpy arrays."""
        arrays = self.check_inputs(inputs)
        self._check_runnable()
        if self.mode == "emulated":
            outputs, _ = self._run_emulated(arrays)
            return outputs
        vm, device = self.native_vm()
        import tvm

        result = vm["main"](*[tvm.runtime.tensor(a, device) for a in arrays])
        return _to_numpy(result)

    def bench(self, inputs, repeat: int = 20, warmup: int = 3) -> list[float]:
        """Latency of ``repeat`` runs after ``warmup`` runs, in milliseconds."""
        arrays = self.check_inputs(inputs)
        if repeat < 1:
            raise DataError(f"--bench must be >= 1, got {repeat}")
        self._check_runnable()
        if self.mode == "emulated":
            _, latencies = self._run_emulated(arrays, repeat=repeat, warmup=warmup)
            return latencies
        import tvm

        vm, device = self.native_vm()
        args = [tvm.runtime.tensor(a, device) for a in arrays]
        for _ in range(warmup):
            vm["main"](*args)
        device.sync()
        latencies = []
        for _ in range(repeat):
            start = time.perf_counter()
            vm["main"](*args)
            device.sync()
            latencies.append((time.perf_counter() - start) * 1e3)
        return latencies

    def _check_runnable(self) -> None:
        if self.mode is None:
            raise ArtifactError(f"{self.path}: target '{self.spec.name}' cannot run on this machine ({self.why_not})")

    def native_vm(self):
        """``(VirtualMachine, device)`` of an artifact that runs natively here (created once)."""
        if self._vm is None:
            import tvm
            from tvm import relax

            lib = tvm.runtime.load_module(str(self.path / MODULE))
            device = tvm.cuda(0) if self.spec.kind == "cuda" else tvm.cpu(0)
            self._vm = (relax.VirtualMachine(lib, device), device)
        return self._vm

    def _run_emulated(self, arrays, repeat: int = 0, warmup: int = 0):
        from .backends.runner import run_with_runner

        return run_with_runner(
            self.path, MODULE, arrays, self.spec.runtime.emulator, self.spec.runtime.sysroot, repeat=repeat, warmup=warmup
        )


def load_array_file(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """A ``.npy`` file's array, or a ``.npz`` file's arrays by name; ``DataError`` naming the
    file when it cannot be read (no pickles)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    return loaded


def check_inputs(specs: Sequence[dict], inputs) -> list[np.ndarray]:
    """Order ``inputs`` (an array, a list in input order, or a dict by name) as ``specs``
    lists them and check shapes and dtypes; ``DataError`` names the offending input."""
    names = [i["name"] for i in specs]
    if isinstance(inputs, np.ndarray):
        arrays = [inputs]
    elif isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise DataError(f"inputs: missing {missing or 'none'}, unknown {extra or 'none'} (model inputs: {', '.join(names)})")
        arrays = [inputs[n] for n in names]
    elif isinstance(inputs, Sequence):
        arrays = list(inputs)
    else:
        raise DataError(f"inputs must be an array, a list or a dict by name, got {type(inputs).__name__}")
    if len(arrays) != len(names):
        raise DataError(f"model takes {len(names)} input(s) ({', '.join(names)}), got {len(arrays)}")
    checked = []
    for spec, array in zip(specs, arrays):
        array = np.asarray(array)
        if list(array.shape) != list(spec["shape"]):
            raise DataError(f"input '{spec['name']}': shape {list(array.shape)}, model expects {spec['shape']}")
        if array.dtype != np.dtype(spec["dtype"]):
            raise DataError(f"input '{spec['name']}': dtype {array.dtype}, model expects {spec['dtype']}")
        checked.append(np.ascontiguousarray(array))
    return checked


def _to_numpy(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out = []
    for item in result:
        out.extend(_to_numpy(item))
    return out


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact: check file hashes and that its target can run here.

    Raises ``ArtifactError`` for a corrupt artifact, and for one this machine cannot run,
    with the way to run it on its device.
    """
    path = Path(path)
    manifest = read_manifest(path)
    spec = spec_from_dict(manifest["target"])
    mode, why = how_it_runs(spec, path)
    if mode is None:
        raise ArtifactError(
            f"{path}: target '{spec.name}' cannot run on this machine ({why}); copy the artifact to the device "
            f"and run it there: with `hwc run` where hwcompress is installed, or `./{RUNNER} {MODULE} --input x.npy` "
            "for targets that ship the deploy runner"
        )
    return Artifact(path, manifest, mode)
