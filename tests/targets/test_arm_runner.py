"""The C++ deploy runner on aarch64 modules, run under qemu-aarch64.

Builds small ONNX models for the ARM targets, exports them with the target's cross compiler,
runs them with ``build/runner/aarch64/hwc_runner`` (``runner/build.sh aarch64``) under
qemu-user and compares with ONNX Runtime on this machine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hwcompress.errors import ArtifactError

ARM_TARGETS = ["arm-cortex-a72", "arm-cortex-a76"]


def _skip_reason(spec) -> str | None:
    from hwcompress.backends.runner import runner_dir

    if not shutil.which(spec.runtime.emulator or "qemu-aarch64"):
        return f"{spec.runtime.emulator or 'qemu-aarch64'} not installed (apt-get install qemu-user)"
    if spec.runtime.sysroot and not Path(spec.runtime.sysroot).is_dir():
        return f"sysroot {spec.runtime.sysroot} missing (apt-get install g++-aarch64-linux-gnu)"
    if spec.toolchain.cc and not shutil.which(spec.toolchain.cc):
        return f"cross compiler {spec.toolchain.cc} not installed"
    try:
        runner_dir(spec.arch)
    except ArtifactError as e:
        return str(e)
    return None


def _spec_or_skip(name: str):
    from hwcompress.targets import load_target

    spec = load_target(name)
    reason = _skip_reason(spec)
    if reason:
        pytest.skip(reason)
    return spec


# ---------------------------------------------------------------------------- models

def _cnn_model():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((10, 8 * 8 * 8)) * 0.05).astype(np.float32)
    b2 = (rng.standard_normal(10) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2")]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime refuses IR > 10
    onnx.checker.check_model(model)
    return model


DTYPES = [
    ("a", "INT8", np.int8),
    ("b", "UINT8", np.uint8),
    ("c", "INT32", np.int32),
    ("d", "INT64", np.int64),
    ("e", "FLOAT16", np.float16),
]


def _dtype_model():
    """One Add per dtype: five inputs, five outputs (a tuple returned by main)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", [n, n], [n + "_out"]) for n, _, _ in DTYPES]
    graph = helper.make_graph(
        nodes,
        "dtypes",
        [helper.make_tensor_value_info(n, getattr(TensorProto, t), [2, 3]) for n, t, _ in DTYPES],
        [helper.make_tensor_value_info(n + "_out", getattr(TensorProto, t), [2, 3]) for n, t, _ in DTYPES],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _export(model, spec, workdir: Path) -> Path:
    """Build ``model`` for ``spec`` into ``workdir/module.so`` and put the runner beside it."""
    import hwcompress.frontend as fe
    from hwcompress import build as B
    from hwcompress.backends import get_backend
    from hwcompress.backends.runner import runner_files

    workdir.mkdir(parents=True, exist_ok=True)
    mod = fe.import_onnx(model)
    ex = B.build(B.schedule(B.legalize(mod, spec), spec), spec)
    get_backend(spec).export(ex, workdir / "module.so", spec)
    for f in runner_files(spec.arch):
        shutil.copy2(f, workdir / f.name)
    return workdir


@pytest.fixture(scope="module", params=ARM_TARGETS)
def cnn_artifact(request, tmp_path_factory):
    spec = _spec_or_skip(request.param)
    model = _cnn_model()
    workdir = _export(model, spec, tmp_path_factory.mktemp(f"cnn-{request.param}"))
    return spec, model, workdir


@pytest.fixture(scope="module")
def a72_cnn(tmp_path_factory):
    spec = _spec_or_skip("arm-cortex-a72")
    return spec, _export(_cnn_model(), spec, tmp_path_factory.mktemp("cnn-err"))


def _run_raw(spec, workdir: Path, *args: str):
    cmd = [spec.runtime.emulator]
    if spec.runtime.sysroot:
        cmd += ["-L", spec.runtime.sysroot]
    cmd += [str(workdir / "hwc_runner"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=300)


# ---------------------------------------------------------------------------- tests

@pytest.mark.qemu
def test_cnn_matches_onnxruntime(cnn_artifact):
    ort = pytest.importorskip("onnxruntime")
    from hwcompress.backends.runner import run_with_runner

    spec, model, workdir = cnn_artifact
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"x": x})

    outs, lat = run_with_runner(workdir, "module.so", [x], spec.runtime.emulator, spec.runtime.sysroot)
    assert lat is None
    assert len(outs) == 1
    assert outs[0].dtype == np.float32 and outs[0].shape == (1, 10)
    np.testing.assert_allclose(outs[0], ref, atol=1e-4, rtol=1e-3)


