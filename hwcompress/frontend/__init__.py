"""ONNX frontend: load and validate a model, fix its shapes, normalize it for TVM's
importer, and import it into a Relax IRModule."""

from .importer import import_onnx, prepare_onnx
from .load import load_model

__all__ = ["import_onnx", "load_model", "prepare_onnx"]
