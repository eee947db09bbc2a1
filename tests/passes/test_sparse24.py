"""sparse-2-4: 2:4 structured sparsity on sparse kernels.

Math (numpy): the mask keeps the 2 largest of every 4 along the reduction axis, the
compressed form round-trips, the permutation search never keeps less magnitude. Structural:
after the pass every chosen layer's weight is 2:4 (a conv's input channels at each tap, a
matmul's K), permuted layers read their input through a ``take``, and the BUILT module runs
those layers in the sparse kernel (no dense conv / matmul kernel left for them). Numerical:
the graph after the pass equals numpy with the masked weights; the built module (sparse
kernels) equals that graph run by TVM's plain dense pipeline (float32 summation order:
rtol 1e-4 of the output scale).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.errors import RecipeError  # noqa: E402
from hwcompress.passes import Sparse24, sparsify  # noqa: E402
from hwcompress.passes.sparsity import mask24, sparsity_report  # noqa: E402
from hwcompress.targets import host_llc_bytes, load_target  # noqa: E402
from hwcompress.verify import host_vm  # noqa: E402
from hwcompress.backends.cpu_sparse import has_avx2  # noqa: E402

HOST = load_target("host")
RTOL = 1e-4  # of max |output|: float32 sums in another order
S_HAS_AVX2 = has_avx2(HOST.tvm_target())


# ------------------------------------------------------------------------------ numpy math


def test_mask_keeps_two_largest_of_every_four():
    w = np.array([[1.0, -5.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0], [2.0, 2.0, -2.0, 1.0, 9.0, 8.0, -7.0, 6.0]], np.float32)
    mask = mask24.mask_2to4(w)
    assert mask.tolist() == [
        [False, True, True, False, True, True, False, False],  # ties and zeros: lowest positions
        [True, True, False, False, True, True, False, False],
    ]
    assert mask.reshape(2, 2, 4).sum(-1).tolist() == [[2, 2], [2, 2]]


def test_compressed_form_round_trips_and_is_half_the_size():
    rng = np.random.default_rng(0)
    for n, k in [(3, 4), (5, 12), (64, 256)]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        c = mask24.compress(w)
        assert c.values.shape == (n, k // 2) and c.meta.shape == (n, (k + 7) // 8) and c.meta.dtype == np.uint8
        np.testing.assert_array_equal(mask24.decompress(c), w * mask24.mask_2to4(w))
        assert mask24.is_2to4(mask24.decompress(c)) and not mask24.is_2to4(w)
    assert c.nbytes / w.nbytes == pytest.approx(0.53125)


def test_meta_layout():
    """Group g's positions i0 < i1 are the nibble i0 | i1 << 2 at bit 4 * (g % 2) of byte g // 2."""
    w = np.zeros((1, 8), np.float32)
    w[0, [1, 3, 4, 6]] = [1, 2, 3, 4]  # group 0 keeps 1, 3; group 1 keeps 0, 2
    c = mask24.compress(w)
    assert c.meta.tolist() == [[(1 | 3 << 2) | (0 | 2 << 2) << 4]]
    assert c.values.tolist() == [[1, 2, 3, 4]]


def test_embedded_positions_are_the_low_mantissa_bits_and_move_values_at_most_2_ulp():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 40)) * 1e3 ** rng.integers(-3, 3, (16, 40))).astype(np.float32)
    w[0, :8] = 0  # whole zero groups: zeros keep bits 0
    w[1, 0], w[1, 1] = np.finfo(np.float32).max, -np.finfo(np.float32).max  # no overflow to inf
    c = mask24.compress(w)
    e = mask24.embed_positions(c)
    pos = mask24.positions(c.meta, c.k).reshape(16, -1)
    kept = c.values != 0
    assert ((e.view(np.uint32) & 3)[kept] == pos[kept]).all()
    assert (e.view(np.uint32)[~kept] == 0).all()
    ulps = np.abs(e.view(np.int32).astype(np.int64) - c.values.view(np.int32).astype(np.int64))
    assert ulps[2:].max() <= 2 and ulps.max() <= 3 and np.isfinite(e).all()  # 3 only next to float max and (np.sign(e) == np.sign(c.values)).all()
    with pytest.raises(ValueError, match="finite"):
        mask24.embed_positions(mask24.compress(np.full((1, 4), np.inf, np.float32)))


