"""2:4 layers with their epilogue in the kernel (``sparse_lower.fuse_epilogues``,
``cpu_sparse_gemm.broadcast_kernel(epilogue=...)``): the input-channel permutation before
the layer, bias, residual add and ReLU / clamp after it.

Numerical: every broadcast variant with an epilogue against numpy (tolerance: float32
summation order, ``1e-5 * (|x| @ |W|.T)`` plus that of the adds); whole graphs against the
same graph built with dense kernels (``2e-5`` of the output's largest magnitude).
Structural: the built graph has one sparse kernel per layer and no ``take`` / elementwise
kernels where the epilogue was folded."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cpu_sparse as S  # noqa: E402
from hwcompress.backends.cpu_sparse_gemm import permutation_operand  # noqa: E402
from hwcompress.backends.sparse_lower import Epilogue  # noqa: E402
from hwcompress.passes.sparsity import mask24  # noqa: E402
from hwcompress.passes.sparsity.sparse24 import REPORT_ATTR  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

SPEC = load_target("host")
HOST = SPEC.tvm_target()
needs_avx2 = pytest.mark.skipif(not S.has_avx2(HOST), reason="the broadcast kernels are x86 AVX2")
RTOL = 1e-5

FULL = Epilogue(perm=True, bias=True, residual=True, lo=0.0, hi=6.0)
BIAS_RELU = Epilogue(bias=True, lo=0.0)


def _check_kernel(m, n, k, variant, epi, seed=0):
    x, c, _ = S.random_operands(m, n, k, seed, variant.shared)
    rng = np.random.default_rng(seed + 1)
    perm, bias, res = rng.permutation(k), rng.standard_normal(n).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    w = mask24.decompress(c).astype(np.float64)
    xs = x[:, perm] if epi.perm else x
    ref = xs.astype(np.float64) @ w.T + (bias if epi.bias else 0) + (res if epi.residual else 0)
    ref = np.clip(ref, epi.lo if epi.lo is not None else -np.inf, epi.hi if epi.hi is not None else np.inf)
    extra = ([bias] if epi.bias else []) + ([res] if epi.residual else [])
    args = [tvm.runtime.tensor(a) for a in (x, *S.kernel_operands(variant, c, perm if epi.perm else None), *extra, np.zeros((m, n), np.float32))]
    S.build(S.sparse24_kernel(m, n, k, HOST, variant, epi), HOST)["main"](*args)
    scale = np.abs(xs).astype(np.float64) @ np.abs(w).T + 8.0
    err = np.abs(args[-1].numpy() - ref)
    assert (err <= RTOL * scale).all(), f"{variant.name} {m}x{n}x{k} {epi}: max rel err {(err / scale).max():.2e}"


@needs_avx2
@pytest.mark.parametrize(
    "m,n,k,pairs",
    [
        (49, 40, 256, True),  # a tail row (49 = 6 x 8 + 1), reduction chunks, 16-lane copies on AVX-512
        (200, 36, 64, False),  # several m-blocks (by_m gathers its permuted chunks), n % 8 = 4
        (64, 48, 128, True),  # even m-blocks: 16-lane kernels on AVX-512 targets
    ],
)
def test_broadcast_kernels_apply_the_epilogue(m, n, k, pairs):
    candidates = [v for v in S.variants(m, n, k, HOST, pairs) if v.gather is S.Gather.BROADCAST]
    assert candidates
    for variant in candidates:
        for epi in (FULL, BIAS_RELU):
            _check_kernel(m, n, k, variant, epi)


def test_kernels_other_than_broadcast_refuse_an_epilogue():
    with pytest.raises(ValueError, match="no epilogue"):
        S.sparse24_kernel(1, 64, 64, HOST, S.Variant(S.Gather.GENERIC, rows=1, unroll=1), BIAS_RELU)
    with pytest.raises(ValueError, match="no permutation"):
        S.kernel_operands(S.Variant(S.Gather.GENERIC, rows=1, unroll=1), mask24.compress(np.zeros((4, 8), np.float32)), np.arange(8))


def test_permutation_operand_holds_the_inverse():
    perm = np.array([2, 0, 3, 1])
    p = permutation_operand(perm)
    assert p.dtype == np.int32 and (p[0] == perm).all() and (p[0][p[1]] == np.arange(4)).all()


# ---------------------------------------------------------------------------- graphs


def _w24(rng, *shape):
    """An OHWI (or [K, N]) weight, 2:4 along the input channels."""
    w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))
    rows = w.reshape(-1, shape[-1]) if len(shape) == 4 else w.T
    masked = rows * mask24.mask_2to4(rows)
    return masked.reshape(shape) if len(shape) == 4 else np.ascontiguousarray(masked.T)


def _graph(body, shapes):
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


NHWC = dict(data_layout="NHWC", kernel_layout="OHWI")


def _build(mod, sparse: bool):
    if sparse:
        mod = mod.with_attr(REPORT_ATTR, json.dumps({"layers": []}))
    lowered = B.legalize(mod, SPEC)
    return lowered, relax.VirtualMachine(B.build(B.schedule(lowered, SPEC), SPEC), tvm.cpu())


def _calls(lowered) -> list[str]:
    """The kernels ``main`` calls once reshapes are views (as the build makes them)."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(relax.transform.RewriteDataflowReshape()(lowered)["main"], visit)
    return names


