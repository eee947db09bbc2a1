"""Helpers shared by the frontend tests: hand-built graphs, ONNX Runtime reference runs, and
build + run on the host target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper


def _make_model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    """A model from ``onnx.helper`` parts; IR version 8 so that ONNX Runtime loads it."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], basic: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run_host(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """hwcompress import + build for the host target + run of ``main``."""
    import tvm

    from hwcompress import build as B
    from hwcompress.frontend import import_onnx
    from hwcompress.targets import load_target

    spec = load_target("host")
    ex = B.build(B.schedule(B.legalize(import_onnx(model), spec), spec), spec)
    out = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def run_ort():
    return _run_ort


@pytest.fixture
def run_host():
    return _run_host


@pytest.fixture
def rng():
    return np.random.default_rng(0)
