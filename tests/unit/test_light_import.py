import subprocess
import sys


def test_import_hwcompress_is_light():
    code = (
        "import sys, hwcompress\n"
        "heavy = [m for m in ('tvm', 'onnxruntime', 'xgboost', 'onnx', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import hwcompress pulled in: {out}"
