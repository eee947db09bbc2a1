"""ONNX -> Relax import: the frontend's public entry points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from ..errors import BuildError, UnsupportedOpError
from .load import fix_input_shapes, graph_inputs, load_model
from .normalize import normalize

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


def prepare_onnx(model, input_shapes: Mapping[str, Sequence[int]] | None = None, fold_bn: bool = True) -> onnx.ModelProto:
    """Load, check, fix shapes and normalize ``model``; the graph TVM's importer receives.

    This graph is also the reference the built module is verified against. ``fold_bn=False``
    keeps BatchNorm nodes unfolded.
    """
    proto = load_model(model)
    proto = fix_input_shapes(proto, input_shapes)
    proto = normalize(proto, fold_bn)
    check_supported(proto)
    return proto


def check_supported(proto: onnx.ModelProto) -> None:
    """Raise one ``UnsupportedOpError`` listing every unsupported op type with its nodes.

    Ops that a normalization rewrite always replaces (QLinearConv, ...) count as supported.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from .rewrites import REWRITTEN_OPS

    known = set(_get_convert_map()) | {"Constant", "If"} | REWRITTEN_OPS
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(proto.graph.node):
        domain = node.domain or "ai.onnx"
        if domain not in ("ai.onnx", "") or node.op_type not in known:
            label = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
            missing.setdefault(label, []).append(node.name or f"#{i}")
    if missing:
        parts = [f"{op} ({_node_list(names)})" for op, names in sorted(missing.items())]
        raise UnsupportedOpError(f"unsupported ONNX op(s): {'; '.join(parts)}")


def _node_list(names: list[str], shown: int = 8) -> str:
    more = f", ... {len(names)} in all" if len(names) > shown else ""
    return f"node{'s' if len(names) > 1 else ''}: {', '.join(names[:shown])}{more}"


def io_signature(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Names, shapes and dtypes of the graph's inputs and outputs (shapes fixed)."""

    def describe(vi: onnx.ValueInfoProto) -> dict:
        ttype = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        return {"name": vi.name, "shape": shape, "dtype": _DTYPES.get(ttype.elem_type, str(ttype.elem_type))}

    return [describe(i) for i in graph_inputs(proto)], [describe(o) for o in proto.graph.output]


def import_onnx(model, input_shapes: Mapping[str, Sequence[int]] | None = None):
    """Import ``model`` (path, bytes or ModelProto) into a Relax ``tvm.IRModule``.

    Weights are bound as constants; the ``main`` function takes the graph inputs in order.
    """
    return import_prepared(prepare_onnx(model, input_shapes))


def import_prepared(proto: onnx.ModelProto):
    """Import a graph that ``prepare_onnx`` produced.

    Convs / matmuls of a quantized model (QDQ, or QOperator ops rewritten to QDQ) come out
    as integer kernels (``passes.quantize.qdq.lower_qdq``, its report as a module attribute).
    """
    from tvm.relax.frontend.onnx import from_onnx

    from ..passes.quantize.qdq import lower_qdq

    inputs, _ = io_signature(proto)
    shape_dict = {i["name"]: i["shape"] for i in inputs}
    dtype_dict = {i["name"]: i["dtype"] for i in inputs}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        mod = from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict, opset=opset, keep_params_in_input=False)
    except Exception as e:  # TVM raises many types here; wrap with the stage name
        msg = str(e).strip().splitlines()
        raise BuildError(f"import: TVM's ONNX importer failed: {msg[-1] if msg else type(e).__name__}") from e
    return lower_qdq(mod)[0]  # unchanged unless a conv / matmul reads a dequantize