def test_permutation_search_keeps_more_and_is_a_permutation():
    rng = np.random.default_rng(1)
    # structured weight: columns of very different scale, badly grouped by the identity order
    w = rng.standard_normal((32, 64)).astype(np.float32) * np.repeat([10.0, 10.0, 10.0, 10.0, 0.1, 0.1, 0.1, 0.1], 8)
    perm = mask24.permutation_search(w, seed=0)
    assert sorted(perm.tolist()) == list(range(64))
    assert mask24.kept_fraction(w, perm) > mask24.kept_fraction(w) + 0.05
    np.testing.assert_array_equal(perm, mask24.permutation_search(w, seed=0))  # reproducible


def test_config_validation():
    with pytest.raises(ValueError, match="decide"):
        Sparse24(decide="sometimes")
    with pytest.raises(ValueError, match="layers"):
        Sparse24(layers="matmul[0]")
    with pytest.raises(ValueError, match="timing must be one of auto, warm, cold"):
        Sparse24(timing="hot")
    with pytest.raises(ValueError, match="pairs must be true or false"):
        Sparse24(pairs="yes")
    assert Sparse24(layers=["matmul[0]"]).layers == ("matmul[0]",)


# ------------------------------------------------------------------------------ the graph


def _model(seed: int = 0):
    """NHWC [1, 6, 6, 16]: conv 1x1 16->32, ReLU, conv 3x3 32->32 (pad 1), ReLU, conv 3x3
    stride 2 32->16 (pad 1), flatten, matmul 144->24 + bias, matmul 24->10."""
    rng = np.random.default_rng(seed)

    def const(*shape):
        return relax.const((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))

    x = relax.Var("x", relax.TensorType([1, 6, 6, 16], "float32"))
    bb = relax.BlockBuilder()
    nhwc = dict(data_layout="NHWC", kernel_layout="OHWI")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, const(32, 1, 1, 16), **nhwc)))
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(y, const(32, 3, 3, 32), padding=1, **nhwc)))
            y = bb.emit(relax.op.nn.conv2d(y, const(16, 3, 3, 32), strides=2, padding=1, **nhwc))
            y = bb.emit(relax.op.reshape(y, [1, 144]))
            y = bb.emit(relax.op.add(relax.op.matmul(y, const(144, 24)), const(24)))
            out = bb.emit_output(relax.op.matmul(y, const(24, 10)))
        bb.emit_func_output(out)
    return bb.get()


def _weights(mod) -> dict[str, np.ndarray]:
    found, counts = {}, {"relax.nn.conv2d": 0, "relax.matmul": 0}

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) in counts:
            name = f"{e.op.name.split('.')[-1]}[{counts[e.op.name]}]"
            counts[e.op.name] += 1
            found[name] = e.args[1].value.numpy()

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _gemm_rows(name, w):
    return mask24.conv_rows(w) if name.startswith("conv") else w.T


def _run(vm, x):
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(5).standard_normal((1, 6, 6, 16)).astype(np.float32)


@pytest.mark.parametrize("permute", [False, True])
def test_every_chosen_layer_is_2to4_and_the_graph_is_the_masked_model(permute, x):
    mod = _model()
    before = _weights(mod)
    out = sparsify(mod, Sparse24(permute=permute, decide="all"), HOST)
    after = _weights(out)
    report = sparsity_report(out)
    by_name = {r["layer"]: r for r in report["layers"]}
    assert set(by_name) == set(before) == set(after)
    for name, w in after.items():
        assert by_name[name]["sparse"], by_name[name]
        assert mask24.is_2to4(_gemm_rows(name, w)), name
        # no weight invented: the kept values are the original's (permuted)
        assert np.isin(w[w != 0], before[name]).all()
        if permute:
            assert by_name[name]["kept_magnitude_permuted"] >= by_name[name]["kept_magnitude"]
    takes = [b for blk in out["main"].body.blocks for b in blk.bindings if getattr(getattr(b.value, "op", None), "name", "") == "relax.take"]
    assert (len(takes) > 0) == permute
    if not permute:  # the graph is the original with the mask applied
        for name, w in before.items():
            rows = _gemm_rows(name, w)
            assert np.array_equal(_gemm_rows(name, after[name]), rows * mask24.mask_2to4(rows))
    # 53% for values + positions; this model's matmuls (24 and 10 outputs) pad to 16-row blocks
    assert report["weight_bytes"]["ratio"] < 0.57


