"""NPU codegen: each partitioned NPU function -> a ``Program`` -> the simulator runtime module.

Registered for Relax ``RunCodegen`` as ``relax.ext.npu``; ``RunCodegen`` calls it with the
functions ``partition`` made and the options ``{"pow2_scales": bool}``.

Per layer (``layer.NpuLayer``):

* activations: the graph's uint8 tensors with zero point ``z`` are int8 tensors with zero
  point ``z - 128`` on the NPU (the host shifts the bytes at the region boundary, see
  ``offload.retype_boundaries``);
* weights: the int8 pass's int8 weights, OHWI (dense: ``[C_out, C_in]``, NHWC column order);
* bias: ``round(b / (s_x s_w[o]))`` in int32, at the accumulator's scale;
* requant: ``quantize_multiplier(s_x s_w[o] / s_y, pow2)``: shifts only with ``pow2`` (the
  int8 pass then chose power-of-two scales, so the ratios are exact powers of two);
* relu / relu6: the clamp bounds of the output; a fused pool: a second command on the
  requantized output (same zero point);
* a residual add (``layer.NpuAdd``): one ADD with ``s_a / s_y`` and ``s_b / s_y`` as two
  multipliers over one shared shift (``add_multipliers``), the relu as its clamp.
"""

from __future__ import annotations

import numpy as np

from .layer import NotOnNpu, read_add, read_layer
from .program import Add, AvgPool2D, Conv2D, Dense, MaxPool2D, Program, Tensor, activation_bounds
from .reference import quantize_multiplier

INT8_SHIFT = 128  # uint8 value u is int8 value u - 128


class _AnyNpu:
    """Constraints used when reading layers back in the codegen: partitioning already applied
    the target's, so here every op is allowed."""

    supported_ops = ("conv2d", "depthwise_conv2d", "dense", "relu", "relu6", "max_pool2d", "avg_pool2d", "add")
    strict_channels = False
    in_channel_multiple = out_channel_multiple = 1


def program_from_function(func, pow2_scales: bool = False) -> Program:
    """The NPU program of one partitioned function (``partition.npu_functions``).

    Raises ``ValueError`` if the function holds anything but NPU layers, or if two layers
    disagree on the zero point of a tensor they share.
    """
    from tvm import relax

    from .partition import composite_layers

    program = Program(pow2_scales=pow2_scales)
    ids: dict = {}  # relax var -> tensor id
    guessed: set = set()  # input tensors whose zero point no layer has fixed yet
    for name, out_var, args, chain in composite_layers(func):
        out_shape = [int(d) for d in out_var.ty.shape.values]
        try:
            layer = (read_add if name.endswith(".add") else read_layer)(chain, _AnyNpu)
        except NotOnNpu as e:
            raise ValueError(f"npu codegen: {e}") from None
        if layer.kind == "add":
            a, b = (_input(program, ids, guessed, func, x, zp) for x, zp in zip(args, layer.input_zero_points))
            ids[out_var] = _emit_add(program, layer, a, b, out_shape, pow2_scales)
            continue
        x = _input(program, ids, guessed, func, args[0], layer.input_zero_point)
        ids[out_var] = _emit(program, layer, x, out_shape, pow2_scales)
    body = func.body.body
    outs = list(body.fields) if isinstance(body, relax.Tuple) else [body]
    for o in outs:
        if o not in ids:
            raise ValueError("npu codegen: a function output is not written by any layer")
    program.outputs = [ids[o] for o in outs]
    return program


def _input(program: Program, ids: dict, guessed: set, func, arg, zero_point: int | None) -> int:
    zp = None if zero_point is None else zero_point - INT8_SHIFT
    if arg in ids:
        tid = ids[arg]
        have = program.tensors[tid].zero_point
        if zp is not None and tid in guessed:  # the first reader did not depend on it
            program.tensors[tid] = Tensor(program.tensors[tid].shape, zero_point=zp)
            guessed.discard(tid)
        elif zp is not None and have != zp:
            raise ValueError(f"npu codegen: tensor {arg.name} has zero point {have}, a layer reads it as {zp}")
        return tid
    if arg not in list(func.params):
        raise ValueError(f"npu codegen: layer input {arg} is neither a parameter nor a layer output")
    tid = program.add_tensor([int(d) for d in arg.ty.shape.values], -INT8_SHIFT if zp is None else zp)
    if zp is None:
        guessed.add(tid)
    ids[arg] = tid
    # inputs in parameter order: the order of the call's arguments
    program.inputs = sorted([*program.inputs, tid], key=lambda t: _param_index(func, ids, t))
    return tid


def _param_index(func, ids, tid) -> int:
    for i, p in enumerate(func.params):
        if ids.get(p) == tid:
            return i
    return len(func.params)