def _same_as_dense(mod, shapes):
    rng = np.random.default_rng(3)
    xs = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    lowered, vm = _build(mod, True)
    got = vm["main"](*xs).numpy()
    want = _build(mod, False)[1]["main"](*xs).numpy()
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    return _calls(lowered)


@needs_avx2
def test_a_pointwise_conv_takes_its_permutation_bias_residual_and_relu():
    rng = np.random.default_rng(0)
    perm = rng.permutation(16).astype(np.int64)
    w, bias = _w24(rng, 32, 1, 1, 16), rng.standard_normal((1, 1, 1, 32)).astype(np.float32)

    def body(bb, x, r):
        y = bb.emit(relax.op.take(x, relax.const(perm), axis=3))
        y = bb.emit(relax.op.nn.conv2d(y, relax.const(w), **NHWC))
        y = bb.emit(relax.op.add(y, relax.const(bias)))
        y = bb.emit(relax.op.add(r, y))
        return relax.op.nn.relu(y)

    shapes = [[1, 6, 6, 16], [1, 6, 6, 32]]
    calls = _same_as_dense(_graph(body, shapes), shapes)
    assert [c for c in calls if not c.startswith("reshape")] == ["sparse24_gemm"], calls


@needs_avx2
def test_two_sparse_layers_added_share_one_residual_add():
    """ResNet's downsampling block: two sparse layers' outputs added, then ReLU. The first
    layer's kernel adds the second's output (the second ends at its bias)."""
    rng = np.random.default_rng(1)
    w1, w2 = _w24(rng, 32, 1, 1, 16), _w24(rng, 32, 1, 1, 16)
    b1, b2 = (rng.standard_normal(32).astype(np.float32) for _ in range(2))

    def body(bb, x):
        a = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(w1), **NHWC)), relax.const(b1)))
        b = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(w2), **NHWC)), relax.const(b2)))
        return relax.op.nn.relu(bb.emit(relax.op.add(a, b)))

    calls = _same_as_dense(_graph(body, [[1, 6, 6, 16]]), [[1, 6, 6, 16]])
    assert sorted(c for c in calls if not c.startswith("reshape")) == ["sparse24_gemm", "sparse24_gemm1"], calls


@needs_avx2
def test_a_3x3_conv_reads_its_permutation_in_the_patch_copy():
    rng = np.random.default_rng(2)
    perm = rng.permutation(16).astype(np.int64)
    w = _w24(rng, 32, 3, 3, 16)

    def body(bb, x):
        y = bb.emit(relax.op.take(x, relax.const(perm), axis=3))
        return relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(y, relax.const(w), padding=1, **NHWC)))

    calls = _same_as_dense(_graph(body, [[1, 6, 6, 16]]), [[1, 6, 6, 16]])
    assert sorted(c for c in calls if not c.startswith("reshape")) == ["im2col", "sparse24_gemm"], calls


def test_a_layer_whose_kernel_takes_no_epilogue_keeps_its_ops():
    """A batch-1 matmul (the GEMV kernels take no epilogue): the bias add stays its own
    kernel, and the result is right."""
    rng = np.random.default_rng(4)
    w, bias = _w24(rng, 64, 32), rng.standard_normal(32).astype(np.float32)

    def body(bb, x):
        return relax.op.add(bb.emit(relax.op.matmul(x, relax.const(w))), relax.const(bias))

    calls = _same_as_dense(_graph(body, [[1, 64]]), [[1, 64]])
    assert "sparse24_gemm" in calls and len(calls) == 2, calls