def test_built_module_runs_the_sparse_kernels_and_matches_the_dense_graph(x):
    out = sparsify(_model(), Sparse24(decide="all"), HOST)
    lowered = B.legalize(out, HOST)
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == "relax.call_tir":
            calls.append(e.args[0].name_hint)

    for gv, func in lowered.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    sparse_calls = [c for c in calls if c.startswith("sparse24_gemm")]
    assert len(sparse_calls) == 5, calls  # 3 convs + 2 matmuls, none left as dense kernels
    assert not [c for c in calls if "conv2d" in c or "matmul" in c or "dense" in c], calls
    built = relax.VirtualMachine(B.build(B.default_schedule(lowered, HOST), HOST), tvm.cpu())
    want = _run(host_vm(out), x)  # TVM's plain pipeline: dense kernels on the 2:4 weights
    got = _run(built, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())
    layers = {r["layer"]: r for r in sparsity_report(out)["layers"]}
    if S_HAS_AVX2:  # the batch-1 matmuls run on the lane kernel: values only, rows padded to 16
        assert layers["matmul[0]"]["weight_bytes_sparse"] == 32 * 72 * 4  # 24 rows -> 32, 144 -> 72 values
        assert layers["matmul[1]"]["weight_bytes_sparse"] == 16 * 12 * 4
    assert layers["conv2d[0]"]["weight_bytes_sparse"] < 0.54 * layers["conv2d[0]"]["weight_bytes_dense"]


def test_layers_and_measured_decision(x):
    mod = _model()
    out = sparsify(mod, Sparse24(layers=("matmul[0]",), permute=False), HOST)
    report = sparsity_report(out)
    assert [r["layer"] for r in report["layers"]] == ["matmul[0]"]
    (rec,) = report["layers"]
    assert report["measured"] and rec["dense_ms"] > 0 and rec["sparse_ms"] > 0
    assert rec["sparse"] == (rec["sparse_ms"] * report["min_speedup"] < rec["dense_ms"])
    assert mask24.is_2to4(_weights(out)["matmul[0]"].T) == rec["sparse"]
    # a model far smaller than the last-level cache: its layers are timed warm, as they run
    floats = 32 * 16 + 32 * 9 * 32 + 16 * 9 * 32 + 144 * 24 + 24 + 24 * 10
    assert report["timing"] == {"regime": "warm", "chosen": "auto", "model_weight_bytes": 4 * floats, "llc_bytes": host_llc_bytes()}
    with pytest.raises(RecipeError, match="no layer named conv2d.9."):
        sparsify(mod, Sparse24(layers=("conv2d[9]",)), HOST)


def test_shared_mask_keeps_each_pair_of_channels_on_the_same_positions():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 3, 3, 8))  # OHWI: 5 channels (odd), 9 taps
    rows = mask24.conv_rows(w)
    m = mask24.shared_mask_2to4(rows, 5).reshape(5, 9, 8)
    assert (m.reshape(5, 9, 2, 4).sum(-1) == 2).all()  # every row still 2:4
    assert np.array_equal(m[0], m[1]) and np.array_equal(m[2], m[3])
    assert np.array_equal(m[4], mask24.mask_2to4(rows.reshape(5, 9, 8)[4]))  # the odd one alone
    pair = np.abs(w[0] + 0).reshape(9, 8) + np.abs(w[1]).reshape(9, 8)
    assert np.array_equal(m[0], mask24.mask_2to4(pair))  # chosen by the pair's summed magnitude
    c = mask24.compress((rows * m.reshape(45, 8)).reshape(5, 72).astype(np.float32))
    assert mask24.pairs_share_positions(c.meta)
    assert not mask24.pairs_share_positions(mask24.compress(rows.reshape(5, 72).astype(np.float32)).meta)


