"""Stub NPU: command stream format, numpy reference, C simulator runtime module.

``import hwcompress.codegen.npu`` stays light: TVM is imported only by ``npu_runtime_module``.
"""

from .cost import command_cycles, cycles
from .program import (
    Activation,
    Add,
    AvgPool2D,
    Conv2D,
    Dense,
    DType,
    MaxPool2D,
    Program,
    Tensor,
    activation_bounds,
    output_shape,
    validate,
)
from .reference import quantize_multiplier, requantize, rounding_rshift, run_reference
from .runtime import npu_c_source, npu_runtime_module
from .stream import decode, encode

__all__ = [
    "Activation", "Add", "AvgPool2D", "Conv2D", "DType", "Dense", "MaxPool2D", "Program", "Tensor",
    "activation_bounds", "command_cycles", "cycles", "decode", "encode", "npu_c_source",
    "npu_runtime_module", "output_shape", "quantize_multiplier", "requantize", "rounding_rshift", "run_reference",
    "validate",
]
