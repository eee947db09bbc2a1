"""Graph normalization before TVM's importer: shape inference and constant folding at the
fixed input shapes, done by ONNX Runtime's basic graph optimizations (which keep the graph in
standard ONNX ops), onnx shape inference so every value has a static shape, then the graph
rewrites (``rewrites/``) for what TVM's importer gets wrong, and shape inference again."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

# ONNX Runtime refuses models whose IR version is newer than it knows; nothing in the IR
# versions after this one changes how a plain inference graph is stored.
_ORT_MAX_IR_VERSION = 10


def freeze_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Treat initializers that are also listed as graph inputs (IR < 4 exports) as constants.

    ONNX lets a caller override such inputs, so ONNX Runtime would not fold them; a compiled
    model has its weights fixed, and ``graph_inputs`` already leaves them out.
    """
    inits = {t.name for t in proto.graph.initializer}
    if not any(i.name in inits for i in proto.graph.input):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [i for i in out.graph.input if i.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.ir_version = max(out.ir_version, 4)
    return out


# ONNX Runtime's basic-level rewrites that fold BatchNorm into the producer's weights
BN_FOLDING_OPTIMIZERS = ("ConvBNFusion", "MatMulBNFusion")


def fold_constants(proto: onnx.ModelProto, fold_bn: bool = True) -> onnx.ModelProto:
    """Constant-fold ``proto`` with ONNX Runtime's basic level (no contrib ops are introduced).

    ``fold_bn=False`` keeps BatchNorm nodes (ORT's basic level folds them into Conv/MatMul).

    Returns the input unchanged (with a logged reason) when ONNX Runtime cannot load it, so
    that models using ops ORT lacks still reach the importer's own error reporting.
    """
    import onnxruntime as ort

    candidate = onnx.ModelProto()
    candidate.CopyFrom(proto)
    candidate.ir_version = min(candidate.ir_version, _ORT_MAX_IR_VERSION)
    with tempfile.TemporaryDirectory(prefix="hwc-fold-") as tmp:
        out_path = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out_path)
        options.log_severity_level = 3
        try:
            disabled = [] if fold_bn else list(BN_FOLDING_OPTIMIZERS)
            ort.InferenceSession(
                candidate.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
            )
            folded = onnx.load(str(out_path))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            log.info("constant folding skipped (ONNX Runtime cannot load the model): %s", e)
            return proto
    # ORT may drop the opset of ai.onnx.ml etc. but never changes the default opset.
    return folded


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation (shape subgraphs become known)."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # inference is an aid, not a requirement
        log.info("onnx shape inference failed: %s", e)
        return proto


def normalize(proto: onnx.ModelProto, fold_bn: bool = True) -> onnx.ModelProto:
    """The normalization stage: fold, infer shapes, rewrite, infer shapes of the rewritten graph.

    ``fold_bn=False`` keeps BatchNorm nodes as they are (``hwc build --no-fold-bn``).
    """
    from .rewrites import apply_rewrites

    folded = infer_shapes(fold_constants(freeze_initializers(proto), fold_bn))
    rewritten = apply_rewrites(folded)
    return folded if rewritten is folded else infer_shapes(rewritten)
