"""Winograd convolution: 3x3 stride-1 conv2d as F(2x2,3x3) or F(4x4,3x3), weights transformed
at compile time.

``Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A`` per ``alpha x alpha`` input tile (``alpha = m + 2``):
the weight transform ``U = G g G^T`` is done in numpy (``winograd_math``; float64, rounded
once) and bound as a constant; the kernel does the data transform, ``alpha^2`` batched GEMMs
over the input channels, and the inverse transform. Multiplications per output: ``9`` (direct) vs
``alpha^2 / m^2`` = ``4`` (F(2,3)) or ``2.25`` (F(4,3)) per channel pair.

Eligible: ``relax.nn.conv2d`` with a constant weight, 3x3 kernel, strides 1, dilation 1,
groups 1, NCHW/OIHW or NHWC/HWIO (any kernel layout with O, I, H, W is read), float32/float64,
both channel counts >= ``min_channels``. Everything else is left as it is.

The kernel (``winograd_te``) follows TOPI's generic NHWC Winograd compute with a
pre-transformed weight, for both layouts: an NCHW input is transposed to channels-last in the
padding copy and the output gathered back to NCHW, so the transforms and the batched GEMM
always read and write channels contiguously. It differs from TOPI's where that was slow or
wrong: each transform is two one-sided products (TOPI's two-sided sum does ``alpha^4``
instead of ``2 alpha^3`` multiply-adds per tile), the transformed weight is packed
``(alpha, alpha, O/ob, I, ob)`` with ``ob`` two SIMD vectors on CPU targets (the batched
GEMM's register tile reads it sequentially), TOPI's NCHW variant reads past the padded input
when the output size is not a multiple of ``m``, its NHWC one refuses pre-computed weights.

The CPU backend's Winograd rule (``backends/cpu_winograd.py``) schedules it; against the
packed direct conv of the same backend (one core, ResNet-18's layers): 2.28x at 64 channels
56x56, 3.04x at 128/28x28, 2.30x at 256/14x14 (F(4,3)), 1.58x at 512/7x7 (F(2,3)).

Per-layer overrides (``Winograd.per_layer``) are keyed by the conv's **index**: its position
among all ``relax.nn.conv2d`` bindings of ``main`` in program order (0-based, eligible or not;
as a string because TOML keys are strings). Relax variable names are not stable across imports;
the index is, for a given model. ``winograd_candidates(mod)`` lists index, shapes and the tile
the pass would choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .winograd_math import choose_tile, transform_weights, winograd_matrices
from .winograd_te import pack_weights, winograd_te

__all__ = [
    "Winograd",
    "WinogradPass",
    "choose_tile",
    "transform_weights",
    "winograd",
    "winograd_candidates",
    "winograd_matrices",
    "winograd_pass",
]


TILES = (2, 4)


@dataclass(frozen=True)
class Winograd:
    """Rewrite eligible 3x3 stride-1 convolutions into Winograd F(m x m, 3 x 3).

    Parameters
    ----------
    tile : int or None
        Output tile ``m`` for every eligible conv: 2 (F(2,3)) or 4 (F(4,3)); None chooses per
        layer from the layer shape (``choose_tile``).
    per_layer : dict[str, int]
        Overrides by conv index (position among ``main``'s ``conv2d`` bindings, 0-based, as a
        string): 2 or 4 forces that tile, 0 keeps the layer a direct conv. An override applies
        even below ``min_channels``; the conv must still be structurally eligible.
    min_channels : int
        Convs with fewer input or output channels stay direct: the transforms' memory traffic
        outweighs the saved multiplications on thin layers.
    """

    tile: int | None = None
    per_layer: dict[str, int] = field(default_factory=dict)
    min_channels: int = 16

    def __post_init__(self):
        if self.tile is not None and (isinstance(self.tile, bool) or self.tile not in TILES):
            raise ValueError(f"Winograd.tile must be one of {TILES} or None (auto), got {self.tile!r}")
        if not isinstance(self.per_layer, dict):
            raise TypeError(f"Winograd.per_layer must be a table of conv index -> tile, got {self.per_layer!r}")
        for key, tile in self.per_layer.items():
            if not isinstance(key, str) or not key.isdigit():
                raise ValueError(f"Winograd.per_layer keys are conv indices as strings ('0', '3'), got {key!r}")
            if isinstance(tile, bool) or tile not in (0, *TILES):
                raise ValueError(f"Winograd.per_layer[{key!r}] must be 0 (direct) or one of {TILES}, got {tile!r}")
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ValueError(f"Winograd.min_channels must be a positive int, got {self.min_channels!r}")

    def __hash__(self):  # per_layer is a dict: hash its items
        return hash((self.tile, tuple(sorted(self.per_layer.items())), self.min_channels))


# ---------------------------------------------------------------------------- pattern + rewriter


@dataclass(frozen=True)
class _Conv:
    """What the rewriter needs to know about an eligible conv2d."""

    layout: str  # NCHW | NHWC
    weight_oihw: np.ndarray
    padding: tuple[int, int, int, int]
    out_hw: tuple[int, int]


def _conv_pattern():
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.nn.conv2d")(wildcard(), is_const())


def _eligible(call) -> _Conv | None:
    """The conv's facts if it can be a Winograd conv, else None."""
    attrs = call.attrs
    layout = str(attrs.data_layout)
    out_layout = str(attrs.out_layout or layout)
    kernel_layout = str(attrs.kernel_layout)
    if layout not in ("NCHW", "NHWC") or out_layout != layout or sorted(kernel_layout) != sorted("OIHW"):
        return None
    if int(attrs.groups) != 1 or any(int(s) != 1 for s in attrs.strides) or any(int(d) != 1 for d in attrs.dilation):
        return None
    data_ty, weight_ty = call.args[0].ty, call.args[1].ty
    dtype = str(data_ty.dtype)
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
    if dtype not in ("float32", "float64") or str(weight_ty.dtype) != dtype or out_dtype not in ("", "void", dtype):
        return None
    try:
        shape = [int(d) for d in data_ty.shape]
    except (TypeError, ValueError):  # symbolic shapes: the tile count must be static
        return None
    weight = np.transpose(call.args[1].value.numpy(), [kernel_layout.index(c) for c in "OIHW"])
    if weight.shape[2:] != (3, 3):
        return None
    padding = tuple(int(p) for p in attrs.padding)
    if len(padding) == 2:
        padding = padding * 2
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    out_hw = (h + padding[0] + padding[2] - 2, w + padding[1] + padding[3] - 2)
    if min(out_hw) < 1:
        return None
    return _Conv(layout, weight, padding, out_hw)


