"""Integer kernels for models that arrive quantized: ``lower_qdq(mod) -> (mod, report)``.

A QDQ model (exported after QAT, or by ONNX Runtime's ``quantize_static``) and a QOperator
one (QLinearConv, QLinearMatMul, ConvInteger: ``frontend/rewrites/quant.py`` turns them into
QDQ form) import through TVM's ONNX importer as float convs and matmuls between
``quantize`` / ``dequantize`` ops::

    q  = R.quantize(x, s_x, zp_x, out_dtype="uint8")           # or any uint8 / int8 tensor
    xf = R.dequantize(q, s_x, zp_x)
    wf = R.dequantize(Wq, s_w, zp_w, axis=0)                  # Wq an int8 constant, s_w per O or one
    wf = R.permute_dims(wf)                                   # Gemm(transB=1): the importer's transpose
    y  = R.nn.conv2d(xf, wf)  or  R.matmul(xf, wf)
    y  = R.add(y, R.reshape(R.dequantize(B_int32, s_x * s_w)))   # bias, float

Each such conv / matmul becomes the integer form of the INT8 pass (``int8_graph``: uint8
data, int8 weight, int32 sums, dequantized with ``s_x * s_w[o]`` and the zero-point
correction ``zp_x * sum(Wq[o])``; a conv that pads reads ``q`` padded with ``zp_x``), emitted
by the same ``Int8Emitter``, so the backends' integer kernels apply. The conv reads ``q``
itself: the model's own quantize (fused into the previous layer's epilogue) feeds it.

* int8 activations are shifted to uint8 (``q + 128``, zero point ``zp_x + 128``, exact);
* the weight zero point is subtracted in numpy when ``Wq - zp_w`` fits int8 (int8 weights
  with zero point 0, uint8 ones with zero point 128), else the op stays float;
* the bias and every other op (activations, residual adds, pools, the ``quantize`` after the
  op) stay as imported, in float: elementwise, they fuse into the integer kernel's epilogue.

What stays float, with the reason in the report: grouped / depthwise convs (no integer
kernel, as in the INT8 pass), per-channel activation scales, weights that are float
constants (already dequantized) or whose scale axis is not the output channel, dynamic
shapes, reductions whose int32 sums could overflow. The rewrite re-emits ``main`` binding by
binding (``int8_graph.emit_main``), like the INT8 pass whose emitter it shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .int8_graph import (
    CONV2D,
    MATMUL,
    MAX_REDUCTION,
    Int8Emitter,
    Int8Layer,
    Site,
    conv_float_reason,
    emit_main,
    find_sites,
    module_with_main,
    static_shape,
)
from .observers import QParams

__all__ = ["QDQ_REPORT_ATTR", "LowerQdq", "QdqReport", "lower_qdq", "lower_qdq_pass", "qdq_report"]

QDQ_REPORT_ATTR = "hwc.qdq_report"  # IRModule attribute holding the JSON report
DEQUANTIZE, PERMUTE, RESHAPE = "relax.dequantize", "relax.permute_dims", "relax.reshape"


@dataclass(frozen=True)
class QdqLayer:
    """An imported quantized site and how it runs in integers: ``layer`` (uint8 input
    parameters, int8 weight in the site's weight layout, per-channel weight scales) reading
    ``source``, the 8-bit tensor the site's input dequantized (int8: ``shift`` by 128)."""

    layer: Int8Layer
    source: object  # relax.Var of uint8 / int8 dtype
    shift: bool


@dataclass(frozen=True)
class QdqReport:
    """Which imported conv / matmul ops became integer kernels (``layers``: name, op, input
    scale / zero point / dtype, weight scheme) and which stayed float (``float_fallback``:
    name and reason). ``found``: whether any conv / matmul read a ``dequantize`` at all."""

    layers: tuple = ()
    float_fallback: tuple = ()
    found: bool = False
    scheme: str = field(default="imported QDQ: uint8 activations x int8 weights -> int32", compare=False)

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "layers": list(self.layers), "float_fallback": list(self.float_fallback)}


# ---------------------------------------------------------------------------- analysis


def _bound_values(func) -> dict:
    from tvm import relax

    return {b.var: b.value for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}


def _op_call(expr, values, op: str):
    """The call of ``op`` that ``expr`` (a variable) is bound to, else None."""
    from tvm import relax

    value = values.get(expr) if isinstance(expr, relax.Var) else expr
    return value if isinstance(value, relax.Call) and getattr(value.op, "name", None) == op else None


def _const(expr) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _layout_chain(expr, values) -> tuple[list, object]:
    """The ``permute_dims`` / ``reshape`` calls ``expr`` goes back through (outermost first),
    and the expression they start from."""
    chain = []
    while True:
        call = _op_call(expr, values, PERMUTE)
        call = _op_call(expr, values, RESHAPE) if call is None else call
        if call is None:
            return chain, expr
        chain.append(call)
        expr = call.args[0]


