"""How ``sparse24``'s measured decision times a layer: the layer alone in a module of its own,
dense and 2:4, with what follows it in the model (``sparse_lower.Tail``: bias, residual, clamp,
which both kernels do as they write their output), built for the target and run here, warm or
cold (``timing_of``: as the layer runs in its model), alternated round by round, each side's
fastest round kept (``time_layers``); layers alike share one timing (``layer_key``).
``emit_layer`` emits a layer as both the timed module and ``sparsify``'s rewritten graph do.
"""

from __future__ import annotations

import json

import numpy as np

CONV2D, MATMUL = "relax.nn.conv2d", "relax.matmul"
# Cold timings (weights from memory, as in a model larger than the last-level cache): runs per
# module and round, each after a flush of twice that cache.
COLD_RUNS = 7
# Timing rounds per layer (each: >= 20 ms of warm runs, or COLD_RUNS cold ones), the fastest kept
TIMING_ROUNDS = 5


def emit_layer(bb, call, x, weight: np.ndarray, perm: np.ndarray | None, name: str, qmax: int | None = None):
    """``call`` on ``x`` (read through ``perm``) with ``weight``; ``qmax``: as INT8 (``int8_layer``)."""
    from tvm import relax

    if perm is not None:
        axis = len(x.ty.shape) - 1  # NHWC channels / matmul K: the last axis
        x = bb.emit(relax.op.take(x, relax.const(perm.astype(np.int64)), axis=axis), name_hint=f"{name}_perm")
    if qmax is not None:
        return bb.emit(int8_layer(call, x, weight, qmax), name_hint=name)
    return bb.emit(relax.Call(call.op, [x, relax.const(weight, "float32"), *call.args[2:]], call.attrs), name_hint=name)


def int8_layer(call, x, weight: np.ndarray, qmax: int):
    """``call`` as the int8 quantizer runs it: uint8 ``x`` by the weight quantized symmetric
    per output channel to ``[-qmax, qmax]`` (zeros stay zeros), int32 out."""
    from tvm import relax

    from ..quantize.observers import quantize, weight_qparams

    axis = 0 if call.op.name == CONV2D else 1  # OHWI / [K, N]
    q = np.clip(quantize(weight, weight_qparams(weight, axis, qmax)), -qmax, qmax).astype(np.int8)
    if call.op.name == MATMUL:
        return relax.op.matmul(x, relax.const(q), out_dtype="int32")
    a = call.attrs
    return relax.op.nn.conv2d(
        x, relax.const(q), strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
        data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype="int32",
    )  # fmt: skip


def layer_module(site, weight: np.ndarray, perm: np.ndarray | None, sparse: bool, qmax: int | None = None, kernel=None):
    """A module running one layer on its own (the measurement's unit), with its ``tail`` (a
    residual operand as a second input); ``sparse``: marked as sparsified, so that its 2:4
    weight gets the sparse kernel (``build.has_sparsity``), with ``kernel`` (``{"gemm": [m,
    n, k], "variant": name}``) its variant; ``qmax``: the layer as INT8 (``int8_layer``)."""
    import tvm
    from tvm import relax

    from .sparse24 import REPORT_ATTR  # (sparse24 imports this module)

    data, tail = site.call.args[0], site.tail
    x = relax.Var("x", relax.TensorType([int(d) for d in data.ty.shape], "float32" if qmax is None else "uint8"))
    params = [x] + ([relax.Var("r", tail.residual.ty)] if tail is not None and tail.residual is not None else [])
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = emit_layer(bb, site.call, x, weight, perm, "y", qmax)
            if tail is not None:
                y = emit_tail(bb, y, tail, params[1:])
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = tvm.IRModule({"main": bb.get()["main"]})
    layers = [{"sparse": True, **kernel}] if kernel else []
    return mod.with_attr(REPORT_ATTR, json.dumps({"layers": layers})) if sparse else mod


def emit_tail(bb, y, tail, residual: list):
    """``tail``'s ops (``sparse_lower.Tail``) after ``y``, the residual operand ``residual[0]``."""
    from tvm import relax

    if tail.bias is not None:
        y = bb.emit(relax.op.add(y, tail.bias))
    if tail.residual is not None:
        y = bb.emit(relax.op.add(y, residual[0]))
    if tail.lo is not None and tail.hi is None and tail.lo == 0.0:
        y = bb.emit(relax.op.nn.relu(y))
    elif tail.lo is not None or tail.hi is not None:
        y = bb.emit(relax.op.clip(y, tail.lo if tail.lo is not None else -np.inf, tail.hi if tail.hi is not None else np.inf))
    return y


