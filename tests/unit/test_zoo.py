"""Tests of the tools' model zoo (tools/zoo.py), dataset readers (tools/datasets.py)
and the committed reference models (examples/)."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from tool_modules import load_tool

ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]


zoo = load_tool("zoo")
datasets = load_tool("datasets")

ZOO = {
    # name: (expected input shape with dim_param as str, classes)
    "resnet18": (["N", 3, 224, 224], 1000),
    "resnet50": (["N", 3, 224, 224], 1000),
    "mobilenet_v2": (["N", 3, 224, 224], 1000),
    "small_cnn": ([1, 3, 32, 32], 10),
}


@pytest.fixture(scope="module")
def zoo_models():
    return {name: zoo.MODELS[name](seed=0) for name in ZOO}


def _session(model_or_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _dims(value_info):
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_is_valid_export_like_onnx(zoo_models, name):
    m = zoo_models[name]
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    assert [i.name for i in m.graph.input] == ["input"]
    assert _dims(m.graph.input[0]) == ZOO[name][0]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = [n.op_type for n in m.graph.node]
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    assert "BatchNormalization" in ops and "Add" in ops
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Conv":
            assert len(n.input) == 2, "zoo convs carry no bias (BatchNormalization follows)"
        if n.op_type == "BatchNormalization":
            var = onnx.numpy_helper.to_array(inits[n.input[4]])
            assert (var > 0).all()
    if name == "mobilenet_v2":
        assert "Clip" in ops and "Relu" not in ops
        depthwise = [n for n in m.graph.node if n.op_type == "Conv"
                     and next(a.i for a in n.attribute if a.name == "group") > 1]
        assert len(depthwise) == 17
        for n in depthwise:
            w = inits[n.input[1]]
            group = next(a.i for a in n.attribute if a.name == "group")
            assert w.dims[0] == group and w.dims[1] == 1
    if name == "resnet18":
        assert ops.count("Conv") == 20 and ops.count("Add") == 8 and "MaxPool" in ops
    if name == "resnet50":  # 16 bottlenecks of 3 convs, 4 downsampling 1x1 convs, the stem
        assert ops.count("Conv") == 53 and ops.count("Add") == 16 and "MaxPool" in ops
        ones = [n for n in m.graph.node if n.op_type == "Conv" and next(a.ints for a in n.attribute if a.name == "kernel_shape") == [1, 1]]
        assert len(ones) == 36
    if name == "small_cnn":
        assert m.ByteSize() < 200_000


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_on_onnxruntime(zoo_models, name):
    shape, classes = ZOO[name]
    batch = 2 if isinstance(shape[0], str) else 1
    x = np.random.default_rng(123).standard_normal([batch, *shape[1:]]).astype(np.float32)
    (y,) = _session(zoo_models[name]).run(None, {"input": x})
    assert y.shape == (batch, classes)
    assert np.isfinite(y).all()
    assert y.std() > 0.1, "outputs should not be constant"
    assert np.abs(y).max() < 100, "logits should stay O(1..10)"
    if batch == 2:
        assert not np.allclose(y[0], y[1]), "different inputs should give different logits"


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_is_deterministic(zoo_models, name):
    again = zoo.MODELS[name](seed=0)
    assert again.SerializeToString() == zoo_models[name].SerializeToString()


def test_zoo_seed_changes_weights():
    assert zoo.small_cnn(seed=0).SerializeToString() != zoo.small_cnn(seed=1).SerializeToString()


def test_zoo_cli_writes_files(tmp_path):
    assert zoo.main(["--out", str(tmp_path), "--models", "small_cnn"]) == 0
    written = tmp_path / "small_cnn.onnx"
    assert written.read_bytes() == zoo.small_cnn(seed=0).SerializeToString()
    with pytest.raises(SystemExit):
        zoo.main(["--out", str(tmp_path), "--models", "vgg16"])


def test_examples_small_cnn_matches_zoo():
    path = ROOT / "examples" / "small_cnn.onnx"
    assert path.is_file(), "examples/small_cnn.onnx is shipped for the README's default build"
    assert path.stat().st_size < 200_000
    shipped = onnx.load(str(path))
    assert all(d.dim_value > 0 for d in shipped.graph.input[0].type.tensor_type.shape.dim), "fully static"
    # regenerable with `python tools/zoo.py --out examples --models small_cnn`
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (a,) = _session(shipped).run(None, {"input": x})
    (b,) = _session(zoo.small_cnn(seed=0)).run(None, {"input": x})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- reference classifier ----------------------------------------------------------------

MODEL = ROOT / "examples" / "fashion_resnet.onnx"
META = ROOT / "examples" / "fashion_resnet.json"
needs_fashion = pytest.mark.skipif(
    not datasets.fashion_mnist_available(),
    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)",
)


def test_fashion_resnet_metadata():
    meta = json.loads(META.read_text())
    for key in ("dataset", "test_accuracy", "epochs", "seed", "input", "torch_version", "train_seconds"):
        assert key in meta, key
    norm = meta["input"]["normalization"]
    assert norm["mean"] == datasets.FASHION_MNIST_MEAN and norm["std"] == datasets.FASHION_MNIST_STD
    assert meta["test_accuracy"] >= 0.90
    m = onnx.load(str(MODEL))
    onnx.checker.check_model(m)
    assert m.ir_version <= 10 and [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert _dims(m.graph.input[0]) == ["N", 1, 28, 28]
    assert [o.name for o in m.graph.output] == ["logits"] and _dims(m.graph.output[0]) == ["N", 10]


@needs_fashion
def test_fashion_resnet_accuracy_on_onnxruntime():
    x, y = datasets.load_fashion_mnist("test", limit=1000)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    (logits,) = _session(MODEL).run(["logits"], {"input": x})
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.85, f"accuracy {acc:.3f} on the first 1000 test images"


# ---- dataset readers -----------------------------------------------------------------------

def _write_idx(path: Path, arr: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_load_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8), 0x08)
    assert datasets.fashion_mnist_available(tmp_path)
    x, y = datasets.load_fashion_mnist("test", root=tmp_path)
    raw, _ = datasets.load_fashion_mnist_raw("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    expect = (raw.astype(np.float32) / 255 - datasets.FASHION_MNIST_MEAN) / datasets.FASHION_MNIST_STD
    np.testing.assert_allclose(x[:, 0], expect, rtol=1e-6, atol=1e-6)
    assert datasets.load_fashion_mnist("train", root=tmp_path)[0].shape[0] == 5
    with pytest.raises(ValueError):
        datasets.load_fashion_mnist("val", root=tmp_path)


def test_load_fashion_mnist_missing_files_is_clear(tmp_path):
    assert not datasets.fashion_mnist_available(tmp_path)
    with pytest.raises(datasets.DatasetNotFoundError, match="dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test", root=tmp_path)


def test_load_mnist_5k():
    try:
        datasets.mnist_5k_path()
    except datasets.DatasetNotFoundError as e:
        pytest.skip(str(e))
    x, y = datasets.load_mnist_5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert y.dtype == np.int64 and np.bincount(y, minlength=10).tolist() == [500] * 10