def _reads_dequantize(site: Site, values) -> bool:
    """Whether the site's input or weight (through the importer's transposes) is dequantized."""
    weight = _layout_chain(site.call.args[1], values)[1]
    return any(_op_call(a, values, DEQUANTIZE) is not None for a in (site.call.args[0], weight))


def _input_params(expr, values, func_params) -> tuple[object, QParams, bool] | str:
    """``(source, uint8 QParams, shift)`` of an input ``dequantize(q, s, zp)``, or the reason
    it cannot feed an integer kernel."""
    from tvm import relax

    dq = _op_call(expr, values, DEQUANTIZE)
    if dq is None:
        return "input is not dequantized (float activation)"
    source = dq.args[0]
    dtype = str(source.ty.dtype)
    if dtype not in ("uint8", "int8"):
        return f"input dequantizes a {dtype} tensor (only uint8 / int8 activations)"
    if not (source in func_params or isinstance(values.get(source), relax.Call)):
        return "input's 8-bit tensor is no operator result or function input"
    scale, zero_point = _const(dq.args[1]), _const(dq.args[2])
    if scale is None or zero_point is None:
        return "input scale / zero point are not constants"
    if scale.size != 1 or zero_point.size != 1:
        return "per-channel activation scales (the integer kernels take one per tensor)"
    shift = dtype == "int8"
    zp = int(zero_point.reshape(())) + (128 if shift else 0)
    try:
        params = QParams(np.float32(scale.reshape(())), zp, "uint8")
    except ValueError as e:
        return f"input quantization: {e}"
    return source, params, shift


def _weight_params(expr, values) -> tuple[np.ndarray, np.ndarray, int | None] | str:
    """``(int8 weight, float32 scales, scale axis or None)`` of a weight ``dequantize(Wq, s,
    zp)`` followed by the importer's ``permute_dims`` / ``reshape``, the zero point taken out,
    or the reason it is no integer weight."""
    chain, expr = _layout_chain(expr, values)
    dq = _op_call(expr, values, DEQUANTIZE)
    if dq is None:
        if _const(expr) is not None:
            return "weight is a float constant, not dequantize(int8 constant)"
        return "weight is not a constant"
    w, scale, zero_point = (_const(a) for a in dq.args)
    if w is None or scale is None or zero_point is None:
        return "weight, its scale or zero point are not constants"
    if w.dtype not in (np.int8, np.uint8):
        return f"weight dequantizes a {w.dtype} constant (only int8 / uint8 weights)"
    axis = None if scale.size == 1 else int(dq.attrs.axis) % w.ndim
    if axis is not None and scale.shape != (w.shape[axis],):
        return f"weight scale of shape {scale.shape} along axis {axis} of a {w.shape} weight"
    if zero_point.size not in (1, scale.size):
        return f"weight zero point of shape {zero_point.shape} for scales of shape {scale.shape}"
    zp = zero_point.astype(np.int32)
    zp = zp.reshape([-1 if a == axis else 1 for a in range(w.ndim)]) if axis is not None and zp.size > 1 else zp.reshape(())
    wide = w.astype(np.int32) - zp
    if wide.size and (wide.min() < -128 or wide.max() > 127):
        return f"{w.dtype} weight minus its zero point does not fit int8"
    for call in reversed(chain):
        if call.op.name == PERMUTE:
            axes = list(range(wide.ndim))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            wide = wide.transpose(axes)
            axis = None if axis is None else axes.index(axis)
        else:
            if axis is not None:
                return "per-channel weight reshaped after dequantize"
            wide = wide.reshape([int(d) for d in call.ty.shape.values])
    return wide.astype(np.int8), scale.astype(np.float32).reshape(-1), axis


def plan_site(site: Site, values, func_params) -> QdqLayer | str:
    """How ``site`` runs in integers, or the reason it stays float."""
    call = site.call
    if str(call.ty.dtype) != "float32":
        return f"output dtype {call.ty.dtype} (only float32 ops are lowered)"
    if static_shape(call.args[0].ty) is None or static_shape(call.ty) is None:
        return "dynamic shape"
    if site.op == CONV2D:
        if (reason := conv_float_reason(call.attrs)) is not None:
            return reason
    elif len(call.args[0].ty.shape.values) < 2:
        return "matmul of a 1-D input"
    act = _input_params(call.args[0], values, func_params)
    if isinstance(act, str):
        return act
    weight = _weight_params(call.args[1], values)
    if isinstance(weight, str):
        return weight
    (source, params, shift), (w, scale, axis) = act, weight
    if site.op == MATMUL and w.ndim != 2:
        return "matmul whose weight is not [K, N]"
    out_axis = site.weight_out_axis
    if axis is not None and axis != out_axis:
        return f"weight scales along axis {axis}, not the output channels (axis {out_axis})"
    if w.size // w.shape[out_axis] > MAX_REDUCTION:
        return f"{w.size // w.shape[out_axis]} products per output: int32 sums could overflow"
    scales = scale if axis is not None else np.full(w.shape[out_axis], scale[0], np.float32)
    return QdqLayer(Int8Layer(site, params, w, scales), source, shift)