@pytest.mark.qemu
def test_cnn_timing(cnn_artifact):
    from hwcompress.backends.runner import run_with_runner

    spec, _, workdir = cnn_artifact
    x = np.ones((1, 3, 16, 16), np.float32)
    outs, lat = run_with_runner(
        workdir, "module.so", [x], spec.runtime.emulator, spec.runtime.sysroot, repeat=5, warmup=1
    )
    assert len(outs) == 1
    assert lat is not None and len(lat) == 5
    assert all(t > 0 for t in lat)


@pytest.mark.qemu
def test_runner_json_on_stdout(cnn_artifact, tmp_path):
    import json

    spec, _, workdir = cnn_artifact
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 16, 16), np.float32))
    r = _run_raw(spec, workdir, "module.so", "--input", str(tmp_path / "x.npy"),
                 "--output-dir", str(tmp_path), "--repeat", "3", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(summary["latencies_ms"]) == 3
    assert summary["median_ms"] > 0 and summary["p90_ms"] >= summary["min_ms"]
    assert summary["outputs"] == [{"file": str(tmp_path / "out0.npy"), "dtype": "float32", "shape": [1, 10]}]
    assert np.load(tmp_path / "out0.npy").shape == (1, 10)


@pytest.mark.qemu
def test_dtypes_roundtrip(tmp_path):
    """int8, uint8, int32, int64 and float16 inputs and outputs, and a tuple result."""
    from hwcompress.backends.runner import run_with_runner

    spec = _spec_or_skip("arm-cortex-a72")
    workdir = _export(_dtype_model(), spec, tmp_path / "art")
    rng = np.random.default_rng(2)
    inputs = [
        (rng.integers(0, 100, (2, 3)) if dt == np.uint8 else rng.integers(-50, 50, (2, 3))).astype(dt)
        for _, _, dt in DTYPES
    ]
    outs, _ = run_with_runner(workdir, "module.so", inputs, spec.runtime.emulator, spec.runtime.sysroot)
    assert len(outs) == len(inputs)
    for x, y in zip(inputs, outs):
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x + x)


@pytest.mark.qemu
def test_wrong_dtype_exits_2_with_one_line(a72_cnn, tmp_path):
    spec, workdir = a72_cnn
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 16, 16), np.int8))
    r = _run_raw(spec, workdir, "module.so", "--input", str(tmp_path / "bad.npy"), "--output-dir", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "dtype float32" in lines[0] and "int8" in lines[0]
    assert not (tmp_path / "out0.npy").exists()


@pytest.mark.qemu
@pytest.mark.parametrize(
    "array, expect",
    [
        (np.zeros((1, 3, 8, 16), np.float32), "shape[2] mismatch"),
        (np.asfortranarray(np.zeros((1, 3, 16, 16), np.float32)), "Fortran order"),
    ],
    ids=["wrong-shape", "fortran-order"],
)
def test_bad_input_errors(a72_cnn, tmp_path, array, expect):
    spec, workdir = a72_cnn
    np.save(tmp_path / "bad.npy", array)
    r = _run_raw(spec, workdir, "module.so", "--input", str(tmp_path / "bad.npy"), "--output-dir", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr


@pytest.mark.qemu
def test_run_with_runner_errors_become_artifact_error(a72_cnn):
    from hwcompress.backends.runner import run_with_runner

    spec, workdir = a72_cnn
    with pytest.raises(ArtifactError, match=r"expect Tensor with dtype float32 but get int32"):
        run_with_runner(workdir, "module.so", [np.zeros((1, 3, 16, 16), np.int32)],
                        spec.runtime.emulator, spec.runtime.sysroot)
    with pytest.raises(ArtifactError, match=r"main takes 1 input\(s\) \(x\), got 2"):
        x = np.zeros((1, 3, 16, 16), np.float32)
        run_with_runner(workdir, "module.so", [x, x], spec.runtime.emulator, spec.runtime.sysroot)


def test_runner_dir_missing_says_how_to_build(tmp_path, monkeypatch):
    from hwcompress.backends.runner import runner_dir, runner_files

    monkeypatch.setenv("HWC_RUNNER_ROOT", str(tmp_path))
    with pytest.raises(ArtifactError, match=r"runner/build\.sh aarch64"):
        runner_dir("aarch64")
    with pytest.raises(ArtifactError, match=r"runner/build\.sh aarch64"):
        runner_files("arm64")
    d = tmp_path / "aarch64"
    d.mkdir()
    for name in ("hwc_runner", "libtvm_runtime.so", "libtvm_ffi.so"):
        (d / name).write_bytes(b"")
    assert [p.name for p in runner_files("aarch64")] == ["hwc_runner", "libtvm_runtime.so", "libtvm_ffi.so"]


def test_run_with_runner_missing_runner(tmp_path):
    from hwcompress.backends.runner import run_with_runner

    (tmp_path / "module.so").write_bytes(b"")
    with pytest.raises(ArtifactError, match="no hwc_runner"):
        run_with_runner(tmp_path, "module.so", [], "qemu-aarch64", None)
