"""Inverted-residual blocks (MobileNetV2's expand 1x1 -> depthwise 3x3 -> project 1x1) as one
CPU kernel, the expanded rows kept in a ring buffer.

Run as three kernels, a block writes its expanded tensor (6x the block's input: 1.8-4.8 MB at
MobileNetV2's 56x56-112x112 layers) and reads it back, then the same again for the depthwise
output; in the whole model those layers run ~2x slower than alone (BENCHMARKS.md, issue 3).
Here output rows are made in groups of ``g`` (``rows_per_group``: 1 where the weights are
small): the group's expanded rows ``oy0*s - 1 .. (oy0 + g - 1)*s + 1`` are held in a ring of
``(g - 1)*s + 3`` rows of ``(W + 2, Ce)`` (zero columns for the depthwise padding), a group
computes only the expanded rows it does not share with the previous one, its depthwise rows go
to a ``(g*Wo, Ce)`` buffer, and the projection reads them at once from L1/L2; only the block's
input and output touch memory. Rows are split into bands, one per task of the parallel loop; a
band recomputes the 1-2 expanded rows it shares with its neighbour.

Measured (``tools/bench_blocks.py``, BENCHMARKS.md sessions 10-11): warm and alone, one core,
1.5-1.7x on MobileNetV2's 112x112 block, 1.2-1.4x on its 56x56 ones, even at 28x28; the
smaller blocks (14x14, 7x7: few pixels, large weights read once per group of rows) still lose
to three kernels (0.6-0.85x), hence ``MIN_BYTES``. The register tiles' buffers (``acc``,
``acd``, ``acp``) are stack arrays: declared ``local`` they became workspace memory (TVM puts
only ``global`` allocations of a CPU function on the stack), whose final values LLVM kept live
to the end of the function, and the projection's reduction loop held 7 of its 12 accumulators
on the stack (the stages ran at ~75% of the separate convs' FLOP rate until session 11).

Matched (``FuseInvertedResiduals``, before legalization, NHWC / OHWI float32, batch 1): ::

    e = clip(conv1x1(x, We) + be, lo, hi)            # expand, ReLU6 (any clip)
    d = clip(dwconv3x3(e, Wd, stride s, pad 1) + bd, lo', hi')
    y = conv1x1(d, Wp) + bp  [+ x]                   # project, optional residual

with every intermediate used once, the expanded and output channels multiples of the vector.
Register tiles: ``gemm_tile`` for the two 1x1 convs (pixels x vectors, the accumulators and
their operands within the register file), ``_DW_PIXELS`` pixels x one vector for the depthwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Block", "FuseInvertedResiduals", "block_kernel", "fuse_inverted_residuals", "gemm_tile"]

from .sparse_lower import OPAQUE  # FuseOps adds nothing to a hand-written kernel

KERNEL_NAME = "inverted_residual"
_DW_PIXELS = 7
_SMALL_WEIGHTS = 64 << 10  # expand + project weights below this: one output row per step
_GROUP_BYTES = 256 << 10  # ring + depthwise rows of a group of output rows


@dataclass(frozen=True)
class Block:
    """One fused block: input ``(1, h, w, ci)``, expansion ``ce``, output ``(1, ho, wo, co)``."""

    h: int
    w: int
    ci: int
    ce: int
    co: int
    stride: int
    residual: bool
    clip_e: tuple[float, float] = (0.0, 6.0)
    clip_d: tuple[float, float] = (0.0, 6.0)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.h - 1) // self.stride + 1, (self.w - 1) // self.stride + 1

    @property
    def flops(self) -> int:
        ho, wo = self.out_hw
        return 2 * (self.h * self.w * self.ci * self.ce + ho * wo * self.ce * (9 + self.co))


def gemm_tile(nvecs: int, width: int, regs: int) -> tuple[int, int]:
    """``(vectors, pixels)`` of a 1x1 conv's register tile: ``vectors | nvecs``, the
    accumulators plus one weight register per vector and one broadcast within ``regs``; the
    most FMAs per load (``nv * tx / (nv + tx)``: a 1-vector tile broadcasts once per FMA,
    measured 1.4x slower than 3x3), then the most accumulators."""
    best = None
    for nv in range(1, nvecs + 1):
        if nvecs % nv:
            continue
        tx = min((regs - 1 - nv) // nv, width)
        while tx >= 1 and nv * tx + nv + 1 > regs - 1:  # one register spare: LLVM spilled at 16 of 16
            tx -= 1
        if tx < 1:
            continue
        key = (round(nv * tx / (nv + tx), 3), nv * tx)
        if best is None or key > best[0]:
            best = (key, nv, tx)
    if best is None:
        raise ValueError(f"no register tile for {nvecs} vectors in {regs} registers")
    return best[1], best[2]


def rows_per_group(b: Block, rows: int, budget: int = _GROUP_BYTES) -> int:
    """Output rows computed together: 1 where the block's weights are small (they stay in
    cache from one row to the next); else as many as keep the ring and the depthwise rows
    within ``budget`` bytes, so that the weights are read once per group, not once per row."""
    if 4 * b.ce * (b.ci + b.co) < _SMALL_WEIGHTS:
        return 1
    ho, wo = b.out_hw
    best = 1
    for g in range(1, min(rows, ho) + 1):
        if 4 * b.ce * (((g - 1) * b.stride + 3) * (b.w + 2) + g * wo) <= budget:
            best = g
    return best


def block_kernel(b: Block, lanes: int, regs: int, bands: int, group: int | None = None):
    """PrimFunc ``(x, we[ci, ce], be[ce], wd[9, ce], bd[ce], wp[ce, co], bp[co], y)``;
    ``group``: output rows per step (default ``rows_per_group``)."""
    from tvm.script import tirx as T

    if b.ce % lanes or b.co % lanes:
        raise ValueError(f"{b}: channels not multiples of {lanes}")
    H, W, Ci, Ce, Co, s = b.h, b.w, b.ci, b.ce, b.co, b.stride
    Ho, Wo = b.out_hw
    NE, TX = gemm_tile(Ce // lanes, W, regs)
    NP, TP = gemm_tile(Co // lanes, Wo, regs)
    TD = min(_DW_PIXELS, Wo)
    XT, DT = math.ceil(W / TX), math.ceil(Wo / TD)
    bands = max(1, min(bands, Ho))
    R = math.ceil(Ho / bands)
    bands = math.ceil(Ho / R)
    G = min(group or rows_per_group(b, R), R)
    G = math.ceil(R / math.ceil(R / G))  # as many groups, evened out (4 rows: 2 + 2, not 3 + 1)
    NG = math.ceil(R / G)  # groups per band
    NRB = (G - 1) * s + 3  # ring rows: expanded row iy lives in slot (iy + NRB) % NRB
    WP = W + 2
    V, res = lanes, b.residual
    zero = T.float32(0)
    lo_e, hi_e = (T.Broadcast(T.float32(v), V) for v in b.clip_e)
    lo_d, hi_d = (T.Broadcast(T.float32(v), V) for v in b.clip_d)

    def vec(i):
        return T.Ramp(i * V, 1, V)

    # Expressions of the band t and its group gi (TVMScript has no local scalars here):
    def oy0(t, gi):  # the group's first output row
        return t * R + gi * G

    def rows(t, gi):  # its output rows (the band's last group may have fewer)
        return T.min(G, T.min(t * R + R, Ho) - oy0(t, gi))

    # its expanded rows not already in the ring, [new_first, new_end) (the band's first group: all)
    def new_first(t, gi):
        return oy0(t, gi) * s - 1 + T.if_then_else(gi == 0, 0, 3 - s)

    def new_end(t, gi):
        return (oy0(t, gi) + rows(t, gi) - 1) * s + 2

    def tile(i, size, n):  # first pixel of tile i of a row of n: the last one shifted to end at n
        return T.min(i * size, n - size)

    # A row's last tile is shifted left to end at the row's end (``tile``): it recomputes and
    # rewrites a few pixels of the one before with the same values instead of running a tail
    # loop, and each tile's pixels are one base address plus constants. The projection's
    # pixels run over the group's rows as one (rows x Wo) axis (NHWC rows are contiguous).
    @T.prim_func
    def kernel(
        x: T.Buffer((1, H, W, Ci), "float32"),
        we: T.Buffer((Ci, Ce), "float32"),
        be: T.Buffer((Ce,), "float32"),
        wd: T.Buffer((9, Ce), "float32"),
        bd: T.Buffer((Ce,), "float32"),
        wp: T.Buffer((Ce, Co), "float32"),
        bp: T.Buffer((Co,), "float32"),
        y: T.Buffer((1, Ho, Wo, Co), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xf = T.decl_buffer((H * W, Ci), "float32", data=x.data)
        yf = T.decl_buffer((Ho * Wo, Co), "float32", data=y.data)
        for t in T.parallel(bands):
            ring = T.alloc_buffer((NRB, WP, Ce), "float32")
            d = T.alloc_buffer((G * Wo, Ce), "float32")
            # register tiles: stack arrays LLVM promotes (not scope="local": see the docstring)
            acc = T.alloc_buffer((TX * NE * V,), "float32")
            acd = T.alloc_buffer((TD * V,), "float32")
            acp = T.alloc_buffer((TP * NP * V,), "float32")
            for k in range(NRB):  # the depthwise's zero padding columns
                for c in T.vectorized(Ce):
                    ring[k, 0, c] = zero
                    ring[k, WP - 1, c] = zero
            for gi in range(NG):
                if oy0(t, gi) < T.min(t * R + R, Ho):
                    for iy in range(new_first(t, gi), new_end(t, gi)):
                        if iy < 0 or iy >= H:
                            for px in range(W):
                                for c in T.vectorized(Ce):
                                    ring[(iy + NRB) % NRB, 1 + px, c] = zero
                    for vb in range(Ce // (NE * V)):
                        for iy in range(T.max(new_first(t, gi), 0), T.min(new_end(t, gi), H)):
                            for pt in range(XT):
                                for p in T.unroll(TX):
                                    for v in T.unroll(NE):
                                        acc[vec(p * NE + v)] = be[vec(vb * NE + v)]
                                for c in range(Ci):
                                    for p in T.unroll(TX):
                                        for v in T.unroll(NE):
                                            acc[vec(p * NE + v)] = acc[vec(p * NE + v)] + T.Broadcast(
                                                xf[iy * W + tile(pt, TX, W) + p, c], V
                                            ) * we[c, vec(vb * NE + v)]
                                for p in T.unroll(TX):
                                    for v in T.unroll(NE):
                                        ring[(iy + NRB) % NRB, 1 + tile(pt, TX, W) + p, vec(vb * NE + v)] = T.max(
                                            T.min(acc[vec(p * NE + v)], hi_e), lo_e
                                        )
                    for r in range(rows(t, gi)):
                        for ot in range(DT):
                            for cv in range(Ce // V):
                                for p in T.unroll(TD):
                                    acd[vec(p)] = bd[vec(cv)]
                                for ky in T.unroll(3):
                                    for kx in T.unroll(3):
                                        for p in T.unroll(TD):
                                            acd[vec(p)] = acd[vec(p)] + ring[
                                                ((oy0(t, gi) + r) * s - 1 + ky + NRB) % NRB, (tile(ot, TD, Wo) + p) * s + kx, vec(cv)
                                            ] * wd[ky * 3 + kx, vec(cv)]
                                for p in T.unroll(TD):
                                    d[r * Wo + tile(ot, TD, Wo) + p, vec(cv)] = T.max(T.min(acd[vec(p)], hi_d), lo_d)
                    for vb in range(Co // (NP * V)):
                        for pt in range(T.ceildiv(rows(t, gi) * Wo, TP)):
                            for p in T.unroll(TP):
                                for v in T.unroll(NP):
                                    if res:
                                        acp[vec(p * NP + v)] = bp[vec(vb * NP + v)] + xf[
                                            oy0(t, gi) * Wo + tile(pt, TP, rows(t, gi) * Wo) + p, vec(vb * NP + v)
                                        ]
                                    else:
                                        acp[vec(p * NP + v)] = bp[vec(vb * NP + v)]
                            for c in range(Ce):
                                for p in T.unroll(TP):
                                    for v in T.unroll(NP):
                                        acp[vec(p * NP + v)] = acp[vec(p * NP + v)] + T.Broadcast(
                                            d[tile(pt, TP, rows(t, gi) * Wo) + p, c], V
                                        ) * wp[c, vec(vb * NP + v)]
                            for p in T.unroll(TP):
                                for v in T.unroll(NP):
                                    yf[oy0(t, gi) * Wo + tile(pt, TP, rows(t, gi) * Wo) + p, vec(vb * NP + v)] = acp[vec(p * NP + v)]

    return kernel.with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


# ------------------------------------------------------------------------------ the rewrite


def _patterns():
    """(with residual, without): the DPL patterns of a block, and the named sub-patterns."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    x = wildcard()
    p = {"x": x}
    p["ec"] = is_op("relax.nn.conv2d")(x, is_const())
    p["ea"] = is_op("relax.add")(p["ec"], is_const())
    p["er"] = is_op("relax.clip")(p["ea"], wildcard(), wildcard())
    p["dc"] = is_op("relax.nn.conv2d")(p["er"], is_const())
    p["da"] = is_op("relax.add")(p["dc"], is_const())
    p["dr"] = is_op("relax.clip")(p["da"], wildcard(), wildcard())
    p["pc"] = is_op("relax.nn.conv2d")(p["dr"], is_const())
    p["pa"] = is_op("relax.add")(p["pc"], is_const())
    residual = is_op("relax.add")(x, p["pa"]) | is_op("relax.add")(p["pa"], x)
    return residual, p["pa"], p