def _tile_for(conv: _Conv, index: int | None, config: Winograd, spec, sparse: bool = False) -> int:
    """The tile for ``conv`` (0: stay direct): recipe override, then config, then auto."""
    override = config.per_layer.get(str(index)) if index is not None else None
    if override is not None:
        return override
    if sparse and _is_sparse(conv.weight_oihw):
        return 0  # a 2:4 weight of a sparsified module runs on the sparse kernel (``build.legalize``)
    o, i = conv.weight_oihw.shape[:2]
    if min(o, i) < config.min_channels:
        return 0
    return config.tile or choose_tile(conv.out_hw, (i, o), spec)


def _is_sparse(weight_oihw: np.ndarray) -> bool:
    from .sparsity.mask24 import conv_rows, is_2to4

    return is_2to4(conv_rows(weight_oihw.transpose(0, 2, 3, 1)))


def _weight_block(out_channels: int, spec) -> int:
    """Output channels per packed block of the transformed weight: two SIMD vectors of them on
    a CPU target (the register tile of the CPU backend's batched GEMM), else all of them."""
    if spec is None or spec.kind != "llvm":
        return out_channels
    from ..backends.cpu_schedule import CpuFacts

    lanes = CpuFacts.from_target(spec.tvm_target()).lanes(32)
    for block in (2 * lanes, lanes):
        if out_channels % block == 0:
            return block
    return out_channels


