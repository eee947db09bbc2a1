"""The INT8 graph rewrite: which ``conv2d`` / ``matmul`` bindings of ``main`` get integer
kernels (``find_sites``), and the Relax ops each one becomes (``Int8Emitter``).

A quantized site ``y = conv(x, W)`` (or ``x @ W``) is emitted as::

    xq  = R.quantize(x, s_x, zp_x, out_dtype="uint8")        # once per tensor x
    xq  = R.nn.pad(xq, ..., pad_value=zp_x)                   # only if zp_x != 0 and the conv pads
    acc = R.nn.conv2d(xq, Wq, padding=0 | as before, out_dtype="int32")
    y   = R.dequantize(acc, s_x * s_w[o], zp_x * sum(Wq[o]), axis=channel)

With ``x ~ s_x (xq - zp_x)`` and ``W[o] ~ s_w[o] Wq[o]`` (int8, symmetric per output channel):
``y[o] = sum x W[o] ~ s_x s_w[o] (sum xq Wq[o] - zp_x sum Wq[o])``, which is ``dequantize``'s
``scale * (acc - zero_point)`` with a per-channel int32 zero point ``zp_x * sum(Wq[o])``. The
sum runs over every tap of the window, so the correction is the same at every output pixel
only if padded taps hold ``xq = zp_x`` (the float 0): ``relax.nn.conv2d`` pads with 0, hence
the explicit ``pad`` with the zero point and an unpadded conv (the CPU backend's int8 kernel
copies its input with padding anyway, so this costs no extra pass over the data there). With
``zp_x = 0`` (ReLU outputs) the conv keeps its own padding. The original consumers (bias add,
ReLU, residual add) follow unchanged: they and the next layer's ``quantize`` are elementwise,
so ``FuseOps`` puts them into the int8 kernel's epilogue and uint8 tensors flow between layers.

The rewrite re-emits ``main`` binding by binding (``emit_main``) rather than through a dpl
pattern: one ``quantize`` must serve every site reading a tensor, and the SQNR report emits
the float graph and the int8 graph side by side into one function (``int8_calib.measure``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...analysis import static_shape
from .observers import QParams

__all__ = [
    "Int8Emitter", "Int8Layer", "Site", "conv_float_reason", "emit_int8_graph", "emit_main", "find_sites",
    "function_inputs", "module_with_main", "rewrite", "static_shape",
]  # fmt: skip

CONV2D, MATMUL = "relax.nn.conv2d", "relax.matmul"
MAX_REDUCTION = (2**31 - 1) // (255 * 128)  # products per output that surely fit an int32 sum


@dataclass(frozen=True)
class Site:
    """A ``conv2d`` / ``matmul`` binding of ``main``.

    ``name`` is the op and its index among ``main``'s bindings of that op in program order
    (``conv2d[3]``, the index Winograd's ``per_layer`` uses too); ``reason`` says why it stays
    float (None: it can be quantized).
    """

    var: object  # relax.Var bound to the call
    call: object  # relax.Call
    name: str
    reason: str | None

    @property
    def op(self) -> str:
        return self.call.op.name

    @property
    def data(self):
        """The float input (a variable of the original function)."""
        return self.call.args[0]

    def weight(self) -> np.ndarray:
        return self.call.args[1].value.numpy()

    @property
    def weight_out_axis(self) -> int:
        """Axis of the weight holding the output channels."""
        return str(self.call.attrs.kernel_layout).index("O") if self.op == CONV2D else 1

    @property
    def out_channel_axis(self) -> int:
        """Axis of the output holding the channels."""
        if self.op == CONV2D:
            attrs = self.call.attrs
            return str(attrs.out_layout or attrs.data_layout).index("C")
        return len(self.call.ty.shape.values) - 1


def find_sites(func, depthwise: bool = False) -> list[Site]:
    """Every ``conv2d`` / ``matmul`` binding of ``func``, in program order, each with the
    reason it cannot be quantized (None when it can). ``depthwise``: depthwise convs are
    quantized too (only for an NPU that runs them: the host has no int8 depthwise kernel)."""
    from tvm import relax

    sites, counts = [], {CONV2D: 0, MATMUL: 0}
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(binding, relax.VarBinding) or not isinstance(call, relax.Call):
                continue
            op = getattr(call.op, "name", None)
            if op not in counts:
                continue
            name = f"{op.rsplit('.', 1)[1]}[{counts[op]}]"
            counts[op] += 1
            sites.append(Site(binding.var, call, name, _float_reason(call, depthwise)))
    return sites


def _float_reason(call, depthwise: bool = False) -> str | None:
    import tvm

    data, weight = call.args[0], call.args[1]
    if not isinstance(weight, tvm.ir.expr.Constant):
        return "weight is not a constant"
    dtypes = {str(data.ty.dtype), str(weight.ty.dtype), str(call.ty.dtype)}
    if dtypes != {"float32"}:
        return f"dtype {'/'.join(sorted(dtypes))}: only float32 ops are quantized"
    if static_shape(data.ty) is None or static_shape(call.ty) is None:
        return "dynamic shape"
    if call.op.name == CONV2D:
        if (reason := conv_float_reason(call.attrs)) is not None and not (depthwise and _is_depthwise(call)):
            return reason
    elif len(weight.ty.shape.values) != 2 or len(data.ty.shape.values) < 2:
        return "matmul that is not data [..., K] x weight [K, N]"
    shape = static_shape(weight.ty)
    out_axis = str(call.attrs.kernel_layout).index("O") if call.op.name == CONV2D else 1
    if int(np.prod(shape)) // shape[out_axis] > MAX_REDUCTION:
        return f"{int(np.prod(shape)) // shape[out_axis]} products per output: int32 sums could overflow"
    return None


def conv_float_reason(attrs) -> str | None:
    """Why a ``conv2d`` with these attributes has no integer kernel (None: it has one)."""
    if int(attrs.groups) != 1:
        return f"groups={int(attrs.groups)} (grouped / depthwise conv: no integer kernel)"
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    if sorted(layouts[0]) != sorted("NCHW") or sorted(layouts[1]) != sorted("OIHW") or layouts[2] != layouts[0]:
        return f"layout {'/'.join(layouts)}: only plain 2D layouts (NCHW, NHWC) have integer kernels"
    return None


def _is_depthwise(call) -> bool:
    """One input channel per group (a channel multiplier is allowed), plain 2D layouts."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    if sorted(layouts[0]) != sorted("NCHW") or sorted(layouts[1]) != sorted("OIHW") or layouts[2] != layouts[0]:
        return False
    channels = int(call.args[0].ty.shape.values[layouts[0].index("C")])
    per_group = int(call.args[1].ty.shape.values[layouts[1].index("I")])
    return int(attrs.groups) == channels and per_group == 1


def function_inputs(func) -> list[tuple[str, list[int], str]]:
    """``(name, static shape, dtype)`` of each parameter: what ``data.read_batches`` takes."""
    from ...errors import RecipeError

    inputs = []
    for p in func.params:
        shape = static_shape(p.ty)
        if shape is None:
            raise RecipeError(f"int8: input {p.name!r} has no static shape; fix it (--input-shape) to calibrate")
        inputs.append((p.name, list(shape), str(p.ty.dtype)))
    return inputs


@dataclass(frozen=True)
class Int8Layer:
    """How one site runs in int8: uint8 input parameters and the int8 weight (the site's
    weight layout) with one float32 scale per output channel."""

    site: Site
    act: QParams
    weight: np.ndarray
    weight_scale: np.ndarray

    def multiplier(self) -> np.ndarray:
        """``s_x * s_w[o]``: the scale of the int32 accumulator, float32."""
        return (np.float64(self.act.scale) * self.weight_scale.astype(np.float64)).astype(np.float32)

    def correction(self) -> np.ndarray:
        """``zp_x * sum(Wq[o])``: the accumulator's zero point per output channel, int32."""
        w = self.weight.astype(np.int64)
        axis = self.site.weight_out_axis
        sums = w.sum(axis=tuple(a for a in range(w.ndim) if a != axis))
        return (int(self.act.zero_point) * sums).astype(np.int32)


class Int8Emitter:
    """Emits int8 sites into a ``BlockBuilder``'s current dataflow block. Each float tensor
    is quantized once, however many sites read it (an emitter per emitted graph)."""

    def __init__(self, bb):
        self.bb = bb
        self._quantized = {}

    def quantized(self, key, x, qp: QParams):
        """``x`` as uint8 (``key``: the original variable, shared by the sites reading it)."""
        from tvm import relax

        if key not in self._quantized:
            scale, zero_point = relax.const(np.float32(qp.scale)), relax.const(np.uint8(qp.zero_point))
            q = self.bb.emit(relax.op.quantize(x, scale, zero_point, out_dtype="uint8"), name_hint="q")
            self._quantized[key] = (q, float(qp.scale), int(qp.zero_point))
        q, scale, zero_point = self._quantized[key]
        # a quantization point and the sites reading it share one uint8 tensor: same parameters
        assert (scale, zero_point) == (float(qp.scale), int(qp.zero_point)), f"two quantizations of {key}"
        return q

    def point(self, key, x, qp: QParams, name: str):
        """An int8 quantization point on the float tensor ``x``: ``dequantize(quantize(x))``.
        Sites reading ``key`` later take the uint8 tensor itself (``quantized``)."""
        from tvm import relax

        q = self.quantized(key, x, qp)
        scale, zero_point = relax.const(np.float32(qp.scale)), relax.const(np.uint8(qp.zero_point))
        return self.bb.emit(relax.op.dequantize(q, scale, zero_point, out_dtype="float32"), name_hint=name)

    def emit(self, layer: Int8Layer, x, name: str = "dq"):
        """The int8 version of ``layer.site`` on the float input ``x``: a float32 result of the
        original shape, the accumulator dequantized (bias and activation not included)."""
        from tvm import relax

        bb, site = self.bb, layer.site
        q = self.quantized(site.data, x, layer.act)
        w = relax.const(np.ascontiguousarray(layer.weight), "int8")
        if site.op == CONV2D:
            acc = self._conv(site.call.attrs, q, w, int(layer.act.zero_point))
        else:
            acc = self._matmul(q, w, site)
        scale, zero_point = relax.const(layer.multiplier()), relax.const(layer.correction())
        return bb.emit(relax.op.dequantize(acc, scale, zero_point, axis=site.out_channel_axis, out_dtype="float32"), name_hint=name)

    def _conv(self, attrs, q, w, zero_point: int):
        from tvm import relax

        padding = [int(p) for p in attrs.padding]
        padding = padding * 2 if len(padding) == 2 else padding  # (top, left, bottom, right)
        layout = str(attrs.data_layout)
        if zero_point and any(padding):
            width = [0] * (2 * len(layout))
            h, w_axis = layout.index("H"), layout.index("W")
            width[2 * h : 2 * h + 2] = padding[0], padding[2]
            width[2 * w_axis : 2 * w_axis + 2] = padding[1], padding[3]
            q = self.bb.emit(relax.op.nn.pad(q, width, pad_value=float(zero_point)), name_hint="q_pad")
            padding = [0, 0, 0, 0]
        conv = relax.op.nn.conv2d(
            q, w, strides=attrs.strides, padding=padding, dilation=attrs.dilation, groups=int(attrs.groups),
            data_layout=layout, kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout, out_dtype="int32",
        )  # fmt: skip
        return self.bb.emit(conv, name_hint="acc")

    def _matmul(self, q, w, site: Site):
        from tvm import relax

        shape = [int(d) for d in site.data.ty.shape.values]
        if len(shape) == 2:
            return self.bb.emit(relax.op.matmul(q, w, out_dtype="int32"), name_hint="acc")
        # the integer kernel takes [M, K]: fold the leading axes into M and back
        flat = self.bb.emit(relax.op.reshape(q, [int(np.prod(shape[:-1])), shape[-1]]))
        acc = self.bb.emit(relax.op.matmul(flat, w, out_dtype="int32"), name_hint="acc")
        return self.bb.emit(relax.op.reshape(acc, [*shape[:-1], int(w.ty.shape.values[1])]))


def emit_main(bb, func, args, emit_call=None):
    """Emit ``func``'s bindings into ``bb``'s current dataflow block with ``args`` for its
    parameters; returns the flat list of result expressions and ``{original var: new var}``.

    ``emit_call(var, original call, call with mapped arguments) -> expr`` emits each call
    binding (default: the mapped call as it is). Only functions whose bindings all sit in
    dataflow blocks (as the ONNX importer makes them) can be re-emitted this way.
    """
    from tvm import relax

    from ...errors import RecipeError

    vmap = dict(zip(func.params, args))
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            raise RecipeError("int8: main has bindings outside a dataflow block; only imported graphs can be quantized")
        for binding in block.bindings:
            value = _remap(vmap, binding.value)
            if isinstance(binding, relax.MatchCast):
                vmap[binding.var] = bb.match_cast(value, binding.ty)
            elif isinstance(value, relax.Call) and emit_call is not None:
                vmap[binding.var] = emit_call(binding.var, binding.value, value)
            else:
                vmap[binding.var] = bb.emit(value, name_hint=binding.var.name)
    result = _remap(vmap, func.body.body)
    return (list(result.fields) if isinstance(result, relax.Tuple) else [result]), vmap


def _remap(vmap, expr):
    from tvm import relax

    if isinstance(expr, relax.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_remap(vmap, f) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_remap(vmap, expr.tuple_value), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_remap(vmap, a) for a in expr.args], expr.attrs, expr.ty_args)
    return expr


