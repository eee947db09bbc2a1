"""Loading, checking and shape fixing of ONNX models."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from ..errors import ModelError, ShapeError

ModelLike = "str | os.PathLike | bytes | onnx.ModelProto"


def load_model(model) -> onnx.ModelProto:
    """Read ``model`` (a path, serialized bytes or a ``ModelProto``) and check it.

    Raises ``ModelError`` naming the file when it is missing, truncated or invalid.
    """
    if isinstance(model, onnx.ModelProto):
        proto, name = model, "model"
    elif isinstance(model, (bytes, bytearray)):
        proto, name = _parse(bytes(model), "model bytes"), "model bytes"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        name = str(path)
        if not path.is_file():
            raise ModelError(f"{name}: model file not found (or not a file)")
        proto = _parse(path.read_bytes(), name)
        if _has_external_data(proto):
            try:
                onnx.load_external_data_for_model(proto, str(path.parent))
            except Exception as e:  # onnx raises plain OSError/ValueError variants
                raise ModelError(f"{name}: cannot read external weights: {e}") from None
    else:
        raise ModelError(f"model must be a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{name}: invalid ONNX model: {first}") from None
    if not proto.graph.node:
        raise ModelError(f"{name}: the graph has no nodes")
    return proto


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError is not exported in a stable place
        raise ModelError(f"{name}: not a readable ONNX file (truncated or corrupt)") from None
    if not proto.graph.node and not proto.graph.input:
        raise ModelError(f"{name}: not a readable ONNX file (no graph)")
    return proto


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph (initializers listed as inputs excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def parse_shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` (the CLI's ``--input-shape``)."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
        if not shape or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise ShapeError(f"--input-shape {text!r}: expected NAME=D1,D2,... with positive integers") from None
    return name, shape


def fix_input_shapes(
    proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> onnx.ModelProto:
    """Return a copy of ``proto`` whose graph inputs all have static shapes.

    ``input_shapes`` maps input names to full shapes. Every dynamic dim must be fixed; a given
    shape must keep the model's static dims. Errors name the input and axis.
    """
    input_shapes = dict(input_shapes or {})
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inputs = {i.name: i for i in graph_inputs(fixed)}
    unknown = set(input_shapes) - set(inputs)
    if unknown:
        raise ShapeError(
            f"input shape given for unknown input(s) {', '.join(sorted(unknown))} "
            f"(model inputs: {', '.join(inputs)})"
        )
    for name, vi in inputs.items():
        ttype = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not ttype.HasField("shape"):
            if name not in input_shapes:
                raise ShapeError(f"input '{name}' has no shape in the model; pass --input-shape {name}=...")
            _set_shape(ttype, input_shapes[name])
            continue
        dims = ttype.shape.dim
        if name in input_shapes:
            given = tuple(int(d) for d in input_shapes[name])
            if len(given) != len(dims):
                raise ShapeError(f"input '{name}': model has rank {len(dims)}, given shape {list(given)} has rank {len(given)}")
            for axis, (dim, g) in enumerate(zip(dims, given)):
                if _is_static(dim) and dim.dim_value != g:
                    raise ShapeError(
                        f"input '{name}' axis {axis}: model fixes it to {dim.dim_value}, given {g}"
                    )
            _set_shape(ttype, given)
            continue
        for axis, dim in enumerate(dims):
            if not _is_static(dim):
                label = dim.dim_param or "?"
                raise ShapeError(
                    f"input '{name}' axis {axis} is dynamic ('{label}'); "
                    f"fix it with --input-shape {name}=... (input_shapes={{'{name}': (...)}})"
                )
    return fixed


def _is_static(dim: onnx.TensorShapeProto.Dimension) -> bool:
    # some exporters (Paddle) write dim_value -1 for a dynamic dim; 0 is a real zero-size dim
    return dim.HasField("dim_value") and dim.dim_value >= 0


def _set_shape(ttype: onnx.TypeProto.Tensor, shape: Sequence[int]) -> None:
    ttype.shape.Clear()
    for d in shape:
        ttype.shape.dim.add().dim_value = int(d)