def _conv_ok(call, kernel: int, groups_all: bool) -> bool:
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NHWC", "OHWI", "NHWC"):
        return False
    if any(int(d) != 1 for d in a.dilation) or str(call.ty.dtype) != "float32":
        return False
    w = [int(d) for d in call.args[1].ty.shape]
    if w[1:3] != [kernel, kernel]:
        return False
    if kernel == 1:
        return int(a.groups) == 1 and all(int(s) == 1 for s in a.strides) and not any(int(q) for q in a.padding)
    strides = {int(s) for s in a.strides}
    return groups_all and int(a.groups) == w[0] and w[3] == 1 and len(strides) == 1 and strides <= {1, 2} and [int(q) for q in a.padding] == [1] * 4


def _bias(add_call, channels: int) -> np.ndarray | None:
    b = add_call.args[1].value.numpy()
    if b.dtype != np.float32 or b.size != channels or any(d != 1 for d in b.shape[:-1]):
        return None
    return b.reshape(channels)


def _clip(call) -> tuple[float, float]:
    return float(call.args[1].value), float(call.args[2].value)


def _plan(m: dict, residual: bool, lanes: int, min_bytes: int, skip_2to4: bool = False):
    """``(Block, weights)`` for a match, or None where the kernel does not take it, the
    expanded tensor has fewer than ``min_bytes``, or (``skip_2to4``) a 1x1 conv's weight is
    2:4 (``sparse-2-4`` chose it: it runs on its sparse kernel)."""
    from ..analysis import static_shape

    x = m["x"]
    shape = static_shape(x.ty)
    if shape is None or len(shape) != 4 or shape[0] != 1 or str(x.ty.dtype) != "float32":
        return None
    if not (_conv_ok(m["ec"], 1, False) and _conv_ok(m["dc"], 3, True) and _conv_ok(m["pc"], 1, False)):
        return None
    we, wd, wp = (m[k].args[1].value.numpy() for k in ("ec", "dc", "pc"))
    _, h, w, ci = shape
    ce, co = we.shape[0], wp.shape[0]
    if wd.shape[0] != ce or wp.shape[3] != ce or ce % lanes or co % lanes or (residual and co != ci):
        return None
    if 4 * h * w * ce < min_bytes:
        return None
    if skip_2to4:
        from ..passes.sparsity.mask24 import conv_rows, is_2to4

        if is_2to4(conv_rows(we)) or is_2to4(conv_rows(wp)):
            return None
    biases = [_bias(m["ea"], ce), _bias(m["da"], ce), _bias(m["pa"], co)]
    if any(b is None for b in biases):
        return None
    block = Block(h, w, ci, ce, co, int(m["dc"].attrs.strides[0]), residual, _clip(m["er"]), _clip(m["dr"]))
    weights = [
        np.ascontiguousarray(we[:, 0, 0, :].T),  # (ci, ce)
        biases[0],
        np.ascontiguousarray(wd.reshape(ce, 9).T),  # (9, ce), taps ky*3 + kx
        biases[1],
        np.ascontiguousarray(wp[:, 0, 0, :].T),  # (ce, co)
        biases[2],
    ]
    return block, weights


