"""Fetch real exported ONNX models that PyPI packages ship, for tests and benchmarks.

Downloads the wheel only (no dependencies) and extracts the model files into
third_party/models/. Idempotent; run by ./setup.sh.

    python tools/fetch_models.py
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "third_party" / "wheels"
MODELS = ROOT / "third_party" / "models"

# (package==version, path inside the wheel, local name)
SHIPPED = [
    # PaddleOCR's text-direction classifier: a MobileNetV3 (hard-swish/sigmoid, SE blocks)
    ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr_mobilenetv3_cls.onnx"),
]


def fetch() -> list[Path]:
    MODELS.mkdir(parents=True, exist_ok=True)
    out = []
    for requirement, member, name in SHIPPED:
        target = MODELS / name
        out.append(target)
        if target.is_file():
            continue
        package, version = requirement.split("==")
        pattern = f"{package.replace('-', '_')}-{version}-*.whl"
        wheels = sorted(WHEELS.glob(pattern))
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(WHEELS)],
                check=True,
            )
            wheels = sorted(WHEELS.glob(pattern))
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read(member))
    return out


if __name__ == "__main__":
    for path in fetch():
        print(path)