def _emit(program: Program, layer, x: int, out_shape: list[int], pow2: bool) -> int:
    zy = layer.out_zero_point - INT8_SHIFT
    ratio = layer.acc_scale / np.float64(layer.out_scale)
    mult, shift = quantize_multiplier(ratio, pow2=pow2)
    co = layer.weight.shape[0]
    bias = None
    if layer.bias is not None:
        b = np.round(layer.bias.astype(np.float64) / layer.acc_scale)
        bias = program.add_constant(np.clip(b, -(2**31), 2**31 - 1).astype(np.int32))
    lo, hi = activation_bounds(layer.activation, zy, layer.out_scale)
    w, m, s = program.add_constant(layer.weight.astype(np.int8)), program.add_constant(mult), program.add_constant(shift)
    if layer.kind == "dense":
        y = program.add_tensor([program.tensors[x].shape[0], co], zy)
        program.add(Dense(x, w, bias, m, s, y, act_min=lo, act_max=hi))
        return y
    pool = layer.pool
    conv_shape = out_shape if pool is None else _conv_shape(program.tensors[x].shape, layer)
    y = program.add_tensor(conv_shape, zy)
    program.add(Conv2D(x, w, bias, m, s, y, strides=layer.strides, padding=layer.padding, dilation=layer.dilation,
                       groups=layer.groups, act_min=lo, act_max=hi))
    if pool is None:
        return y
    z = program.add_tensor(out_shape, zy)
    if pool.max:
        program.add(MaxPool2D(y, z, pool.kernel, pool.strides, pool.padding))
    else:
        program.add(AvgPool2D(y, z, pool.kernel, pool.strides, pool.padding, count_include_pad=pool.count_include_pad))
    return z


def add_multipliers(ratio_a: float, ratio_b: float, pow2: bool = False) -> tuple[int, int, int]:
    """``(M_a, M_b, S)`` with ``M / 2^S ~ ratio`` and one shift for both (the ADD command's form).

    Default: the larger ratio gets 31 bits (``M`` in ``[2^30, 2^31)``), the smaller one the same
    shift; ``(a - za) M_a + (b - zb) M_b`` stays below 2^40. ``pow2``: each ratio rounded to a
    power of two (exact for the int8 pass's power-of-two scales), ``S`` the smallest shift that
    makes both multipliers integers.
    """
    ratios = np.array([ratio_a, ratio_b], np.float64)
    if np.any(ratios <= 0) or not np.all(np.isfinite(ratios)):
        raise ValueError("add scale ratios must be positive and finite")
    if pow2:
        exp = np.round(np.log2(ratios)).astype(np.int64)
        shift = int(np.clip(-exp.min(), 0, 62))
        mult = [1 << int(np.clip(e + shift, 0, 30)) for e in exp]
        return mult[0], mult[1], shift
    shift = 30 - int(np.floor(np.log2(ratios.max())))
    if shift < 0:
        raise ValueError("add scale ratios >= 2^31 cannot be expressed")
    shift = min(shift, 62)
    mult = np.minimum(np.round(ratios * 2.0**shift), 2**31 - 1).astype(np.int64)
    return int(mult[0]), int(mult[1]), shift


def _emit_add(program: Program, layer, a: int, b: int, out_shape: list[int], pow2: bool) -> int:
    zy = layer.out_zero_point - INT8_SHIFT
    sa, sb = layer.input_scales
    ma, mb, shift = add_multipliers(sa / layer.out_scale, sb / layer.out_scale, pow2)
    lo, hi = activation_bounds(layer.activation, zy, layer.out_scale)
    y = program.add_tensor(out_shape, zy)
    program.add(Add(a, b, y, ma, mb, shift, act_min=lo, act_max=hi))
    return y


def _conv_shape(in_shape, layer) -> list[int]:
    from .program import conv_out

    n, h, w, _ = in_shape
    co, kh, kw, _ = layer.weight.shape
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = layer.strides, layer.padding, layer.dilation
    return [n, conv_out(h, kh, sh, pt, pb, dh), conv_out(w, kw, sw, pl, pr, dw), co]


# export_library compiles C sources at -O0 unless the exporter passes options (hwc's backends
# do not): ask GCC for -O2 in the source itself, the simulator's loops are ~10x faster
_OPTIMIZE = "#if defined(__GNUC__) && !defined(__clang__)\n#pragma GCC optimize(\"O2\")\n#endif\n"


def codegen(funcs, options=None, constant_names=None) -> list:
    """``relax.ext.npu``: one C source module (the simulator and every function's program)."""
    import tvm

    from .runtime import npu_c_source

    pow2 = bool(options.get("pow2_scales", False)) if options else False
    functions = [(str(f.attrs["global_symbol"]), program_from_function(f, pow2)) for f in funcs]
    if not functions:
        return []
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(_OPTIMIZE + npu_c_source(functions), "c", [name for name, _ in functions], [])]


def register() -> None:
    """Register ``codegen`` as ``relax.ext.npu`` (idempotent)."""
    import tvm_ffi

    tvm_ffi.register_global_func("relax.ext.npu", codegen, override=True)
