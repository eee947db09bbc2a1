"""The official ONNX backend node tests for CNN ops, through import_onnx + build + run on the host.

Protocol (the issue's acceptance test): every single-node test in libonnx-testdata whose op type
is in ``CNN_OPS``, ``_expanded`` variants left out; all inputs other than the first become
initializers (constants, as exported CNNs have them). Each selected test is one pytest case;
excluded ones are skipped with the reason in ``EXCLUDED``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

NODE_DIR = Path("/usr/share/libonnx-testdata/data/node")

if not NODE_DIR.is_dir():
    pytest.skip(f"ONNX node tests not installed ({NODE_DIR}; Debian package libonnx-testdata)", allow_module_level=True)

CNN_OPS = frozenset(
    "Conv ConvTranspose BatchNormalization Relu PRelu LeakyRelu Clip Add Mul Sub Div Concat MaxPool "
    "AveragePool GlobalAveragePool GlobalMaxPool Gemm MatMul Reshape Flatten Transpose Softmax Sigmoid "
    "HardSwish HardSigmoid Resize Pad Slice Split QuantizeLinear DequantizeLinear QLinearConv "
    "QLinearMatMul ConvInteger MatMulInteger".split()
)

EXCLUDED = {
    "test_batchnorm_epsilon_training_mode": "training-mode BatchNormalization is out of scope (inference compiler)",
    "test_batchnorm_example_training_mode": "training-mode BatchNormalization is out of scope (inference compiler)",
}

# Float outputs: the tolerance of the ONNX backend test runner (rtol=1e-3, atol=1e-7) widened in
# atol to 1e-4 for float32 kernels whose summation order differs from the reference.
RTOL, ATOL = 1e-3, 1e-4


def select_tests(node_dir: Path = NODE_DIR) -> list[str]:
    """Names of the single-node tests of ``CNN_OPS`` (``_expanded`` variants left out)."""
    names = []
    for case in sorted(node_dir.glob("test_*")):
        if "_expanded" in case.name or not (case / "model.onnx").is_file():
            continue
        graph = onnx.load(str(case / "model.onnx"), load_external_data=False).graph
        if len(graph.node) == 1 and graph.node[0].op_type in CNN_OPS:
            names.append(case.name)
    return names


def _read_tensors(case: Path, prefix: str) -> list[np.ndarray]:
    files = sorted((case / "test_data_set_0").glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    tensors = []
    for f in files:
        t = onnx.TensorProto()
        t.ParseFromString(f.read_bytes())
        tensors.append(onnx.numpy_helper.to_array(t))
    return tensors


def load_case(name: str, node_dir: Path = NODE_DIR) -> tuple[onnx.ModelProto, list[np.ndarray], list[np.ndarray]]:
    """The test's model with every input but the first turned into an initializer, the first
    input's data and the expected outputs."""
    case = node_dir / name
    model = onnx.load(str(case / "model.onnx"))
    inputs, outputs = _read_tensors(case, "input"), _read_tensors(case, "output")
    graph_inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.append(graph_inputs[0])
    for vi, value in zip(graph_inputs[1:], inputs[1:]):
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, vi.name))
    model.ir_version = max(model.ir_version, 4)  # IR < 4 requires initializers to be listed as inputs
    return model, inputs[:1], outputs


def build_and_run(mod, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Build ``mod`` for the host target and run ``main`` on ``inputs``."""
    import tvm

    from hwcompress import build as B
    from hwcompress.targets import load_target

    spec = load_target("host")
    ex = B.build(B.schedule(B.legalize(mod, spec), spec), spec)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


def compare(name: str, got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Assert ``got`` matches ``expected``: floats within RTOL/ATOL, integers exactly."""
    assert len(got) == len(expected), f"{name}: {len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{name} output {i}: shape {g.shape}, expected {e.shape}"
        assert g.dtype == e.dtype, f"{name} output {i}: dtype {g.dtype}, expected {e.dtype}"
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL, err_msg=f"{name} output {i}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{name} output {i}")


def run_case(name: str, importer=None) -> None:
    """Import (with hwcompress's frontend unless ``importer`` is given), build, run and compare."""
    from hwcompress.frontend import import_onnx

    model, inputs, expected = load_case(name)
    mod = (importer or import_onnx)(model)
    compare(name, build_and_run(mod, inputs), expected)


@pytest.mark.parametrize("name", select_tests())
def test_onnx_node(name):
    if name in EXCLUDED:
        pytest.skip(EXCLUDED[name])
    run_case(name)
