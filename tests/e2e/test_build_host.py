"""Build -> artifact -> load -> run on this host, through the Python API."""

import json

import numpy as np
import onnxruntime as ort
import pytest

import hwcompress
from hwcompress.errors import ArtifactError, DataError, ShapeError, VerificationError


def _ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from model_builders import tiny_cnn

    model = tiny_cnn()
    out = tmp_path_factory.mktemp("host") / "artifact"
    artifact = hwcompress.compile(model, target="host", out=out, input_shapes={"input": (2, 3, 16, 16)})
    return model, out, artifact


def test_artifact_matches_onnxruntime(built):
    model, _, artifact = built
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = artifact.run(x)
    np.testing.assert_allclose(y, _ort(model, x), rtol=1e-3, atol=1e-4)
    assert artifact.run({"input": x})[0].shape == (2, 10)


def test_manifest_records_everything(built):
    _, out, artifact = built
    m = json.loads((out / "manifest.json").read_text())
    assert m == artifact.manifest
    assert m["hwcompress_version"] == hwcompress.__version__ and m["tvm_version"].startswith("0.27")
    assert m["target"]["name"] == "host" and m["target"]["tvm"]["kind"] == "llvm"
    assert m["inputs"] == [{"name": "input", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [2, 10], "dtype": "float32"}]
    # the steps that ran: no user recipe, the host's default optimizations
    assert [s["technique"] for s in m["recipe"]["steps"]] == ["fold-bn", "layout", "winograd"]
    assert m["optimize"] == {
        "fold_bn": True, "fuse": True, "blocks": True, "winograd": "auto", "winograd_applied": True, "layout": "auto", "layout_applied": "NHWC"
    }
    assert set(m["files"]) >= {"module.so"} and all(len(h) == 64 for h in m["files"].values())
    v = m["verification"]
    assert v["status"] == "passed" and v["reference"] == "onnxruntime"
    assert v["cases"][0]["max_abs_err"] < 1e-3
    assert m["inspect"]["after"]["flops"] > 0 and m["inspect"]["after"]["layers"]


def test_load_checks_hashes(built, tmp_path):
    import shutil

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert hwcompress.load(copy).run(np.zeros((2, 3, 16, 16), np.float32))[0].shape == (2, 10)
    with open(copy / "module.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="SHA-256"):
        hwcompress.load(copy)


def test_bench_returns_latencies(built):
    _, _, artifact = built
    lat = artifact.bench(np.zeros((2, 3, 16, 16), np.float32), repeat=5, warmup=1)
    assert len(lat) == 5 and all(t > 0 for t in lat)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 3, 16, 16), np.float32), "shape"),
        (np.zeros((2, 3, 16, 16), np.float64), "dtype float64"),
        ({"x": np.zeros((2, 3, 16, 16), np.float32)}, "unknown"),
    ],
)
def test_bad_inputs_are_named(built, bad, message):
    _, _, artifact = built
    with pytest.raises(DataError, match=message):
        artifact.run(bad)


def test_dynamic_dim_without_shape_fails_cleanly(tiny_model, tmp_path):
    with pytest.raises(ShapeError, match="input 'input' axis 0 is dynamic"):
        hwcompress.compile(tiny_model, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_verification_failure_leaves_no_artifact(tiny_static_model, tmp_path):
    with pytest.raises(VerificationError, match="verification against ONNX Runtime failed"):
        hwcompress.compile(tiny_static_model, out=tmp_path / "a", rtol=0.0, atol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_user_verify_inputs_are_recorded(tiny_static_model, tmp_path):
    x = np.ones((1, 3, 16, 16), np.float32)
    artifact = hwcompress.compile(tiny_static_model, out=tmp_path / "a", verify_inputs=[x])
    labels = [c["inputs"] for c in artifact.manifest["verification"]["cases"]]
    assert labels == ["random(seed=0)", "user"]


def test_import_onnx_gives_relax_module(tiny_static_model):
    mod = hwcompress.import_onnx(tiny_static_model)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_integer_inputs_verify_on_user_data(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from model_builders import make_model

    emb = numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(5, 4), "emb")
    model = make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [emb],
    )
    # random int64 ids are out of range: ORT rejects them, and the module is never run on them
    with pytest.raises(VerificationError, match="--verify-input"):
        hwcompress.compile(model, out=tmp_path / "a")
    artifact = hwcompress.compile(model, out=tmp_path / "b", verify_inputs=[np.array([0, 4, 2])])
    v = artifact.manifest["verification"]
    assert v["status"] == "passed" and [c["inputs"] for c in v["cases"]] == ["user"]
    assert "rejects" in v["skipped_inputs"][0]
    np.testing.assert_array_equal(artifact.run(np.array([1, 1, 3]))[0], np.arange(20, dtype=np.float32).reshape(5, 4)[[1, 1, 3]])