@pytest.mark.parametrize("permute", [False, True])
def test_pairs_prunes_every_layer_on_shared_positions(permute):
    mod = _model()
    before = _weights(mod)
    out = sparsify(mod, Sparse24(decide="all", permute=permute, pairs=True), HOST)
    report = sparsity_report(out)
    assert report["pairs"]
    plain = {r["layer"]: r for r in sparsity_report(sparsify(mod, Sparse24(decide="all", permute=permute), HOST))["layers"]}
    for rec in report["layers"]:
        if not rec.get("sparse"):
            continue
        name = rec["layer"]
        w = _weights(out)[name]
        gemm = w.reshape(w.shape[0], -1) if name.startswith("conv") else w.T  # [N, K]: rows = output channels
        assert mask24.is_2to4(gemm) and mask24.pairs_share_positions(mask24.compress(gemm.astype(np.float32)).meta), name
        # the pair's kept magnitude, which the shared positions maximize: at most the per-row one
        assert 0.5 <= rec["kept_magnitude"] <= plain[name]["kept_magnitude"] + 1e-9, name
        if not permute:  # kept weights are the original ones
            mask = gemm != 0
            orig = before[name]
            orig = orig.reshape(orig.shape[0], -1) if name.startswith("conv") else orig.T
            np.testing.assert_array_equal(gemm[mask], orig[mask])


def test_layers_alike_are_measured_once(monkeypatch):
    """Two matmuls of one shape (different weights, each followed by a ReLU) run the same
    kernels: the variant is picked and the pair timed once, the second layer reports the
    first's timings; a third one of that shape without the ReLU (another kernel: the ReLU is
    timed with the layer) is timed on its own, with the variant already picked."""
    from hwcompress.backends import cpu_sparse

    picks, real = [], cpu_sparse.pick_variant
    monkeypatch.setattr(cpu_sparse, "pick_variant", lambda *a, **kw: picks.append(a[:3]) or real(*a, **kw))
    rng = np.random.default_rng(1)
    x = relax.Var("x", relax.TensorType([1, 64], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, relax.const(rng.standard_normal((64, 64)).astype(np.float32)))))
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(y, relax.const(rng.standard_normal((64, 64)).astype(np.float32)))))
            out = bb.emit_output(relax.op.matmul(y, relax.const(rng.standard_normal((64, 64)).astype(np.float32))))
        bb.emit_func_output(out)
    first, second, third = sparsity_report(sparsify(bb.get(), Sparse24(permute=False), HOST))["layers"]
    assert "timed_as" not in first and second["timed_as"] == "matmul[0]" and "timed_as" not in third
    assert (second["dense_ms"], second["sparse_ms"], second["variant"]) == (first["dense_ms"], first["sparse_ms"], first["variant"])
    assert picks == [(1, 64, 64)]  # one GEMM shape: picked once


@pytest.mark.parametrize("choice, regime", [("auto", "cold"), ("cold", "cold"), ("warm", "warm")])
def test_a_model_larger_than_the_last_level_cache_is_timed_cold(monkeypatch, choice, regime):
    """Its layers' weights come from memory on every call in the model (the other layers
    evict them), so the decision times each run after a cache flush of twice the cache;
    ``Sparse24.timing`` overrides that."""
    from hwcompress.passes.sparsity import sparse24

    monkeypatch.setattr("hwcompress.targets.host_llc_bytes", lambda: 4096)  # the model: ~58 KB
    flushes, real = [], sparse24.time_layers

    def spy(modules, spec, rounds=3, flush_bytes=0):
        flushes.append(flush_bytes)
        return real(modules, spec, rounds, flush_bytes)

    monkeypatch.setattr(sparse24, "time_layers", spy)
    report = sparsity_report(sparsify(_model(), Sparse24(layers=("matmul[0]",), permute=False, timing=choice), HOST))
    assert report["timing"]["regime"] == regime and report["timing"]["chosen"] == choice
    assert report["timing"]["llc_bytes"] == 4096 and report["timing"]["model_weight_bytes"] > 4096
    assert flushes == [8192 if regime == "cold" else 0]
    (rec,) = report["layers"]
    assert rec["dense_ms"] > 0 and rec["sparse_ms"] > 0  # TVM's timer ran the runs


