"""Shared fixtures (the builders live in model_builders.py)."""

from __future__ import annotations

import onnx
import pytest

from model_builders import tiny_cnn


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    """Tiny CNN with a dynamic batch dim named N."""
    return tiny_cnn()


@pytest.fixture
def tiny_static_model() -> onnx.ModelProto:
    return tiny_cnn(batch=1)


@pytest.fixture
def tiny_model_path(tmp_path, tiny_static_model):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_static_model, path)
    return path
