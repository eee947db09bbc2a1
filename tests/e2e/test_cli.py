"""The `hwc` command line: subcommands, JSON output, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def hwc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hwcompress", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hwc: error")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from model_builders import tiny_cnn

    d = tmp_path_factory.mktemp("cli")
    onnx.save(tiny_cnn(), d / "m.onnx")
    r = hwc("build", d / "m.onnx", "--target", "host", "-o", d / "art", "--input-shape", "input=1,3,16,16")
    assert r.returncode == 0, r.stderr
    assert "verified vs ONNX Runtime" in r.stdout
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32))
    return d


def test_run_writes_outputs_and_benches(artifact):
    d = artifact
    r = hwc("run", d / "art", "--input", d / "x.npy", "--output", d / "y.npy", "--bench", "5", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["median_ms"] > 0 and report["p90_ms"] >= report["median_ms"]
    assert np.load(d / "y.npy").shape == (1, 10)
    r = hwc("run", d / "art", "--input", f"input={d / 'x.npy'}")
    assert r.returncode == 0 and "output logits: shape [1, 10]" in r.stdout


def test_inspect_model_and_artifact(artifact):
    d = artifact
    for path in (d / "art",):
        r = hwc("inspect", path, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert {"params", "flops", "bytes", "layers"} <= set(report) and report["flops"] > 0
    r = hwc("inspect", d / "m.onnx", "--input-shape", "input=1,3,16,16")
    assert r.returncode == 0 and "nn.conv2d" in r.stdout and "total" in r.stdout


def test_targets_lists_every_file():
    r = hwc("targets", "--json")
    names = {t["name"] for t in json.loads(r.stdout)}
    assert {"host", "jetson-orin", "arm-cortex-a72", "npu-stub"} <= names


def test_corrupt_model(tmp_path):
    from model_builders import tiny_cnn

    data = tiny_cnn(batch=1).SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    r = hwc("build", tmp_path / "cut.onnx", "-o", tmp_path / "out")
    assert_one_line_error(r, "cut.onnx")
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(hwc("build", tmp_path / "junk.onnx", "-o", tmp_path / "out"), "junk.onnx")
    assert_one_line_error(hwc("build", tmp_path / "missing.onnx"), "missing.onnx", "not found")


def test_unknown_ops_are_all_listed(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r"),
        helper.make_node("FancyOp", ["a"], ["b"], domain="com.example", name="fancy_1"),
        helper.make_node("FancyOp", ["b"], ["c"], domain="com.example", name="fancy_2"),
        helper.make_node("OtherOp", ["c"], ["y"], domain="com.example", name="other"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=8)
    onnx.save(model, tmp_path / "u.onnx")
    r = hwc("build", tmp_path / "u.onnx", "-o", tmp_path / "out")
    assert_one_line_error(r, "FancyOp", "fancy_1", "fancy_2", "OtherOp", "other")
    assert not (tmp_path / "out").exists()


def test_dynamic_dim_without_shape(tmp_path):
    from model_builders import tiny_cnn

    onnx.save(tiny_cnn(), tmp_path / "dyn.onnx")
    assert_one_line_error(hwc("build", tmp_path / "dyn.onnx", "-o", tmp_path / "out"), "input 'input' axis 0", "--input-shape")
    assert_one_line_error(hwc("build", tmp_path / "dyn.onnx", "--input-shape", "input=1,3", "-o", tmp_path / "out"), "rank")
    assert_one_line_error(hwc("build", tmp_path / "dyn.onnx", "--input-shape", "input=a,b"), "--input-shape")
    assert not (tmp_path / "out").exists()


def test_unknown_target_and_bad_target_file(tmp_path, tiny_model_path):
    assert_one_line_error(hwc("build", tiny_model_path, "--target", "tpu9000", "-o", tmp_path / "o"), "tpu9000")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[tvm]\nkind = "llvm"\n[hardware]\nint8 = "fast"\n')
    assert_one_line_error(hwc("build", tiny_model_path, "--target", bad, "-o", tmp_path / "o"), str(bad), "int8")
    assert not (tmp_path / "o").exists()


def test_wrong_input_files(artifact, tmp_path):
    d = artifact
    np.save(tmp_path / "shape.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(tmp_path / "dtype.npy", np.zeros((1, 3, 16, 16), np.float64))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    assert_one_line_error(hwc("run", d / "art", "--input", tmp_path / "shape.npy"), "input 'input'", "shape")
    assert_one_line_error(hwc("run", d / "art", "--input", tmp_path / "dtype.npy"), "input 'input'", "float64")
    assert_one_line_error(hwc("run", d / "art", "--input", tmp_path / "junk.npy"), "junk.npy")
    assert_one_line_error(hwc("run", d / "art", "--input", tmp_path / "none.npy"), "none.npy")
    assert_one_line_error(hwc("run", tmp_path / "nothing", "--input", tmp_path / "shape.npy"), "nothing")


def test_tune_rejects_bad_trials(tiny_model_path):
    assert_one_line_error(hwc("tune", tiny_model_path, "--trials", "0"), "--trials")


def test_bad_destination_and_database(tmp_path, tiny_model_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(hwc("build", tiny_model_path, "-o", tmp_path / "file"), "not a directory")
    assert (tmp_path / "file").read_text() == "x"
    assert_one_line_error(hwc("build", tiny_model_path, "-o", tmp_path / "o", "--db", tmp_path / "nodb"), "nodb", "not a tuning database")
    assert not (tmp_path / "o").exists()


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples"


def test_build_int8_fashion(tmp_path):
    """``hwc build --int8 --calib DIR``: integer kernels, the recipe's int8 step without its
    data, the quantization report (per-layer SQNR, float fallbacks) in the manifest, verified
    against the quantized graph."""
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "sample.npy", np.load(EXAMPLES / "fashion_sample.npy"))
    out = tmp_path / "art"
    r = hwc("build", EXAMPLES / "fashion_resnet.onnx", "--target", "host", "--int8", "--calib", calib,
            "--input-shape", "input=8,1,28,28", "-o", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "verified vs the compressed graph" in r.stdout and "int8: 10 layers" in r.stdout and "float fallback: none" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["recipe"]["steps"]
    assert [s["technique"] for s in steps] == ["fold-bn", "layout", "int8", "winograd"]
    assert steps[2] == {"technique": "int8", "calibration": "minmax", "per_channel": True, "max_samples": 256,
                        "equalize": False, "bias_correction": False}  # fmt: skip
    q = manifest["quantization"]
    assert q["float_fallback"] == [] and "relax.mean" in q["float_ops"]
    assert len(q["layers"]) == 10 and all(layer["sqnr_db"] > 30 for layer in q["layers"])
    assert manifest["verification"]["status"] == "passed"
    assert sum("int8" in k for k in manifest["kernels"]["default_schedule"]) == 10
    r = hwc("run", out, "--input", EXAMPLES / "fashion_sample.npy", "--output", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    labels = np.load(EXAMPLES / "fashion_sample_labels.npy")
    assert (np.load(tmp_path / "y.npy").argmax(1) == labels).mean() >= 0.875


def test_build_int8_data_free(tmp_path):
    """``--calibration data-free``: no data; the manifest's report says how ranges were set."""
    out = tmp_path / "art"
    r = hwc("build", EXAMPLES / "fashion_resnet.onnx", "--target", "host", "--int8", "--calibration", "data-free",
            "--input-shape", "input=8,1,28,28", "-o", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["steps"][2]["technique"] == "int8-data-free"
    assert manifest["quantization"]["calibration"].startswith("data-free") and len(manifest["quantization"]["layers"]) == 10


def test_int8_flag_errors(tmp_path):
    model = EXAMPLES / "fashion_resnet.onnx"
    shape = ("--input-shape", "input=8,1,28,28")
    assert_one_line_error(hwc("build", model, *shape, "--int8", "-o", tmp_path / "o"), "--int8", "--calib")
    assert_one_line_error(hwc("build", model, *shape, "--calibration", "entropy", "-o", tmp_path / "o"), "--calibration", "--int8")
    assert_one_line_error(hwc("build", model, *shape, "--calib", tmp_path, "-o", tmp_path / "o"), "--calib", "--int8")
    r = hwc("build", model, *shape, "--int8", "--calibration", "data-free", "--calib", tmp_path, "-o", tmp_path / "o")
    assert_one_line_error(r, "data-free", "--calib")
    np.save(tmp_path / "bad.npy", np.zeros((8, 3, 28, 28), np.float32))
    r = hwc("build", model, *shape, "--int8", "--calib", tmp_path / "bad.npy", "-o", tmp_path / "o")
    assert_one_line_error(r, "'input'", "bad.npy")
    assert not (tmp_path / "o").exists()


def test_sparse_2_4_flag_errors(tmp_path):
    model = EXAMPLES / "fashion_resnet.onnx"
    shape = ("--input-shape", "input=1,1,28,28")
    (tmp_path / "r.toml").write_text('[[steps]]\ntechnique = "int8-data-free"\n[[steps]]\ntechnique = "sparse-2-4"\n')
    r = hwc("build", model, *shape, "--recipe", tmp_path / "r.toml", "-o", tmp_path / "o")
    assert_one_line_error(r, "sparse-2-4 after int8", "before int8")  # it prunes float weights
    (tmp_path / "r.toml").write_text('[[steps]]\ntechnique = "sparse-2-4"\ndecide = "sometimes"\n')
    assert_one_line_error(hwc("build", model, *shape, "--recipe", tmp_path / "r.toml", "-o", tmp_path / "o"), "decide")
    (tmp_path / "r.toml").write_text('[[steps]]\ntechnique = "sparse-2-4"\nlayers = ["conv2d[99]"]\n')
    assert_one_line_error(hwc("build", model, *shape, "--recipe", tmp_path / "r.toml", "-o", tmp_path / "o"), "conv2d[99]")
    assert_one_line_error(hwc("build", model, *shape, "--sparse-pairs", "-o", tmp_path / "o"), "--sparse-pairs needs --sparse-2-4")
    assert not (tmp_path / "o").exists()