@pytest.mark.skipif(not S_HAS_AVX2, reason="the lane kernel variants are x86 AVX2")
def test_the_build_uses_the_kernel_variant_the_decision_measured(monkeypatch):
    """The measured decision names the fastest variant per layer; the build lowers that layer
    with it (here a non-default one, forced, so that a silent fall back to the default shows)."""
    from hwcompress.backends import cpu_sparse

    forced = cpu_sparse.Variant(cpu_sparse.Gather.LANES, rows=4, unroll=2)
    assert forced != cpu_sparse.variants(1, 24, 144, HOST.tvm_target())[0]
    monkeypatch.setattr(cpu_sparse, "pick_variant", lambda m, n, k, target, **kw: (forced, {}))
    monkeypatch.setattr("hwcompress.passes.sparsity.sparse24.MIN_SPEEDUP", 0.0)  # sparse whatever the timing
    out = sparsify(_model(), Sparse24(layers=("matmul[0]",), permute=False), HOST)
    (rec,) = sparsity_report(out)["layers"]
    assert rec["sparse"] and rec["gemm"] == [1, 24, 144] and rec["variant"] == forced.name
    assert B.sparse_variants(out) == {(1, 24, 144): forced.name}
    assert rec["weight_bytes_sparse"] == 32 * 72 * 4  # 4 row vectors: 24 rows padded to 32
    kernels = [f for gv, f in B.legalize(out, HOST).functions_items() if gv.name_hint.startswith("sparse24_gemm")]
    (kernel,) = kernels
    assert [int(d) for d in kernel.params[1].shape] == [1, 36, 4, 2, 8]  # blocks, groups, R = 4, slots, lanes


@pytest.mark.skipif(not S_HAS_AVX2, reason="the pairs kernels are x86 AVX2")
def test_pairs_build_lowers_the_layer_with_the_pairs_kernel(monkeypatch):
    """``pairs=True``: the variant pick times the pairs kernels (on pair-shared weights), and
    the build runs the one picked (here forced) on the layer's weights."""
    import tvm_ffi

    from hwcompress.backends import cpu_sparse
    from hwcompress.backends.sparse_lower import Epilogue

    forced = cpu_sparse.variants(36, 32, 16, HOST.tvm_target(), pairs=True)[1]  # not the default
    assert forced.shared
    asked = []
    monkeypatch.setattr(cpu_sparse, "pick_variant", lambda m, n, k, target, pairs=False, **kw: asked.append(pairs) or (forced, {}))
    monkeypatch.setattr("hwcompress.passes.sparsity.sparse24.MIN_SPEEDUP", 0.0)  # sparse whatever the timing
    out = sparsify(_model(), Sparse24(layers=("conv2d[0]",), permute=False, pairs=True), HOST)
    (rec,) = sparsity_report(out)["layers"]
    assert asked == [True] and rec["sparse"] and rec["variant"] == forced.name and rec["gemm"] == [36, 32, 16]
    (kernel,) = [f for gv, f in B.legalize(out, HOST).functions_items() if gv.name_hint.startswith("sparse24_gemm")]
    relu = Epilogue(lo=0.0)  # the conv's ReLU, in the kernel
    expected = cpu_sparse.sparse24_kernel(36, 32, 16, HOST.tvm_target(), forced, relu)
    assert tvm_ffi.structural_equal(kernel.body, expected.body, map_free_vars=True)
    default = cpu_sparse.sparse24_kernel(36, 32, 16, HOST.tvm_target(), cpu_sparse.variants(36, 32, 16, HOST.tvm_target(), pairs=True)[0], relu)
    assert not tvm_ffi.structural_equal(kernel.body, default.body, map_free_vars=True)  # the check can fail


