"""Verification of a built module against ONNX Runtime on the original model (or, for a
lossy recipe, against the compressed graph built by TVM's default pipeline)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4


def random_inputs(inputs: Sequence[dict], seed: int = 0) -> list[np.ndarray]:
    """Deterministic random data for each input spec (``name``, ``shape``, ``dtype``)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in inputs:
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = max(info.min, -128), min(info.max, 127)
            arrays.append(rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            raise ValueError(f"no random data for dtype {dtype}")
    return arrays


def reference_outputs(proto, input_names: Sequence[str], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``proto`` under ONNX Runtime (basic optimizations only)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(input_names, arrays)))


def host_vm(mod):
    """``mod`` (a Relax module) built by TVM's own default pipeline for this host, as a
    ``VirtualMachine``: the reference for graphs that no longer match the ONNX model (pruned)
    and the runner of calibration modules. No hwc backend or schedule is involved."""
    import tvm
    from tvm import relax

    from .targets import load_target

    return relax.VirtualMachine(tvm.compile(mod, load_target("host").tvm_target()), tvm.cpu())


def graph_reference(mod):
    """``arrays -> outputs`` of ``mod`` run by ``host_vm``, built on the first call only."""
    import tvm

    vm = []

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not vm:
            vm.append(host_vm(mod))
        res = vm[0]["main"](*(tvm.runtime.tensor(np.asarray(a)) for a in arrays))
        return [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]

    return run


def compare(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray], rtol: float, atol: float) -> dict:
    """Max abs/rel error over all outputs and whether |out-ref| <= atol + rtol*|ref| holds."""
    if len(outputs) != len(references):
        return {"passed": False, "reason": f"{len(outputs)} outputs, reference has {len(references)}"}
    max_abs = max_rel = 0.0
    passed = True
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            return {"passed": False, "reason": f"output shape {out.shape}, reference {ref.shape}"}
        o, r = out.astype(np.float64), ref.astype(np.float64)
        err = np.abs(o - r)
        if err.size:
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float((err / np.maximum(np.abs(r), 1e-12)).max()))
            passed &= bool(np.all(err <= atol + rtol * np.abs(r)))
    return {"passed": passed, "max_abs_err": max_abs, "max_rel_err": max_rel, "rtol": rtol, "atol": atol}