# ---------------------------------------------------------------------------- rewrite


class _SourceEmitter(Int8Emitter):
    """``Int8Emitter`` whose uint8 inputs are the model's own 8-bit tensors (int8 ones
    shifted by 128 once per tensor), not new ``quantize`` ops."""

    def __init__(self, bb, plans: dict, emitted: dict):
        super().__init__(bb)
        self.by_input = {p.layer.site.data: p for p in plans.values()}  # {dequantized input var: QdqLayer}
        self.emitted = emitted  # {original var: new var}, filled while main is re-emitted
        self._shifted = {}

    def quantized(self, key, x, qp):
        from tvm import relax

        plan = self.by_input[key]
        source = self.emitted.get(plan.source, plan.source)
        if not plan.shift:
            return source
        if plan.source not in self._shifted:
            wide = self.bb.emit(relax.op.astype(source, "int16"))
            shifted = relax.op.astype(relax.op.add(wide, relax.const(128, "int16")), "uint8")
            self._shifted[plan.source] = self.bb.emit(shifted, name_hint="q_u8")
        return self._shifted[plan.source]


def _emit(bb, func, plans: dict) -> list:
    emitted = {}
    emitter = _SourceEmitter(bb, plans, emitted)

    def call(var, _orig, value):
        plan = plans.get(var)
        new = bb.emit(value, name_hint=var.name) if plan is None else emitter.emit(plan.layer, value.args[0], var.name)
        emitted[var] = new
        return new

    return emit_main(bb, func, func.params, call)[0]


def lower_qdq(mod):
    """Integer kernels for the convs / matmuls of an imported quantized model.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as TVM's ONNX importer makes it (``main`` in dataflow blocks).

    Returns
    -------
    (tvm.IRModule, QdqReport)
        ``main`` with every conv2d / matmul whose input and weight are dequantized 8-bit
        tensors in the integer form of ``int8_graph``, the report also as the module
        attribute ``QDQ_REPORT_ATTR`` (``qdq_report``). A module where no conv / matmul reads
        a ``dequantize`` comes back unchanged, without the attribute.
    """
    from tvm import relax

    func = mod["main"]
    values = _bound_values(func)
    sites = [s for s in find_sites(func) if _reads_dequantize(s, values)]
    if not sites:
        return mod, QdqReport()
    params = set(func.params)
    plans, fallback, layers = {}, [], []
    for site in sites:
        plan = plan_site(site, values, params)
        if isinstance(plan, str):
            fallback.append({"name": site.name, "reason": plan})
            continue
        plans[site.var] = plan
        act = plan.layer.act
        layers.append({
            "name": site.name, "op": site.op, "input_scale": float(act.scale), "input_zero_point": int(act.zero_point),
            "input_dtype": "int8 (shifted to uint8)" if plan.shift else "uint8",
            "weight": "int8, " + ("per output channel" if len(set(plan.layer.weight_scale.tolist())) > 1 else "per tensor"),
        })  # fmt: skip
    report = QdqReport(tuple(layers), tuple(fallback), True)
    if plans:
        mod = module_with_main(mod, func, lambda bb: _emit(bb, func, plans), isinstance(func.body.body, relax.Tuple))
    return mod.with_attr(QDQ_REPORT_ATTR, json.dumps(report.as_dict())), report


def qdq_report(mod) -> dict | None:
    """The report ``lower_qdq`` attached to ``mod`` (None: no imported quantized op)."""
    attrs = mod.attrs
    if attrs is None or QDQ_REPORT_ATTR not in attrs:
        return None
    return json.loads(str(attrs[QDQ_REPORT_ATTR]))


class LowerQdq:
    """Module pass running ``lower_qdq`` (``lower_qdq_pass()`` builds it); no configuration."""

    def transform_module(self, mod, ctx):
        return lower_qdq(mod)[0]


def lower_qdq_pass():
    """``LowerQdq`` as a ``tvm.transform.Pass`` (for a ``Sequential``)."""
    import tvm

    return tvm.transform.module_pass(opt_level=0, name="hwc.LowerQdq")(LowerQdq)()