def test_ineligible_layers_are_reported():
    from hwcompress.passes.sparsity.sparse24 import REPORT_ATTR

    x = relax.Var("x", relax.TensorType([1, 3, 8, 8], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(np.ones((8, 3, 3, 3), np.float32))))  # NCHW, 3 channels
            out = bb.emit_output(relax.op.nn.conv2d(y, relax.const(np.ones((8, 1, 3, 3), np.float32)), groups=8))
        bb.emit_func_output(out)
    out = sparsify(bb.get(), Sparse24(decide="all"), HOST)
    reasons = [r["reason"] for r in json.loads(str(out.attrs[REPORT_ATTR]))["layers"]]
    assert "grouped / depthwise conv" in reasons and any("NCHW layout" in r for r in reasons)
    assert sparsity_report(out)["sparse_layers"] == 0


def test_2to4_weights_without_the_step_stay_dense():
    """Only the technique decides: a module with 2:4 weights that did not go through it (an
    imported, already pruned model) is legalized with the dense kernels."""
    out = sparsify(_model(), Sparse24(decide="all", permute=False), HOST)
    plain = tvm.IRModule(dict(out.functions_items()))  # the same graph, no sparsity report
    assert B.has_sparsity(out) and not B.has_sparsity(plain)
    names = [gv.name_hint for gv in B.legalize(plain, HOST).functions.keys()]
    assert not [n for n in names if n.startswith("sparse24_gemm")], names


@pytest.mark.parametrize("pairs", [False, True])
def test_the_permutation_alone_changes_nothing(monkeypatch, x, pairs):
    """With the mask switched off, the permuted graph computes exactly the original model:
    a layer whose input comes from a conv / matmul through a bias add and ReLU gets it in
    its order from that layer (output channels and bias permuted, ``perm_fold``); the others
    (the model's input; the flattened conv output) read it through a ``take``."""
    from hwcompress.passes.sparsity import sparse24

    monkeypatch.setattr(sparse24, "mask_2to4", lambda w: np.ones(w.shape, bool))
    monkeypatch.setattr(sparse24, "shared_mask_2to4", lambda w, channels: np.ones(w.shape, bool))
    mod = _model()
    out = sparsify(mod, Sparse24(decide="all", permute=True, pairs=pairs), HOST)
    takes = [b.value for blk in out["main"].body.blocks for b in blk.bindings if getattr(getattr(b.value, "op", None), "name", "") == "relax.take"]
    assert len(takes) == 2, takes  # conv2d[0] (the input x) and matmul[0] (after the reshape)
    layers = {r["layer"]: r for r in sparsity_report(out)["layers"]}
    assert [n for n, r in layers.items() if "permutation" in r] == ["conv2d[1]", "conv2d[2]", "matmul[1]"]
    want, got = _run(host_vm(mod), x), _run(host_vm(out), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_int8_decision_measures_int8_kernels_and_needs_a_2_4_int8_kernel():
    """``int8=True`` (an int8 step follows): the layer is timed as uint8 x int8 on both sides,
    the report says so and counts int8 bytes; a target without 2:4 INT8 kernels (CUDA) keeps
    every layer dense with the reason, rather than reporting layers sparse that would run dense."""
    from hwcompress.targets import load_target

    mod = _model()
    report = sparsity_report(sparsify(mod, Sparse24(layers=("matmul[0]",), permute=False, int8=True), HOST))
    (rec,) = report["layers"]
    assert report["int8"] and report["measured"] and rec["dense_ms"] > 0 and rec["sparse_ms"] > 0
    assert rec["weight_bytes_dense"] == 144 * 24 and rec["weight_bytes_sparse"] == 72 * 24 + 18 * 24
    cuda = sparsity_report(sparsify(mod, Sparse24(decide="all", int8=True), load_target("jetson-orin")))
    assert cuda["sparse_layers"] == 0
    assert all("no 2:4 INT8 kernels" in r["reason"] for r in cuda["layers"])
    npu = sparsity_report(sparsify(mod, Sparse24(decide="all", int8=True), load_target("npu-stub")))
    assert npu["sparse_layers"] == 0 and all("2:4" in r["reason"] for r in npu["layers"])  # NPU layers run dense
