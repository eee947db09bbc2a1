"""2:4 structured sparsity: ``sparsify(mod, Sparse24(layers=..., permute=True), spec)``.

Each chosen conv / matmul keeps the 2 largest-magnitude of every 4 consecutive weights along
its reduction axis (a conv's input channels at each tap, a matmul's ``K``). With ``permute``
the reduction axis is first reordered (``mask24.permutation_search``) so that more magnitude
survives, and the layer's input comes in that order: from the layer that computes it, whose
output channels (and bias) are permuted the same way, where nothing but a bias add and ReLU /
clip lies between them (``perm_fold``; the layers are planned last first for that), else
through a ``take`` (which ``backends.sparse_lower`` folds into the sparse kernel's copy of its
input). The weight's reduction axis is permuted the same way, so the result is unchanged
before masking.

The graph after this pass is an ordinary dense Relax graph with 2:4 weights; the backends
lower such weights to their sparse kernels (``backends.sparse_lower``: compressed values plus
2-bit positions, about 53% of the FP32 weight; the x86 GEMV's 50%, positions inside the
values). Which layers: every conv (NHWC, one group, input channels a multiple of 4) and
matmul by a constant weight, or the named ``layers``;
of those, with ``decide="auto"`` (default) on a target that runs here, only the layers whose
sparse kernel was *measured* faster than the dense one for that target, by at least
``MIN_SPEEDUP`` (sparse kernels lose on small or compute-bound layers, and smaller gains are
noise); on a target that cannot run here (a GPU, a cross target) every eligible layer the
backend's ``sparse_unmeasured_rule`` (measured on its hardware elsewhere) does not keep dense
-- on CUDA, GEMVs -- and the report says they were not measured.

Together with INT8 (a recipe's ``int8`` step after this one; ``int8=True``, which the build
sets): the int8 quantizer keeps the 2:4 zeros, the backends run those layers on their 2:4 INT8
kernels (``backends.cpu_sparse_int8``), and the measured decision compares INT8 kernels: the
layer quantized per output channel (the target's weight range), dense int8 against 2:4 int8.

With ``pairs`` every two consecutive output channels keep the same positions (those with the
larger summed magnitude; still 2:4 in every row): on CPUs one load of the ``x`` under a kept
position then feeds both channels' FMAs (``cpu_sparse_gemm``'s ``shared`` kernels), which
compute-bound layers (1x1 convs) need, at a cost in kept magnitude (~0.69 of the layer's
magnitude where 2:4 keeps ~0.75 on the MNIST CNN; top-1 99.34% against 99.57%).

Each layer is timed as it runs in its model (``layer_timing``): a model whose weights exceed this host's
last-level cache reads every layer's weights from memory on each call (the other layers have
evicted them), so its layers are timed cold, each run after a flush (``timing`` in the report);
a smaller model's layers warm. A layer that the dense build runs inside one of the backend's
multi-layer kernels (MobileNetV2's large inverted-residual blocks, one kernel each) is not
timed alone: it stays dense (made sparse, it would split its block into three slower kernels);
``decide="all"`` still makes it sparse, and a build without block kernels (``BLOCKS_ATTR``:
``--no-fuse-blocks``) times it like any other. Layers alike (op, attributes, shapes, variant) are timed once:
the others report ``timed_as`` that layer (MobileNetV2: 35 eligible layers of 20 kinds, its
measured build 155 s -> 105 s). (Timed warm, a 1000x1024 layer in a 46 MB MLP measured 0.82x
and stayed dense; cold, 1.69x, as in the model: the MLP ran 1.88x instead of 1.73x over dense.)

The report (``sparsity_report(mod)``, in the manifest as ``sparsity``) lists per layer the
decision, the kept-magnitude fraction with and without the permutation, and the timings. A
measured decision on a backend with several kernel variants (``Backend.sparse_pick``: the CPU)
first times the variants for the layer's GEMM shape and records the fastest (``gemm``,
``variant``); the layer is timed, and later built (``build.sparse_variants``), with that one.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass

import numpy as np

from .mask24 import compress, conv_rows, kept_fraction, mask_2to4, pair_sums, permutation_search, shared_mask_2to4
from .layer_timing import CONV2D, MATMUL, emit_layer, layer_key, layer_module, time_layers, timing_of
from .perm_fold import fold_of, permute_bias, permute_inputs, permute_outputs

__all__ = ["Decide", "Sparse24", "sparsify", "sparsity_report"]

log = logging.getLogger("hwcompress")

REPORT_ATTR = "hwc.sparsity"
# A measured layer goes sparse only if its sparse kernel was at least this much faster: smaller
# gains are within this machine's run-to-run noise (the decision flipped under load).
MIN_SPEEDUP = 1.05
TIMINGS = ("auto", "warm", "cold")
# A measured decision's reason for a layer inside a backend multi-layer kernel (``_in_block_kernels``)
IN_BLOCK = "runs inside a fused multi-layer kernel (e.g. an inverted-residual block) when dense: kept dense"


class Decide(str, enum.Enum):
    """Which eligible layers go sparse."""

    AUTO = "auto"  # measured faster where the target runs here, else all
    MEASURE = "measure"  # measured faster; a target that cannot run here is an error
    ALL = "all"  # every eligible layer, unmeasured


@dataclass(frozen=True)
class Sparse24:
    """Prune conv / matmul weights to 2:4 along the reduction axis and run them on sparse kernels.

    Parameters
    ----------
    layers : tuple of str or None
        Layers to consider, by name as the report lists them (``matmul[0]``, ``conv2d[3]``:
        the op and its index among ``main``'s bindings of that op); None: every eligible one.
    permute : bool
        Search an input-channel permutation that keeps more weight magnitude.
    decide : Decide or str
        ``auto`` / ``measure`` / ``all`` (see ``Decide``).
    int8 : bool
        The layers will run as INT8 (an ``int8`` step follows): measure INT8 kernels.
    pairs : bool
        Pairs of consecutive output channels keep the same positions (chosen by the pair's
        summed magnitude): less magnitude kept, but on CPUs one ``x`` load then serves both
        channels, which is what makes compute-bound layers (1x1 convs) gain.
    timing : str
        How measured layers are timed: ``auto`` (cold when the model's weights exceed this
        host's last-level cache, else warm), ``warm`` (caches kept: the model runs in a tight
        loop beside nothing else) or ``cold`` (each run after a cache flush).
    """

    layers: tuple[str, ...] | None = None
    permute: bool = True
    decide: Decide = Decide.AUTO
    int8: bool = False
    pairs: bool = False
    timing: str = "auto"

    def __post_init__(self):
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise ValueError(f"Sparse24.layers must be a list of layer names, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.permute, bool):
            raise ValueError(f"Sparse24.permute must be true or false, got {self.permute!r}")
        try:
            object.__setattr__(self, "decide", Decide(self.decide))
        except ValueError:
            raise ValueError(f"Sparse24.decide must be one of auto, measure, all, got {self.decide!r}") from None
        if not isinstance(self.pairs, bool):
            raise ValueError(f"Sparse24.pairs must be true or false, got {self.pairs!r}")
        if self.timing not in TIMINGS:
            raise ValueError(f"Sparse24.timing must be one of {', '.join(TIMINGS)}, got {self.timing!r}")


@dataclass(frozen=True)
class _Site:
    var: object
    call: object
    name: str
    reason: str | None  # None: eligible
    # what follows the layer that a kernel does as it writes its output (bias, residual,
    # clamp: ``sparse_lower.Tail``), timed with the layer on both sides; None for INT8
    tail: object = None


def _sites(func, spec, users: dict, int8: bool = False) -> list[_Site]:
    """The conv / matmul layers of ``func`` (``users``: ``sparse_lower.graph_users(func)``)."""
    from tvm import relax

    from ...backends import get_backend
    from ...backends.sparse_lower import tail_of

    sites, counts = [], {CONV2D: 0, MATMUL: 0}
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or getattr(call.op, "name", None) not in counts:
                continue
            op = call.op.name
            name = f"{op.split('.')[-1]}[{counts[op]}]"
            counts[op] += 1
            reason = _reason(call)
            if reason is None and not spec.hardware.sparse_2_4:
                reason = f"target {spec.name} has no 2:4 kernels ([hardware].sparse_2_4 = false)"
            elif reason is None and int8 and spec.npu is not None:
                reason = f"target {spec.name}: INT8 layers run on its NPU, which has no 2:4 kernels"
            elif reason is None and int8 and get_backend(spec).sparse_kernel_int8 is None:
                reason = f"target {spec.name} has no 2:4 INT8 kernels (the layer runs dense INT8)"
            tail = None if int8 or reason is not None else tail_of(binding.var, call, users)
            sites.append(_Site(binding.var, call, name, reason, tail))
    return sites


def _reason(call) -> str | None:
    """Why ``call`` cannot run 2:4-sparse (None: it can)."""
    import tvm

    from ...analysis import static_shape

    data, weight = call.args[:2]
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return "weight is not a constant"
    if str(weight.ty.dtype) != "float32" or str(data.ty.dtype) != "float32":
        return "not float32"
    if static_shape(data.ty) is None:
        return "dynamic input shape"
    w = weight.value.numpy()
    if call.op.name == MATMUL:
        if w.ndim != 2:
            return "weight is not 2-D"
        return None if w.shape[0] % 4 == 0 else f"reduction length {w.shape[0]} is not a multiple of 4"
    attrs = call.attrs
    if int(attrs.groups) != 1:
        return "grouped / depthwise conv"
    if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NHWC", "OHWI"):
        return f"{attrs.data_layout} layout: the sparse kernels take NHWC convs (the target's conv_layout; build with --layout NHWC)"
    return None if w.shape[-1] % 4 == 0 else f"{w.shape[-1]} input channels, not a multiple of 4"


def _in_block_kernels(mod, sites: list[_Site], spec) -> set[str]:
    """Names of the ``sites`` whose conv a dense build runs inside one of the backend's
    multi-layer kernels (``Backend.fusion_passes``: e.g. a whole inverted-residual block). A
    layer's time alone says nothing there, and made sparse it would split its block back into
    separate kernels (measured: MobileNetV2's fused 56x56-112x112 blocks run 1.2-1.7x faster
    than their three kernels)."""
    import tvm
    from tvm import relax

    from ...backends import get_backend

    passes = get_backend(spec).fusion_passes
    if passes is None:
        return set()
    fused = tvm.transform.Sequential(passes(spec.tvm_target()))(mod)["main"]
    kept = []  # the weight constants of the calls the fusion left alone (the same objects)
    for block in fused.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and len(call.args) > 1 and isinstance(call.args[1], tvm.ir.expr.GenericConst):
                kept.append(call.args[1])
    return {s.name for s in sites if s.reason is None and not any(w.same_as(s.call.args[1]) for w in kept)}


def _gemm_rows(call, w: np.ndarray) -> np.ndarray:
    """The weight as rows along the permutable reduction axis (input channels / ``K``)."""
    return conv_rows(w) if call.op.name == CONV2D else w.T


def _from_rows(call, rows: np.ndarray, shape) -> np.ndarray:
    return rows.reshape(shape) if call.op.name == CONV2D else np.ascontiguousarray(rows.T)


@dataclass
class _Layer:
    site: _Site
    weight: np.ndarray  # 2:4, reduction axis permuted by perm
    perm: np.ndarray | None
    record: dict


def _plan_layer(site: _Site, permute: bool, int8: bool = False, pairs: bool = False, out_perm: np.ndarray | None = None) -> _Layer:
    """The layer's 2:4 weight and input permutation; ``out_perm``: its output channels
    computed in that order (a later layer's input permutation folded into it, ``perm_fold``),
    before its pairs and its own permutation are chosen."""
    w = site.call.args[1].value.numpy()
    if out_perm is not None:
        w = permute_outputs(site.call.op.name, w, out_perm)
    rows = _gemm_rows(site.call, w)
    # pairs: the magnitude 2:4 keeps is the pair's summed one (the permutation searched on it)
    channels = w.shape[0] if site.call.op.name == CONV2D else rows.shape[0]
    scored = pair_sums(rows, channels) if pairs else rows
    perm = permutation_search(scored) if permute else None
    if perm is not None and np.array_equal(perm, np.arange(perm.size)):
        perm = None
    permuted = rows if perm is None else rows[:, perm]
    masked = permuted * (shared_mask_2to4(permuted, channels) if pairs else mask_2to4(permuted))
    weight = _from_rows(site.call, masked, w.shape).astype(np.float32)
    record = {
        "layer": site.name,
        "shape": list(w.shape),
        "kept_magnitude": round(kept_fraction(scored), 4),
        "kept_magnitude_permuted": round(kept_fraction(scored, perm), 4) if permute else None,
        # what the artifact stores: float32, or int8 values when an int8 step follows
        "weight_bytes_dense": w.size * (1 if int8 else 4),
    }
    return _Layer(site, weight, perm, record)


def _compressed_bytes(c, int8: bool) -> int:
    return c.values.size * (1 if int8 else 4) + c.meta.nbytes


def _stored_bytes(spec, call, weight: np.ndarray, variant: str | None = None) -> int | None:
    """Bytes of the weight operands the backend's float 2:4 kernel (``variant``) for ``call``
    reads, what the artifact stores (the x86 GEMV's: 50% of dense, its rows padded to whole
    blocks); None where the backend has no kernel for the shape."""
    from ...backends import get_backend
    from ...backends.sparse_lower import gemm_shape

    backend = get_backend(spec)
    if backend.sparse_kernel is None:
        return None
    try:
        _, weights = backend.sparse_kernel(spec.tvm_target(), *gemm_shape(call), _gemm_view(call, weight), variant)
    except ValueError:
        return None
    return int(sum(w.nbytes for w in weights))


def _gemm_view(call, w: np.ndarray) -> np.ndarray:
    """``W[N, K]`` of the kernel (what ``backends.sparse_lower`` compresses)."""
    return w.reshape(w.shape[0], -1) if call.op.name == CONV2D else w.T


def sparsify(mod, config: Sparse24 = Sparse24(), spec=None):
    """Prune the chosen convs / matmuls of ``main`` to 2:4 (see the module docstring).

    Returns the module with the 2:4 weights and the report attached (``sparsity_report``).
    """
    from tvm import relax

    from ...errors import RecipeError
    from ...targets import load_target, runnable_here
    from ...backends import get_backend
    from ...backends.sparse_lower import const_value, gemm_shape, graph_users
    from ...build import blocks_allowed
    from ..layout import fold_const_moves
    from ..quantize.int8 import weight_qmax
    from ..quantize.int8_graph import emit_main, module_with_main

    spec = spec if spec is not None else load_target("host")
    mod = fold_const_moves(mod)  # Gemm's permute_dims(W): targets without a layout step keep it
    func = mod["main"]
    users = graph_users(func)
    sites = _sites(func, spec, users, config.int8)
    names = {s.name for s in sites}
    if config.layers is not None:
        unknown = sorted(set(config.layers) - names)
        if unknown:
            raise RecipeError(f"sparse-2-4: no layer named {', '.join(unknown)} (layers: {', '.join(s.name for s in sites) or 'none'})")
        sites = [s for s in sites if s.name in config.layers]
    runs_here, why_not = runnable_here(spec)
    measure = config.decide is Decide.MEASURE or (config.decide is Decide.AUTO and runs_here)
    if measure and not runs_here:
        raise RecipeError(f"sparse-2-4: decide='measure' needs the target to run here ({why_not}); use decide='all'")
    # where layers are not timed, the backend's rule from its measurements elsewhere ("auto" only)
    rule = get_backend(spec).sparse_unmeasured_rule if config.decide is Decide.AUTO and not measure else None
    pick = get_backend(spec).sparse_pick  # the kernel variant, timed where layers are measured
    timing = timing_of(func, config.timing) if measure else None
    in_blocks = _in_block_kernels(mod, sites, spec) if measure and blocks_allowed(mod) else set()
    # planned last layer first: a layer's input permutation is folded into the layer that
    # computes its input where it can (``perm_fold``), which must know it before its own plan
    planned = [s for s in sites if s.reason is None and s.name not in in_blocks]
    var2val = relax.analysis.get_var2val(func)
    plans, out_perms, folds = {}, {}, {}  # site var -> _Layer; producer var -> perm; consumer var -> Fold
    for site in reversed(planned):
        plans[site.var] = _plan_layer(site, config.permute, config.int8, config.pairs, out_perms.get(site.var))
        fold = None if plans[site.var].perm is None or config.int8 else fold_of(var2val, users, site.call.args[0])
        if fold is not None and fold.producer not in out_perms:
            out_perms[fold.producer], folds[site.var] = plans[site.var].perm, fold
    chosen, records = {}, []
    # per GEMM shape / (shape, variant) / layer kind: layers alike are measured and sized once
    picked, sizes, timed = {}, {}, {}
    for site in sites:
        if site.reason is not None:
            records.append({"layer": site.name, "sparse": False, "reason": site.reason})
            continue
        if site.name in in_blocks:  # measured decisions only: decide="all" makes it sparse
            records.append({"layer": site.name, "sparse": False, "reason": IN_BLOCK})
            continue
        layer = plans[site.var]
        take = layer.perm is not None and site.var not in folds  # the layer reads its input through a take
        record = layer.record
        if site.var in folds:
            record["permutation"] = f"computed by the layer that makes its input ({var2val[folds[site.var].producer].op.name.split('.')[-1]})"
        gemm = tuple(gemm_shape(site.call))
        kernel = None
        if measure and pick is not None and not config.int8:
            # the kernel variant measured fastest for this shape: the one the build then uses
            if gemm not in picked:
                picked[gemm] = pick(spec.tvm_target(), *gemm, pairs=config.pairs)
            kernel = {"gemm": list(gemm), "variant": picked[gemm]}
            record |= kernel
        size_key = (gemm, record.get("variant"))  # the operands' sizes follow from these
        if size_key not in sizes:
            stored = None if config.int8 else _stored_bytes(spec, site.call, layer.weight, record.get("variant"))
            if stored is None:  # values + positions, the weight's compressed form
                stored = _compressed_bytes(compress(_gemm_view(site.call, layer.weight)), config.int8)
            sizes[size_key] = stored
        record["weight_bytes_sparse"] = sizes[size_key]
        if measure:
            key = layer_key(site, take, kernel)
            if key in timed:  # the same kernels as an earlier layer's: its timings
                t, record["timed_as"] = timed[key]
            else:
                original = site.call.args[1].value.numpy()
                qmax = weight_qmax(spec) if config.int8 else None
                modules = {
                    "dense": layer_module(site, original, None, False, qmax),
                    "sparse": layer_module(site, layer.weight, layer.perm if take else None, True, qmax, kernel),
                }
                t = time_layers(modules, spec, flush_bytes=timing["flush_bytes"])
                timed[key] = (t, site.name)
            record |= {"dense_ms": round(t["dense"] * 1e3, 4), "sparse_ms": round(t["sparse"] * 1e3, 4), "speedup": round(t["dense"] / t["sparse"], 3)}
            # decided on the reported (rounded) times, so the report explains itself; a gain
            # inside the measurement noise stays dense (a busy machine flipped such layers)
            record["sparse"] = record["sparse_ms"] * MIN_SPEEDUP < record["dense_ms"]
            if not record["sparse"]:
                record["reason"] = (
                    "the dense kernel measured faster" if record["sparse_ms"] >= record["dense_ms"]
                    else f"sparse measured only {record['speedup']}x faster (< {MIN_SPEEDUP}x: within the noise)"
                )  # fmt: skip
        else:
            why_dense = rule(*gemm) if rule else None
            record["sparse"] = why_dense is None
            record["measured"] = False
            if why_dense:
                record["reason"] = why_dense
        records.append(record)
        if record["sparse"]:
            chosen[site.var] = layer
    report = {
        "pattern": "2:4",
        "decide": config.decide.value,
        "measured": measure,
        "not_measured_because": None if measure else (why_not or "decide='all'"),
        "permute": config.permute,
        "pairs": config.pairs,
        "int8": config.int8,
        "min_speedup": MIN_SPEEDUP,
        "timing": timing and {k: v for k, v in timing.items() if k != "flush_bytes"},
        "layers": records,
    }
    sparse = [r for r in records if r.get("sparse")]
    log.info("sparse-2-4: %d of %d conv/matmul layers sparse", len(sparse), len(records))
    if not chosen:
        return mod.with_attr(REPORT_ATTR, json.dumps(report))

    bias_perms = {f.bias: out_perms[f.producer] for f in folds.values() if f.bias is not None}
    in_perms = {var: plans[var].perm for var in folds}

    def emit(bb):
        def call(var, _orig, value):
            layer = chosen.get(var)
            if layer is not None:
                return emit_layer(bb, value, value.args[0], layer.weight, None if var in folds else layer.perm, var.name)
            if var in out_perms or var in in_perms:  # dense, its channels in the folded orders
                w = value.args[1].value.numpy()
                w = w if var not in out_perms else permute_outputs(value.op.name, w, out_perms[var])
                w = w if var not in in_perms else permute_inputs(value.op.name, w, in_perms[var])
                value = relax.Call(value.op, [value.args[0], relax.const(w, str(w.dtype)), *value.args[2:]], value.attrs)
            elif var in bias_perms:
                args = [a if const_value(a) is None else relax.const(permute_bias(const_value(a), bias_perms[var])) for a in value.args]
                value = relax.Call(value.op, args, value.attrs)
            return bb.emit(value, name_hint=var.name)

        return emit_main(bb, func, func.params, call)[0]

    out = module_with_main(mod, func, emit, isinstance(func.body.body, relax.Tuple))
    return out.with_attr(REPORT_ATTR, json.dumps(report))


def sparsity_report(mod) -> dict | None:
    """The report ``sparsify`` attached to ``mod`` (None if it did not run)."""
    attrs = mod.attrs
    if attrs is None or REPORT_ATTR not in attrs:
        return None
    report = json.loads(str(attrs[REPORT_ATTR]))
    layers = [r for r in report["layers"] if r.get("sparse")]
    dense = sum(r["weight_bytes_dense"] for r in layers)
    report["sparse_layers"] = len(layers)
    report["weight_bytes"] = {"dense": dense, "sparse": sum(r["weight_bytes_sparse"] for r in layers)}
    report["weight_bytes"]["ratio"] = round(report["weight_bytes"]["sparse"] / dense, 4) if dense else None
    return report

