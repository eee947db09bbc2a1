"""Conv layout: run the 2D convolutions (and the ops between them) in NHWC or blocked NCHW{b}c.

ONNX imports every conv as ``NCHW`` / ``OIHW``. ``convert_layout(mod, ConvLayout("NHWC"))``
rewrites them with TVM's ``relax.transform.ConvertLayout``, which propagates the new layout
through the elementwise ops, pools, reductions and residual adds that follow, and inserts a
transpose only where an op cannot follow (the graph's input and output, a flatten before the
classifier, an op without layout inference). Then ``FoldConstant`` turns the weight
transposes into new constants, so after the pass:

* every ``conv2d`` has the requested layout (kernel ``OHWI`` for NHWC, ``OIHW{b}i{b}o`` for
  ``NCHW{b}c``), its weight a constant;
* consecutive convs hand each other their activations directly: the inserted activation
  transposes cancel inside the graph and remain only at its edges;
* the arithmetic is unchanged (another memory order; float sums may round differently).

Details the pass handles:

* ``Clip`` (ReLU6): the importer emits it as two ``call_tir``, and ``R.clip`` has no layout
  inference in TVM 0.27; either would cost two transposes per activation (70 in MobileNetV2).
  The pass rewrites it to ``minimum(maximum(x, lo), hi)`` with scalar constants, which
  follow any layout, and back to ``R.clip`` afterwards (the ``fuse`` patterns look for it).
* Quantized graphs (an imported QDQ / QOperator model, ``quantize/qdq.py``): ``quantize``,
  ``dequantize`` and ``pad`` have no layout inference either, which left a transpose on each
  side of every integer conv (ResNet-18 QDQ: 37 transposes instead of the 2 at the edges, the
  requantization in a kernel of its own). ``layout_qdq`` splits the two ops into the
  elementwise arithmetic of their legalization (per-channel parameters as ``[1, C, 1, 1]``
  constants, so their axis follows the layout; bit-exact), joins them back afterwards and
  moves a zero-point ``pad`` inside the transposes around it: the integer convs of ResNet-18
  QDQ hand each other NHWC uint8 tensors and take their requantization as epilogue.
* Constant weights, biases and scales are reshaped / transposed in numpy before
  ``FoldConstant``, which would compile a kernel per shape (ResNet-18 QDQ's ``import_model``:
  about 7 s -> 2 s).
* ``NCHW{b}c``: ``ConvertLayout`` accepts it, but TVM 0.27's ``LegalizeOps`` leaves a blocked
  ``conv2d`` a Relax op (no TIR), so each one becomes a ``call_tir`` of our own TE compute
  (``conv2d_nchwc_te``, TOPI's ``conv2d_NCHWc`` without its need for a current target).
  Only channel counts divisible by ``b`` can be blocked: the first conv (3 input channels)
  and every grouped / depthwise conv stay ``NCHW`` with a layout transform on each side
  (``ConvertLayout`` does not block a kernel's input-channel axis of 1). Blocked convs are
  TE kernels, so the Winograd pass, which rewrites ``conv2d`` ops, finds none of them.

Only bindings inside dataflow blocks are rewritten (``ConvertLayout``'s scope); the ONNX
importer puts the whole graph in one. Run it on the imported module before ``fuse`` (whose
groups hide the convs) and before ``winograd`` (which accepts NHWC convs and then needs no
transposes of its own); ``optimize.effective_recipe`` places it so.

Which layout is fastest depends on the kernels' schedules: ``tools/bench_layout.py``
measures it, and ``[hardware].conv_layout`` in the target spec records the choice. With the
default CPU schedules on the 2-core x86 host (AVX2), speedups over NCHW: ResNet-18 NHWC 1.13x
without / 1.07x with Winograd, NCHW8c 1.33x without Winograd (0.81x against NCHW + Winograd,
which it excludes); MobileNetV2 NHWC 1.35x, NCHW8c 1.06x (its depthwise convs stay NCHW).
So the CPU targets use NHWC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..targets import DataLayout
from . import layout_qdq as qdq

__all__ = ["ConvLayout", "ConvLayoutPass", "DataLayout", "block_size", "conv2d_nchwc_te", "convert_layout", "kernel_layout"]


def block_size(layout: DataLayout) -> int | None:
    """Channels per block of a blocked layout (``NCHW8c`` -> 8), None for ``NCHW`` / ``NHWC``."""
    m = re.fullmatch(r"NCHW(\d+)c", DataLayout(layout).value)
    return int(m.group(1)) if m else None


def kernel_layout(layout: DataLayout) -> str:
    """The weight layout paired with an activation layout.

    ``OHWI`` for NHWC: with hwcompress's default CPU schedules, ResNet-18 (224x224, batch 1,
    no Winograd) ran in 91 ms with OHWI weights and 142 ms with HWIO (one interleaved
    measurement on the 2-core x86 host; NCHW/OIHW: 85 ms in the same run).
    """
    layout = DataLayout(layout)
    b = block_size(layout)
    if b:
        return f"OIHW{b}i{b}o"
    return {DataLayout.NCHW: "OIHW", DataLayout.NHWC: "OHWI"}[layout]


@dataclass(frozen=True)
class ConvLayout:
    """Run 2D convolutions in ``layout``.

    Parameters
    ----------
    layout : DataLayout or str
        ``NHWC``, ``NCHW4c`` / ``NCHW8c`` / ``NCHW16c`` (blocked), or ``NCHW`` (the import
        layout: converts convs that are not NCHW back).
    """

    layout: DataLayout = DataLayout.NHWC

    def __post_init__(self):
        try:
            object.__setattr__(self, "layout", DataLayout(self.layout))
        except ValueError:
            choices = ", ".join(k.value for k in DataLayout)
            raise ValueError(f"ConvLayout.layout must be one of {choices}, got {self.layout!r}") from None


# ---------------------------------------------------------------------------- Clip <-> min/max


def _clip_pattern():
    from tvm.relax.dpl import is_op, wildcard

    return is_op("relax.clip")(wildcard(), wildcard(), wildcard())


def _split_clip(call, _m):
    """``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` with scalar constants: binary
    elementwise ops have layout inference, ``R.clip`` has none."""
    from tvm import relax

    x, lo, hi = call.args
    dtype = str(x.ty.dtype)
    lo, hi = (relax.const(float(getattr(bound.value, "value", bound.value)), dtype) for bound in (lo, hi))
    return relax.op.minimum(relax.op.maximum(x, lo), hi)


def _minmax_pattern():
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, lo, hi = wildcard(), is_const(), is_const()
    return is_op("relax.minimum")(is_op("relax.maximum")(x, lo), hi), (x, lo, hi)


def _join_clip(call, m, parts):
    """``minimum(maximum(x, lo), hi)`` with scalar constants -> ``clip(x, lo, hi)``."""
    from tvm import relax

    x, lo, hi = (m[p] for p in parts)
    bounds = [c.value.numpy() for c in (lo, hi)]
    if any(b.ndim != 0 for b in bounds) or str(lo.ty.dtype) != str(x.ty.dtype) or bounds[0] > bounds[1]:
        return call
    return relax.op.clip(x, relax.prim_value(float(bounds[0])), relax.prim_value(float(bounds[1])))


def _const_move_patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.reshape")(is_const(), wildcard()), is_op("relax.permute_dims")(is_const())


def _move_const(call, _m):
    """``reshape`` / ``permute_dims`` of a constant (a weight, a bias, a per-channel scale)
    done in numpy: ``FoldConstant`` would compile a kernel for each shape (~0.3 s each, most
    of a ResNet-18 QDQ model's import time)."""
    from tvm import relax

    value = call.args[0].value.numpy()
    if call.op.name == "relax.reshape":
        return relax.const(value.reshape([int(d) for d in call.ty.shape.values]), str(call.ty.dtype))
    axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
    return relax.const(np.ascontiguousarray(value.transpose(axes)), str(call.ty.dtype))


# ---------------------------------------------------------------------------- blocked conv compute


def conv2d_nchwc_te(data, kernel, strides, padding, dilation, out_dtype: str):
    """Blocked conv2d: ``data [N, C/b, H, W, b]``, ``kernel [O/bo, C/b, KH, KW, b, bo]`` ->
    ``[N, O/bo, OH, OW, bo]`` (groups 1; ``padding`` is top, left, bottom, right).

    The input-channel reduction is two axes (block, lane) so that every index is affine:
    the default CPU schedule rules analyse loads by their index expressions.
    """
    from tvm import te, topi

    n, icc, ih, iw, icb = data.shape
    occ, _, kh, kw, _, ocb = kernel.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    oh = (ih + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (iw + pl + pr - (kw - 1) * dw - 1) // sw + 1
    padded = topi.nn.pad(data, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0), name="data_pad") if any((pt, pl, pb, pr)) else data
    rc = te.reduce_axis((0, icc), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rb = te.reduce_axis((0, icb), name="rb")
    return te.compute(
        (n, occ, oh, ow, ocb),
        lambda b, oc, y, x, ob: te.sum(
            padded[b, rc, y * sh + ry * dh, x * sw + rx * dw, rb].astype(out_dtype)
            * kernel[oc, rc, ry, rx, rb, ob].astype(out_dtype),
            axis=[rc, ry, rx, rb],
        ),
        name="conv2d_NCHWc",
        tag="conv2d_NCHWc",
    )


def _conv_pattern():
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.nn.conv2d")(wildcard(), is_const())


def _blocked_conv(call, bb, layout: DataLayout):
    """Rewriter: a blocked ``conv2d`` (which ``LegalizeOps`` cannot lower) as a ``call_tir``
    of ``conv2d_nchwc_te``; anything else unchanged."""
    attrs = call.attrs
    data_layout = str(attrs.data_layout)
    if data_layout != layout.value or str(attrs.out_layout or data_layout) != data_layout:
        return call
    if str(attrs.kernel_layout) != kernel_layout(layout) or int(attrs.groups) != 1:
        return call
    padding = [int(p) for p in attrs.padding]
    if len(padding) == 2:
        padding = padding * 2
    out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void") else str(call.args[0].ty.dtype)
    return bb.call_te(
        conv2d_nchwc_te, call.args[0], call.args[1],
        [int(s) for s in attrs.strides], padding, [int(d) for d in attrs.dilation], out_dtype,
        primfunc_name_hint=f"conv2d_{layout.value}",
    )


# ---------------------------------------------------------------------------- pass + verb


class ConvLayoutPass:
    """Module pass converting conv layouts (``conv_layout_pass(config)`` builds it)."""

    def __init__(self, config: ConvLayout):
        self.config = config

    def transform_module(self, mod, ctx):
        from tvm import relax

        from .fuse import canonicalize_clip

        layout = self.config.layout
        mod = _rewrite_functions(canonicalize_clip(mod), lambda bb: (_clip_pattern(), _split_clip))
        for split in (qdq.quantize_split, qdq.dequantize_split):
            mod = _rewrite_functions(mod, lambda bb, split=split: split())
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [layout.value, kernel_layout(layout)]})(mod)
        mod = relax.transform.FoldConstant()(fold_const_moves(mod))
        if block_size(layout):
            mod = _rewrite_functions(mod, lambda bb: (_conv_pattern(), lambda call, _m: _blocked_conv(call, bb, layout)))
        for join in (qdq.pad_through_transposes, qdq.dequantize_join, qdq.quantize_join):
            mod = _rewrite_functions(mod, lambda bb, join=join: join())
        pattern, parts = _minmax_pattern()
        mod = _rewrite_functions(mod, lambda bb: (pattern, lambda call, m: _join_clip(call, m, parts)))
        # ConvertLayout transforms a tensor once per use (the input of a residual block twice)
        return relax.transform.DeadCodeElimination()(relax.transform.EliminateCommonSubexpr()(mod))


def fold_const_moves(mod):
    """``mod`` with every ``reshape`` / ``permute_dims`` of a constant done in numpy (a Gemm's
    transposed weight becomes a constant again, which passes that take constant weights need)."""
    for moved in _const_move_patterns():  # reshape first: a bias is reshaped, then permuted
        mod = _rewrite_functions(mod, lambda bb, moved=moved: (moved, _move_const))
    return mod


def _rewrite_functions(mod, make):
    """``rewrite_call`` over every Relax function; ``make(bb)`` gives (pattern, rewriter)."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    bb = relax.BlockBuilder(mod)
    pattern, rewriter = make(bb)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            new = rewrite_call(pattern, rewriter, func)
            if not new.same_as(func):
                bb.update_func(gv, relax.analysis.remove_all_unused(new))
    return bb.get()


def conv_layout_pass(config: ConvLayout = ConvLayout()):
    """``ConvLayoutPass`` as a ``tvm.transform.Pass`` (for a ``Sequential``)."""
    import tvm

    return tvm.transform.module_pass(opt_level=0, name="hwc.ConvLayout")(ConvLayoutPass)(config)


def convert_layout(mod, config: ConvLayout = ConvLayout()):
    """Run every 2D convolution of ``mod`` in ``config.layout``.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported (run ``fold_bn`` first; before ``fuse`` and ``winograd``).
    config : ConvLayout

    Returns
    -------
    tvm.IRModule
        A new module: convs in the requested layout with constant weights, activation
        transposes only at the graph's edges and around ops without layout inference;
        blocked convs are ``call_tir`` of ``conv2d_NCHW{b}c`` kernels.
    """
    return conv_layout_pass(config)(mod)