def time_layers(modules: dict, spec, rounds: int = TIMING_ROUNDS, flush_bytes: int = 0) -> dict[str, float]:
    """Seconds per run of each one-layer module, built for ``spec`` and run here: the fastest
    of its timings, the modules alternated round by round; with ``flush_bytes`` every run is
    timed cold, after TVM's timer has written that many bytes (weights from memory).

    The fastest, not the median: noise only ever adds time, and on the shared VMs hwc is
    measured on it does not add it alike. The sparse kernels there have slow phases (seconds
    to minutes) that dense kernels barely feel (Zen 4, 196x256x1024 pairs, one thread: sparse
    0.58 ms or 0.80-0.87 ms, dense 0.90-0.95 ms throughout), so a median decided by the share
    of slow rounds, and layers near the threshold flipped from run to run. The minimum
    estimates what each kernel costs when nothing else interferes (Chen and Revels, "Robust
    benchmarking in noisy environments", 2016)."""
    import tvm
    from tvm import relax

    from ... import build

    from ..winograd import Winograd, winograd

    runners = {}
    for key, mod in modules.items():
        if spec.hardware.winograd and str(mod["main"].params[0].ty.dtype) == "float32":
            mod = winograd(mod, Winograd(), spec)  # a float 3x3 conv's dense kernel is Winograd
        exe = build.build(build.default_schedule(build.legalize(mod, spec), spec), spec)
        vm = relax.VirtualMachine(exe, tvm.cpu())
        rng = np.random.default_rng(0)
        x = []
        for param in (p.ty for p in mod["main"].params):
            shape = [int(d) for d in param.shape]
            x.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32) if str(param.dtype) == "float32" else rng.integers(0, 256, shape, np.uint8)))
        vm["main"](*x)  # warm up
        if flush_bytes:  # one run per repeat, each after the flush (the VM's wrapper drops the flush)
            timer = vm.module.time_evaluator("main", tvm.cpu(), number=1, repeat=COLD_RUNS, cache_flush_bytes=flush_bytes)
        else:
            timer = vm.time_evaluator("main", tvm.cpu(), number=10, repeat=1, min_repeat_ms=20)
        runners[key] = (timer, x)
    times = {key: [] for key in modules}
    for _ in range(rounds):
        for key, (timer, x) in runners.items():
            times[key].extend(timer(*x).results)
    return {key: float(np.min(t)) for key, t in times.items()}


def layer_key(site, permuted: bool, kernel: dict | None) -> tuple:
    """What a layer's dense and sparse modules depend on besides the weight values (the op,
    its attributes, the shapes, the input permutation's presence, the kernel variant, the
    tail's ops): layers with one key run the same kernels, so one timing serves them all."""
    call, t = site.call, site.tail
    data, weight = call.args[:2]
    tail = t and (t.bias is not None, t.residual is not None, t.lo, t.hi)
    return (call.op.name, str(call.attrs), str(data.ty), str(weight.ty), permuted, kernel and kernel["variant"], tail)


def timing_of(func, choice: str = "auto") -> dict:
    """How the layers are timed (``choice``: ``Sparse24.timing``); ``auto``: as they run in
    this model. A model whose weights exceed this host's last-level cache reads each layer's
    weights from memory on every call (the other layers evicted them): its layers are timed
    cold; a smaller model's stay cached: warm."""
    from ...targets import host_llc_bytes

    llc, weights = host_llc_bytes(), weight_bytes(func)
    cold = weights > llc if choice == "auto" else choice == "cold"
    return {
        "regime": "cold" if cold else "warm", "chosen": choice, "model_weight_bytes": weights, "llc_bytes": llc,
        "flush_bytes": 2 * llc if cold else 0,
    }  # fmt: skip


def weight_bytes(func) -> int:
    """Bytes of the constant tensors ``func`` holds (each counted once)."""
    import tvm
    from tvm import relax

    seen = {}

    def visit(expr):
        data = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.Constant) else None
        if isinstance(data, tvm.runtime.Tensor):  # not a shape's integer
            seen[data.data_ptr()] = int(np.prod(data.shape, dtype=np.int64)) * np.dtype(str(data.dtype)).itemsize

    relax.analysis.post_order_visit(func, visit)
    return sum(seen.values())
