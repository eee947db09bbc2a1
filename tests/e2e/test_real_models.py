"""Real exported models (not built by us): they come from PyPI packages via tools/fetch_models.py."""

from pathlib import Path

import numpy as np
import pytest

import hwcompress

MODELS = Path(__file__).resolve().parents[2] / "third_party" / "models"


def _model(name: str) -> Path:
    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{path} missing: run `python tools/fetch_models.py` (./setup.sh does)")
    return path


def test_ppocr_mobilenetv3_classifier(tmp_path):
    # exported by Paddle: dynamic batch written as -1, H and W as '?', opset 11, Shape->Slice->Concat
    # reshape subgraphs that only become static once the input shape is fixed
    path = _model("ppocr_mobilenetv3_cls.onnx")
    artifact = hwcompress.compile(path, target="host", out=tmp_path / "cls", input_shapes={"x": (1, 3, 48, 192)})
    v = artifact.manifest["verification"]
    assert v["status"] == "passed" and v["cases"][0]["max_abs_err"] < 1e-4
    probs = artifact.run(np.random.default_rng(0).random((1, 3, 48, 192), dtype=np.float32))[0]
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
