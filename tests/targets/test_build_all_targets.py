"""Every shipped target builds an artifact through hwcompress.compile; targets that run
here (natively or under qemu) are verified against ONNX Runtime, the others say why not."""

import shutil

import numpy as np
import pytest

import hwcompress
from hwcompress.errors import ArtifactError
from hwcompress.targets import load_target, runnable_here, targets_dir

SHIPPED = sorted(p.stem for p in targets_dir().glob("*.toml"))


def _skip_unless_toolchain(spec):
    if spec.toolchain.cc and not shutil.which(spec.toolchain.cc):
        pytest.skip(f"cross compiler {spec.toolchain.cc} not installed (./setup.sh installs it)")
    if spec.kind == "cuda" and not shutil.which("nvcc"):
        pytest.skip("nvcc not installed: CUDA artifacts carry device code compiled at build time")
    if spec.runtime.emulator:
        from hwcompress.backends.runner import runner_dir

        try:
            runner_dir(spec.arch)
        except ArtifactError as e:
            pytest.skip(str(e))


@pytest.mark.parametrize("name", SHIPPED)
def test_target_builds_an_artifact(name, tiny_static_model, tmp_path):
    spec = load_target(name)
    _skip_unless_toolchain(spec)
    out = tmp_path / name
    artifact = hwcompress.compile(tiny_static_model, target=name, out=out)
    manifest = artifact.manifest
    assert (out / "module.so").is_file() and manifest["target"]["name"] == name
    verification = manifest["verification"]
    native, why = runnable_here(spec)
    if native or (spec.runtime.emulator and shutil.which(spec.runtime.emulator)):
        assert verification["status"] == "passed", verification
        x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
        import onnxruntime as ort

        ref = ort.InferenceSession(tiny_static_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(hwcompress.load(out).run(x)[0], ref, rtol=1e-3, atol=1e-4)
    else:
        assert verification["status"] == "skipped" and why in verification["reason"]
        with pytest.raises(ArtifactError, match="cannot run on this machine"):
            hwcompress.load(out)
    if spec.runtime.emulator:
        assert {"hwc_runner", "libtvm_runtime.so"} <= set(manifest["files"])


def test_artifact_that_cannot_run_here_says_why(tiny_static_model, tmp_path):
    spec = load_target("x86-avx512")
    if runnable_here(spec)[0]:
        pytest.skip("this CPU has AVX-512 and VNNI")
    artifact = hwcompress.compile(tiny_static_model, target=spec, out=tmp_path / "a")
    with pytest.raises(ArtifactError, match="lacks avx512f"):
        artifact.run(np.zeros((1, 3, 16, 16), np.float32))