# (consumer, producer): each producer's value must be read by its consumer only (the
# matcher looks through bindings); "res" is the residual add, when there is one
_CHAIN = (("ea", "ec"), ("er", "ea"), ("dc", "er"), ("da", "dc"), ("dr", "da"), ("pc", "dr"), ("pa", "pc"), ("res", "pa"))


class FuseInvertedResiduals:
    """Module pass: each matched block becomes one ``call_tir`` of ``block_kernel``."""

    def __init__(self, lanes: int, regs: int, bands: int, min_bytes: int, skip_2to4: bool = False):
        self.lanes, self.regs, self.bands, self.min_bytes, self.skip_2to4 = lanes, regs, bands, min_bytes, skip_2to4

    def transform_module(self, mod, ctx):
        from tvm import relax
        from tvm.relax.dpl import rewrite_call

        with_res, without_res, named = _patterns()
        bb = relax.BlockBuilder(mod)
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            new = func
            for pattern, residual in ((with_res, True), (without_res, False)):
                new = rewrite_call(pattern, self._rewriter(bb, new, named, residual), new)
            if not new.same_as(func):
                bb.update_func(gv, new)
        return relax.transform.DeadCodeElimination()(bb.get())

    def _rewriter(self, bb, func, named, residual: bool):
        from tvm import relax

        from ..analysis import single_use_checker

        single_use = single_use_checker(func)

        def rewrite(expr, matches):
            if not isinstance(expr, relax.Call):
                return expr
            m = {k: matches[p] for k, p in named.items() if p in matches}
            if residual:
                m["res"] = expr
            for consumer, producer in _CHAIN:
                if consumer in m and not any(single_use(a, m[producer]) for a in m[consumer].args if isinstance(a, relax.Var)):
                    return expr  # an intermediate is read elsewhere: fusing would compute it twice
            plan = _plan(m, residual, self.lanes, self.min_bytes, self.skip_2to4)
            if plan is None:
                return expr
            block, weights = plan
            kernel = block_kernel(block, self.lanes, self.regs, self.bands)
            gvar = bb.add_func(kernel.with_attr("op_pattern", OPAQUE), KERNEL_NAME)
            ho, wo = block.out_hw
            return relax.call_tir(gvar, [m["x"], *(relax.const(w) for w in weights)], relax.TensorType((1, ho, wo, block.co), "float32"))

        return rewrite


# Blocks whose expanded tensor is smaller stay three kernels: from 1.5 MB (MobileNetV2's
# 112x112 and 56x56 blocks) the fused kernel measured faster in the model; at 28x28 and below
# the separate kernels' intermediates stay in cache and they were faster (tools/bench_blocks.py).
MIN_BYTES = 1_500_000


def fuse_inverted_residuals(lanes: int = 8, regs: int = 16, bands: int = 2, min_bytes: int | None = None, skip_2to4: bool = False):
    """``FuseInvertedResiduals`` as a ``tvm.transform.Pass``: blocks whose expanded tensor has
    at least ``min_bytes`` (``skip_2to4``: and no 2:4 1x1 weight, in a ``sparse-2-4`` build)."""
    import tvm

    return tvm.transform.module_pass(opt_level=0, name="hwc.FuseInvertedResiduals")(FuseInvertedResiduals)(
        lanes, regs, bands, MIN_BYTES if min_bytes is None else min_bytes, skip_2to4
    )