def _rewrite_conv(matched, bb, index_of, config: Winograd, spec, sparse: bool = False):
    """Rewriter of ``_conv_pattern``: a ``call_tir`` of the Winograd kernel, or ``matched``."""
    from tvm import relax

    if not isinstance(matched, relax.Call):  # a var aliasing the conv (``gv = lv``): its binding is rewritten
        return matched
    conv = _eligible(matched)
    if conv is None:
        return matched
    m = _tile_for(conv, index_of(matched), config, spec, sparse)
    if m == 0:
        return matched
    u = transform_weights(conv.weight_oihw, m)
    u = pack_weights(u, _weight_block(u.shape[-1], spec))
    return bb.call_te(
        winograd_te, matched.args[0], relax.const(u, str(u.dtype)), conv.padding, m, conv.layout,
        primfunc_name_hint=f"conv2d_winograd_f{m}",
    )


def _conv_bindings(mod) -> list:
    """Every ``conv2d`` call of ``main`` (then the other Relax functions), in program order."""
    from tvm import relax

    funcs = sorted(
        ((gv.name_hint, f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)),
        key=lambda item: (item[0] != "main", item[0]),
    )
    calls = []
    for _, func in funcs:
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.nn.conv2d":
                    calls.append(value)
    return calls


# ---------------------------------------------------------------------------- pass + verb


class WinogradPass:
    """Module pass rewriting eligible convs (``winograd_pass(config, spec)`` builds it)."""

    def __init__(self, config: Winograd, spec=None):
        self.config = config
        self.spec = spec

    def transform_module(self, mod, ctx):
        from tvm import relax
        from tvm.relax.dpl import rewrite_call

        from ..build import has_sparsity

        calls = _conv_bindings(mod)
        sparse = has_sparsity(mod)

        def index_of(call):
            return next((i for i, c in enumerate(calls) if c.same_as(call)), None)

        bb = relax.BlockBuilder(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                new = rewrite_call(_conv_pattern(), lambda e, _m: _rewrite_conv(e, bb, index_of, self.config, self.spec, sparse), func)
                if not new.same_as(func):
                    bb.update_func(gv, new)
        return bb.get()


def winograd_pass(config: Winograd = Winograd(), spec=None):
    """``WinogradPass`` as a ``tvm.transform.Pass`` (for a ``Sequential``)."""
    import tvm

    return tvm.transform.module_pass(opt_level=0, name="hwc.Winograd")(WinogradPass)(config, spec)


def winograd(mod, config: Winograd = Winograd(), spec=None):
    """Rewrite eligible 3x3 stride-1 conv2d into Winograd kernels with pre-transformed weights.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported (before ``build.legalize``); run ``fold_bn`` first so that
        the folded weights are the ones transformed.
    config : Winograd
    spec : TargetSpec, optional
        The target (passed to ``choose_tile``).

    Returns
    -------
    tvm.IRModule
        A new module: each rewritten conv is a ``call_tir`` of a ``conv2d_winograd_f{m}``
        PrimFunc; its bias / BN / activation / residual consumers stay Relax ops, which
        ``build.legalize``'s fusion puts into the same kernel.
    """
    return winograd_pass(config, spec)(mod)


def winograd_candidates(mod, config: Winograd = Winograd(), spec=None) -> list[dict]:
    """One row per ``conv2d`` of ``mod``: ``index`` (the ``per_layer`` key), ``layout``,
    ``weight`` (OIHW shape), ``out_hw``, and ``tile`` (0: stays direct, None: not eligible)."""
    from ..build import has_sparsity

    rows, sparse = [], has_sparsity(mod)
    for i, call in enumerate(_conv_bindings(mod)):
        conv = _eligible(call) if type(call.args[1]).__name__ == "GenericConst" else None
        row = {"index": i, "weight": tuple(int(d) for d in call.args[1].ty.shape), "layout": str(call.attrs.data_layout)}
        row["out_hw"] = conv.out_hw if conv else None
        row["tile"] = _tile_for(conv, i, config, spec, sparse) if conv else None
        rows.append(row)
    return rows