def module_with_main(mod, func, emit_outputs, as_tuple: bool | None = None):
    """``mod`` with a new ``main`` of ``func``'s parameters and attributes, whose one dataflow
    block ``emit_outputs(bb) -> [expr, ...]`` emits; one result is returned bare unless
    ``as_tuple`` (default: only when there are several)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    attrs = dict(func.attrs) if func.attrs else None
    with bb.function("main", list(func.params), attrs=attrs, private=False):
        with bb.dataflow():
            outs = [bb.emit_output(o) for o in emit_outputs(bb)]
        tuple_out = len(outs) != 1 if as_tuple is None else as_tuple
        bb.emit_func_output(relax.Tuple(outs) if tuple_out else outs[0])
    new = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    new["main"] = relax.analysis.remove_all_unused(bb.get()["main"])
    return new


def emit_int8_graph(bb, func, layers: dict, taps: list | None = None, points: dict | None = None) -> list:
    """Emit ``func`` with the sites of ``layers`` (``{site var: Int8Layer}``) in int8 and
    everything else as it was; returns its results. Each int8 site's dequantized output is
    appended to ``taps`` (when given), in program order. ``points`` (``{var: QParams}``, see
    ``int8_points.residual_points``): float tensors that pass through uint8 (``Int8Emitter.point``)."""
    emitter = Int8Emitter(bb)
    points = points or {}

    def call(var, _orig, value):
        layer = layers.get(var)
        if layer is None:
            y = bb.emit(value, name_hint=var.name)
        else:
            y = emitter.emit(layer, value.args[0], var.name)
            if taps is not None:
                taps.append(y)
        if var in points:
            y = emitter.point(var, y, points[var], var.name + "_dq")
        return y

    return emit_main(bb, func, func.params, call)[0]


def rewrite(mod, layers: list[Int8Layer], points: dict | None = None):
    """``mod`` with ``main``'s sites of ``layers`` running in int8 and the tensors of
    ``points`` (``{var: QParams}``) passed through uint8."""
    from tvm import relax

    func = mod["main"]
    by_var = {layer.site.var: layer for layer in layers}
    return module_with_main(mod, func, lambda bb: emit_int8_graph(bb, func, by_var, points=points),
                            isinstance(func.body.body, relax.Tuple))
