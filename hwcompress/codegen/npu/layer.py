"""One NPU layer read off the int8 graph: the chain of Relax calls a composite function holds,
checked against the NPU's hard constraints and turned into plain numbers (``NpuLayer``).

The chain is what ``passes/quantize`` emits for one quantized conv / matmul plus what follows
it up to the next ``quantize``::

    [pad(q, zp)] -> conv2d(q, W int8, NHWC/OHWI) | [permute_dims] [reshape] matmul(q, W int8)
      -> dequantize(acc, s_x * s_w, zp_x * sum W) -> [add bias] -> [relu | relu6]
      -> [max_pool2d | avg_pool2d] -> quantize(s_y, zp_y, uint8)

A residual add is a chain too, between two int8 quantization points the INT8 pass put there
for an NPU with ``add`` (``int8_points.residual_points``)::

    dequantize(qa, s_a, zp_a), dequantize(qb, s_b, zp_b) -> add -> [relu | relu6]
      -> quantize(s_y, zp_y, uint8)

(``read_add``: one ADD command).

``read_layer`` / ``read_add`` are shared by the partitioner's pattern check, the codegen and
the offload report, so the three cannot disagree on what the NPU runs. They raise
``NotOnNpu`` with the reason an op stays on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .program import Activation

RELU6_MAX = 6.0


class NotOnNpu(Exception):
    """A chain the NPU cannot run; the message is the reason shown in the offload report."""


@dataclass(frozen=True)
class Pool:
    max: bool
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    count_include_pad: bool


@dataclass(frozen=True)
class NpuLayer:
    """Everything the codegen needs for one conv / dense command (+ a fused pool).

    ``weight`` is in the NPU's layout (conv OHWI, dense ``[C_out, C_in]`` with the columns in
    NHWC flatten order); zero points are uint8 (the codegen shifts them by -128);
    ``input_zero_point`` is None when the graph does not determine it (no padding and every
    weight channel sums to zero: the result does not depend on it).
    """

    kind: str  # conv2d | depthwise_conv2d | dense
    weight: np.ndarray
    acc_scale: np.ndarray  # float64 [C_out]: s_x * s_w[o], the dequantize scale
    bias: np.ndarray | None  # float64 [C_out]
    input_zero_point: int | None
    out_scale: float
    out_zero_point: int
    activation: Activation
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pool: Pool | None = None

    @property
    def ops(self) -> list[str]:
        """The NPU op types the layer holds (for the offload report)."""
        extra = [] if self.activation is Activation.NONE else [self.activation.value]
        return [self.kind, *extra] + ([] if self.pool is None else ["max_pool2d" if self.pool.max else "avg_pool2d"])


@dataclass(frozen=True)
class NpuAdd:
    """One ADD command: two uint8 inputs (scale, zero point each) into one uint8 output."""

    input_scales: tuple[float, float]
    input_zero_points: tuple[int, int]
    out_scale: float
    out_zero_point: int
    activation: Activation
    kind: str = "add"

    @property
    def ops(self) -> list[str]:
        return ["add"] + ([] if self.activation is Activation.NONE else [self.activation.value])


def op_name(call) -> str:
    return getattr(call.op, "name", "") or ""


def npu_op_type(call) -> str | None:
    """The NPU op type a Relax call corresponds to (None: glue such as quantize, reshape)."""
    op = op_name(call)
    if op == "relax.nn.conv2d":
        groups, weight = int(call.attrs.groups), _shape(call.args[1])
        return "depthwise_conv2d" if groups > 1 and weight is not None and _in_per_group(call) == 1 else "conv2d"
    simple = {"relax.matmul": "dense", "relax.nn.relu": "relu", "relax.nn.max_pool2d": "max_pool2d",
              "relax.nn.avg_pool2d": "avg_pool2d"}
    if op in simple:
        return simple[op]
    if op == "relax.clip":
        return "relu6" if _clip_bounds(call) == (0.0, RELU6_MAX) else "clip"
    if op == "relax.add":
        return None if any(_is_const(a) for a in call.args) else "add"  # a bias add is glue
    if op in ("relax.quantize", "relax.dequantize", "relax.nn.pad", "relax.reshape", "relax.permute_dims",
              "relax.astype"):
        return None
    return op.removeprefix("relax.") or None


def read_layer(calls, npu) -> NpuLayer:
    """``calls`` (the chain, input side first) as an ``NpuLayer`` for ``npu`` (a ``targets.Npu``).

    Raises ``NotOnNpu`` naming the first hard constraint the chain breaks.
    """
    ops = [op_name(c) for c in calls]
    if not ops or ops[-1] != "relax.quantize":
        raise NotOnNpu("float result: no quantize follows it, and the NPU only writes int8")
    i = 0
    pad_call = flatten = None
    if ops[i] == "relax.nn.pad":
        pad_call, i = calls[i], i + 1
    if ops[i] in ("relax.permute_dims", "relax.reshape"):
        flatten = []
        while ops[i] in ("relax.permute_dims", "relax.reshape"):
            flatten.append(calls[i])
            i += 1
    main = calls[i]
    if ops[i] not in ("relax.nn.conv2d", "relax.matmul"):
        raise NotOnNpu(f"{ops[i]} does not start an NPU layer")
    kind = npu_op_type(main)
    _need(kind, npu)
    if ops[i + 1] != "relax.dequantize":
        raise NotOnNpu(f"{kind} is not int8 (no dequantize of an int32 accumulator follows it)")
    dq = calls[i + 1]
    i += 2
    bias = None
    if ops[i] == "relax.add" and any(_is_const(a) for a in calls[i].args):
        bias, i = calls[i], i + 1
    act = Activation.NONE
    if ops[i] in ("relax.nn.relu", "relax.clip"):
        name = npu_op_type(calls[i])
        if name not in ("relu", "relu6"):
            raise NotOnNpu(f"clip{_clip_bounds(calls[i])}: only relu and relu6 clamps exist on the NPU")
        _need(name, npu)
        act, i = Activation(name), i + 1
    pool = None
    if ops[i] in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
        _need(npu_op_type(calls[i]), npu)
        pool, i = _pool(calls[i]), i + 1
    if ops[i] == "relax.add":
        raise NotOnNpu("a float residual add follows it: no int8 quantization point before the add")
    if i != len(calls) - 1:
        raise NotOnNpu(f"{ops[i]} between the accumulator and the next quantize has no NPU form")
    out_scale, out_zp = _quantize_params(calls[-1])
    w = _const(main.args[1])
    if str(main.args[0].ty.dtype) != "uint8" or w.dtype != np.int8 or str(main.ty.dtype) != "int32":
        raise NotOnNpu("only uint8 x int8 -> int32 layers (hwc's int8 pass) run on the NPU")
    common = _dequantize(dq, main, kind, w)
    acc_scale, correction = common
    b = None
    if bias is not None:
        b = _per_channel(_const(bias.args[1] if _is_const(bias.args[1]) else bias.args[0]), len(acc_scale), "bias")
    layer = dict(acc_scale=acc_scale, bias=b, out_scale=out_scale, out_zero_point=out_zp, activation=act, pool=pool)
    if kind == "dense":
        weight = _dense_weight(main, w, flatten)
        icm, ocm = npu.in_channel_multiple, npu.out_channel_multiple
        if npu.strict_channels and (weight.shape[1] % icm or weight.shape[0] % ocm):
            raise NotOnNpu(f"dense {weight.shape[1]} -> {weight.shape[0]} is not a multiple of {icm} (in) / "
                           f"{ocm} (out), which this NPU requires ([npu].strict_channels)")
        zp = _zero_point(correction, weight.sum(axis=1), None)
        return NpuLayer(kind, weight, input_zero_point=zp, **layer)
    return _conv_layer(main, w, pad_call, correction, kind, npu, layer)


def read_add(calls, npu) -> NpuAdd:
    """``calls`` = ``[dequantize a, dequantize b, add, (relu | clip), quantize]`` as an ``NpuAdd``.

    Raises ``NotOnNpu`` naming the first hard constraint the chain breaks.
    """
    ops = [op_name(c) for c in calls]
    if ops[:3] != ["relax.dequantize", "relax.dequantize", "relax.add"] or ops[-1] != "relax.quantize":
        raise NotOnNpu("float residual add: its inputs have no int8 quantization point in the graph")
    _need("add", npu)
    add = calls[2]
    shapes = [_shape(x) for x in (*add.args, add)]
    if None in shapes or any(x != shapes[-1] for x in shapes):
        raise NotOnNpu(f"add of shapes {shapes[0]} and {shapes[1]}: the NPU's ADD does not broadcast")
    scales, zps = [], []
    for dq in calls[:2]:
        if str(dq.args[0].ty.dtype) != "uint8":
            raise NotOnNpu("an add input is not a uint8 tensor")
        scale, zp = _const(dq.args[1]), _const(dq.args[2])
        if scale.size != 1 or zp.size != 1:
            raise NotOnNpu("per-channel add input quantization has no NPU form (per tensor only)")
        scales.append(float(scale.reshape(())))
        zps.append(int(zp.reshape(())))
    act = Activation.NONE
    if len(calls) == 5:
        name = npu_op_type(calls[3])
        if name not in ("relu", "relu6"):
            raise NotOnNpu(f"{ops[3]} after the add: only relu and relu6 clamps exist on the NPU")
        _need(name, npu)
        act = Activation(name)
    elif len(calls) != 4:
        raise NotOnNpu(f"{ops[3]} between the add and the next quantize has no NPU form")
    out_scale, out_zp = _quantize_params(calls[-1])
    return NpuAdd(tuple(scales), tuple(zps), out_scale, out_zp, act)


def _conv_layer(call, w, pad_call, correction, kind, npu, layer) -> NpuLayer:
    a = call.attrs
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    if layouts != ("NHWC", "OHWI", "NHWC"):
        raise NotOnNpu(f"layout {'/'.join(layouts)}: the NPU reads NHWC / OHWI ([hardware].conv_layout = \"NHWC\")")
    pad = [int(p) for p in a.padding]
    pad = pad * 2 if len(pad) == 2 else pad
    pad_zp = None
    if pad_call is not None:
        width = [int(p) for p in pad_call.attrs.pad_width]
        if any(width[:2] + width[6:]) or str(pad_call.attrs.pad_mode) != "constant":
            raise NotOnNpu("pad of the batch / channel axes (or not constant) has no NPU form")
        pad = [pad[0] + width[2], pad[1] + width[4], pad[2] + width[3], pad[3] + width[5]]
        pad_zp = float(pad_call.attrs.pad_value)
        if pad_zp != round(pad_zp) or not 0 <= pad_zp <= 255:
            raise NotOnNpu(f"pad value {pad_zp} is no uint8 zero point")
        pad_zp = int(pad_zp)
    groups = int(a.groups)
    c_in = int(call.args[0].ty.shape.values[3])
    c_out, ci_per_group = w.shape[0], w.shape[3]
    if npu.strict_channels:  # hard only where the target says so; else idle lanes (cost model)
        icm, ocm = npu.in_channel_multiple, npu.out_channel_multiple
        bad = c_out % ocm if kind == "depthwise_conv2d" else ci_per_group % icm or (c_out // groups) % ocm
        if bad:
            raise NotOnNpu(f"channels {c_in} -> {c_out} are not multiples of {icm} (in) / {ocm} (out), "
                           "which this NPU requires ([npu].strict_channels)")
    sums = w.astype(np.int64).sum(axis=(1, 2, 3))
    zp = _zero_point(correction, sums, pad_zp)
    if zp is None and any(pad):
        zp = 0  # conv2d's own padding is 0: the uint8 zero point must then be 0
    return NpuLayer(kind, np.ascontiguousarray(w), input_zero_point=zp, strides=tuple(int(s) for s in a.strides),
                    padding=tuple(pad), dilation=tuple(int(d) for d in a.dilation), groups=groups, **layer)


def _dense_weight(call, w, flatten) -> np.ndarray:
    """``[K, N]`` matmul weight as the NPU's ``[C_out, C_in]``, columns in the order the NPU
    reads the (NHWC) input: an NCHW flatten (``permute_dims [0, 3, 1, 2]`` then reshape)
    permutes them."""
    if w.ndim != 2 or len(call.args[0].ty.shape.values) != 2:
        raise NotOnNpu("matmul that is not [N, K] x [K, N] has no NPU form")
    wt = w.T
    if not flatten:
        return np.ascontiguousarray(wt)
    src = flatten[0].args[0]
    shape = _shape(src)
    if shape is None or len(shape) != 4:
        raise NotOnNpu("a dense layer's input reshape must flatten an NHWC tensor")
    n, h, wd, c = shape
    names = [op_name(f) for f in flatten]
    if names == ["relax.reshape"]:
        return np.ascontiguousarray(wt)  # NHWC flatten: the NPU's own order
    if names == ["relax.permute_dims", "relax.reshape"] and [int(x) for x in flatten[0].attrs.axes] == [0, 3, 1, 2]:
        return np.ascontiguousarray(wt.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(wt.shape[0], -1))
    raise NotOnNpu(f"layout change {'/'.join(names)} before a dense layer has no NPU form")


def _dequantize(dq, main, kind, w):
    out_axis = len(main.ty.shape.values) - 1
    if int(dq.attrs.axis) not in (out_axis, -1) or not (_is_const(dq.args[1]) and _is_const(dq.args[2])):
        raise NotOnNpu("dequantize must be per output channel with constant parameters")
    c_out = w.shape[0] if kind != "dense" else w.shape[1]
    scale = _per_channel(_const(dq.args[1]), c_out, "scale").astype(np.float64)
    corr = _per_channel(_const(dq.args[2]), c_out, "zero point").astype(np.int64)
    return scale, corr


def _zero_point(correction, sums, pad_zp):
    """The uint8 input zero point ``zp_x`` from ``correction = zp_x * sum(W[o])``."""
    nz = sums != 0
    zp = pad_zp
    if nz.any():
        cand = correction[nz] // sums[nz]
        if np.any(cand * sums[nz] != correction[nz]) or np.any(cand != cand[0]):
            raise NotOnNpu("dequantize zero point is not zp_x * sum(W): not hwc's int8 scheme")
        if pad_zp is not None and int(cand[0]) != pad_zp:
            raise NotOnNpu("pad value and input zero point differ")
        zp = int(cand[0])
    elif np.any(correction != 0):
        raise NotOnNpu("dequantize zero point is not zp_x * sum(W): not hwc's int8 scheme")
    if zp is not None and not 0 <= zp <= 255:
        raise NotOnNpu(f"input zero point {zp} is no uint8 zero point")
    return zp


def _pool(call) -> Pool:
    a = call.attrs
    if str(a.layout) != "NHWC" or str(a.out_layout or a.layout) != "NHWC":
        raise NotOnNpu(f"pool layout {a.layout}: the NPU pools NHWC")
    if any(int(d) != 1 for d in a.dilation) or bool(a.ceil_mode):
        raise NotOnNpu("pool with dilation or ceil_mode has no NPU form")
    k = tuple(int(x) for x in a.pool_size)
    p = [int(x) for x in a.padding]
    p = p * 2 if len(p) == 2 else p
    if max(p[0], p[2]) >= k[0] or max(p[1], p[3]) >= k[1]:
        raise NotOnNpu("pool padding must be smaller than the kernel")
    is_max = op_name(call) == "relax.nn.max_pool2d"
    return Pool(is_max, k, tuple(int(s) for s in a.strides), tuple(p), bool(getattr(a, "count_include_pad", False)))


def _quantize_params(call) -> tuple[float, int]:
    if str(call.attrs.out_dtype) != "uint8" or not (_is_const(call.args[1]) and _is_const(call.args[2])):
        raise NotOnNpu("the output quantize must be uint8 with constant parameters")
    scale, zp = _const(call.args[1]), _const(call.args[2])
    if scale.size != 1 or zp.size != 1:
        raise NotOnNpu("per-channel output quantization has no NPU form (per tensor only)")
    return float(scale.reshape(())), int(zp.reshape(()))


def _need(op: str, npu) -> None:
    if op not in npu.supported_ops:
        raise NotOnNpu(f"{op} is not in the target's [npu].supported_ops")


def _per_channel(x: np.ndarray, channels: int, what: str) -> np.ndarray:
    if x.size == 1:
        return np.full(channels, x.reshape(-1)[0])
    if x.size != channels or x.shape[-1] != channels:
        raise NotOnNpu(f"{what} with shape {x.shape} is not per output channel ({channels})")
    return x.reshape(-1)


def _clip_bounds(call) -> tuple[float, float]:
    return tuple(float(a.value) for a in call.args[1:3])


def _in_per_group(call) -> int:
    return int(call.args[1].ty.shape.values[str(call.attrs.kernel_layout).index("I")])


def _shape(expr):
    try:
        return [int(d) for d in expr.ty.shape.values]
    except (AttributeError, TypeError, ValueError):
        return None


def _is_const(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant)


def _const(expr) -> np.ndarray:
    if not _is_const(expr):
        raise NotOnNpu("a weight / scale / bias is not a constant")
    return expr.value.numpy()
