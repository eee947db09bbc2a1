"""The CPU 2:4 sparse GEMM kernels (``backends.cpu_sparse``) against numpy: a dense matmul
with the masked weights (``mask24.decompress``). Tolerance: float32 summation order only,
``|y - ref| <= 1e-5 * (|x| @ |W|.T)`` elementwise. Structure: the x86 kernel's assembly has
the permute (and ``PERMILPS`` its control broadcast from memory); the generic kernel
cross-compiles for aarch64."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress.backends import cpu_sparse as S  # noqa: E402
from hwcompress.backends import cpu_sparse_gemv as G  # noqa: E402
from hwcompress.passes.sparsity import mask24  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

HOST = load_target("host").tvm_target()
needs_avx2 = pytest.mark.skipif(not S.has_avx2(HOST), reason="the x86 sparse kernels need AVX2 + FMA")
RTOL = 1e-5  # relative to sum_k |x| |w|: float32 rounding of a different summation order


def _check(m, n, k, variant, seed=0, pairs=False, target=HOST):
    x, c, y = S.random_operands(m, n, k, seed, pairs)
    assert mask24.pairs_share_positions(c.meta) or not pairs
    dense = mask24.decompress(c)
    args = [tvm.runtime.tensor(a) for a in (x, *S.kernel_operands(variant, c), y)]
    S.build(S.sparse24_kernel(m, n, k, target, variant), target)["main"](*args)
    scale = np.abs(x).astype(np.float64) @ np.abs(dense).T.astype(np.float64)
    err = np.abs(args[-1].numpy() - x.astype(np.float64) @ dense.T.astype(np.float64))
    assert (err <= RTOL * scale + 1e-30).all(), f"{variant.name} {m}x{n}x{k}: max rel err {(err / scale).max():.2e}"


X86_SHAPES = [(1, 64, 64), (1, 96, 128), (1, 30, 48), (49, 32, 256), (3, 8, 64), (17, 10, 32)]


@needs_avx2
@pytest.mark.parametrize("m,n,k", X86_SHAPES)
def test_x86_variants_match_numpy(m, n, k):
    for variant in S.variants(m, n, k, HOST):
        _check(m, n, k, variant)


@needs_avx2
@pytest.mark.parametrize("gather", [S.Gather.PERMPS, S.Gather.PERMILPS])
def test_permute_kernels_on_several_rows_and_odd_chunks(gather):
    # unroll 4 over 3 chunks (k=48): one short tail; rows 3 over n=10: a clamped last block
    _check(5, 10, 48, S.Variant(gather, rows=3, unroll=4, m_rows=2))


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 8, 36), (4, 7, 20), (49, 32, 256)])
def test_generic_matches_numpy(m, n, k):
    _check(m, n, k, S.Variant(S.Gather.GENERIC, rows=1, unroll=1))


@pytest.mark.parametrize("m,n,k", [(9, 8, 36), (49, 12, 64)])
def test_broadcast_matches_numpy_any_k(m, n, k):
    _check(m, n, k, S.Variant(S.Gather.BROADCAST, rows=2, unroll=4, m_rows=4))


@needs_avx2
@pytest.mark.parametrize("lut", [True, False])
@pytest.mark.parametrize("m,n,k,rows,unroll,m_rows", [
    (1, 64, 64, 8, 2, 1),     # k % 16 == 0, whole blocks
    (1, 37, 48, 8, 4, 1),     # odd n: the last pair is row 36 twice; 6 windows over unroll 4: a tail
    (1, 21, 40, 4, 2, 1),     # k % 16 == 8; 5 windows
    (3, 11, 24, 6, 2, 2),     # m > 1: a clamped last m-block
    (2, 5, 8, 2, 1, 2),       # one window
])  # fmt: skip
def test_row_pair_kernel_matches_numpy(m, n, k, rows, unroll, m_rows, lut):
    _check(m, n, k, S.Variant(S.Gather.PAIRS, rows=rows, unroll=unroll, m_rows=m_rows, lut=lut))


def test_row_pair_table_entry_selects_the_kept_positions():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 8)).astype(np.float32)
    c = mask24.compress(w)
    ctl = np.array(G.lut_entry(int(c.meta[0, 0])))
    np.testing.assert_array_equal(w[0, ctl], c.values[0, :4])  # the 4 x a window's kept values multiply


@needs_avx2
@pytest.mark.parametrize("m,n,k,m_rows", [(1, 9, 48, 1), (1, 8, 80, 1), (1, 4, 16, 1), (4, 10, 112, 4), (3, 6, 80, 2)])
def test_permilps_meta_word_on_odd_chunk_counts(m, n, k, m_rows):
    # k/16 odd: the last chunk's control is read from the word that ends at the row's end
    for unroll in (1, 2, 3):
        _check(m, n, k, S.Variant(S.Gather.PERMILPS, rows=4, unroll=unroll, m_rows=m_rows))


@needs_avx2
def test_default_variants_by_shape_class():
    assert S.variants(1, 2048, 2048, HOST)[0].gather is S.Gather.LANES
    assert S.variants(4, 512, 512, HOST)[0] == S.Variant(S.Gather.PERMILPS, 2, 2, 4)
    assert S.variants(49, 512, 2048, HOST)[0].gather is S.Gather.BROADCAST
    assert {S.Gather.PAIRS, S.Gather.PERMILPS} <= {v.gather for v in S.variants(1, 2048, 2048, HOST)}
    assert {v.gather for v in S.variants(1, 64, 40, HOST)} == {S.Gather.LANES, S.Gather.PAIRS}  # k % 16 == 8
    assert {v.gather for v in S.variants(1, 64, 36, HOST)} == {S.Gather.LANES}  # k % 8 == 4
    assert S.Gather.LANES not in {v.gather for v in S.variants(2, 64, 64, HOST)}
    with pytest.raises(ValueError):
        S.sparse24_kernel(1, 8, 36, HOST, S.Variant(S.Gather.PAIRS, rows=2))


def test_variant_named_finds_a_candidate_or_the_default():
    cands = S.variants(1, 256, 512, HOST)
    for v in cands:
        assert S.variant_named(1, 256, 512, HOST, v.name) == v
    assert S.variant_named(1, 256, 512, HOST, None) == cands[0]
    assert S.variant_named(1, 256, 512, HOST, "broadcast_r2_u4_m7") == cands[0]  # not a candidate for m = 1


def test_variants_fall_back_to_generic():
    assert [v.gather for v in S.variants(3, 8, 36, HOST)] == [S.Gather.GENERIC]  # k % 8 != 0, m > 1
    arm = load_target("arm-cortex-a76").tvm_target()
    assert not S.has_avx2(arm)
    assert [v.gather for v in S.variants(1, 64, 64, arm)] == [S.Gather.GENERIC]
    with pytest.raises(ValueError):
        S.sparse24_kernel(1, 8, 36, HOST, S.Variant(S.Gather.PERMPS))
    with pytest.raises(ValueError):
        S.Variant(S.Gather.PERMPS, rows=0)
    with pytest.raises(ValueError):
        S.sparse24_kernel(2, 8, 64, HOST, S.Variant(S.Gather.LANES))  # one row of x only
    with pytest.raises(ValueError):
        S.sparse24_kernel(1, 8, 64, arm, S.Variant(S.Gather.LANES))  # vpermilps: x86


def test_kernel_signature_and_attrs():
    func = S.sparse24_kernel(2, 16, 64, HOST)
    shapes = [tuple(int(d) for d in p.shape) for p in func.params]  # params are the buffers in tirx
    dtypes = [str(p.dtype) for p in func.params]
    assert shapes == [(2, 64), (16, 32), (16, 8), (2, 16)]
    assert dtypes == ["float32", "float32", "uint8", "float32"]
    assert bool(func.attrs["tirx.is_scheduled"]) and "global_symbol" not in func.attrs


@needs_avx2
def test_lane_kernel_signature_and_operands():
    variant = S.Variant(S.Gather.LANES, rows=2, unroll=2)
    func = S.sparse24_kernel(1, 40, 64, HOST, variant)
    assert [tuple(int(d) for d in p.shape) for p in func.params] == [(1, 64), (3, 16, 2, 2, 8), (1, 40)]
    _, c, _ = S.random_operands(1, 40, 64)
    (w,) = S.kernel_operands(variant, c)
    assert w.shape == (3, 16, 2, 2, 8) and w.dtype == np.float32
    assert w.nbytes == 3 * 16 * 2 * 2 * 8 * 4  # 48 rows of 32 values: the 40 real rows use 50% of dense
    np.testing.assert_array_equal(w.reshape(3, 16, 2, 2, 8).transpose(0, 2, 4, 1, 3).reshape(48, 32)[40:], 0)  # padding rows


@needs_avx2
@pytest.mark.parametrize("n,k,rows,unroll", [
    (64, 64, 2, 2),     # whole blocks
    (40, 36, 2, 2),     # n % 16 == 8: a half-padded last block; 9 groups over unroll 2: a tail
    (13, 20, 1, 4),     # n % 8 != 0: lanes past n dropped; 5 groups, unroll 4
    (100, 128, 4, 2),   # 4 row vectors: 2 blocks of 32, the last one 4 rows
    (8, 4, 1, 2),       # one group
])  # fmt: skip
def test_lane_kernel_matches_numpy(n, k, rows, unroll):
    _check(1, n, k, S.Variant(S.Gather.LANES, rows=rows, unroll=unroll))


@needs_avx2
def test_lane_kernel_assembly_gathers_with_the_values_and_prefetches(monkeypatch):
    monkeypatch.setattr("hwcompress.backends.cpu_prefetch.NO_PREFETCH_CPUS", frozenset())  # as on a CPU that prefetches
    asm = S.build(S.sparse24_kernel(1, 256, 512, HOST, S.Variant(S.Gather.LANES, 2, 2)), HOST).inspect_source("asm")
    # the in-lane permute takes the loaded values as its control; the group's x one 128-bit broadcast
    assert re.search(r"vpermilps\s+%ymm\d+, %ymm\d+, %ymm\d+", asm) and "vbroadcastf128" in asm
    assert "prefetcht0" in asm and "vfmadd" in asm
    assert "vpsrlvd" not in asm and "vpsravd" not in asm  # no metadata shifts


@needs_avx2
@pytest.mark.parametrize(
    "gather,insns",
    [(S.Gather.PERMPS, ("vpermps", "vpermd")), (S.Gather.PERMILPS, ("vpermilps",)), (S.Gather.PAIRS, ("vpermps", "vpermd"))],
)
def test_x86_assembly_has_the_permute(gather, insns):
    asm = S.build(S.sparse24_kernel(1, 64, 128, HOST, S.Variant(gather)), HOST).inspect_source("asm")
    # LLVM may pick vpermd (the integer twin of vpermps, same shuffle) for the float permute
    assert any(i in asm for i in insns) and "ymm" in asm and "vfmadd" in asm
    if gather is S.Gather.PERMILPS:  # the control: the meta word broadcast from memory, one shift
        assert re.search(r"vpbroadcastd\s+-?\d*\(", asm) and ("vpsravd" in asm or "vpsrlvd" in asm)


def test_generic_cross_compiles_for_aarch64():
    arm = load_target("arm-cortex-a76").tvm_target()
    func = S.sparse24_kernel(4, 32, 64, arm)
    asm = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=arm).mod.inspect_source("asm")
    assert "ldrb" in asm and ("fmadd" in asm or "fmla" in asm)  # meta bytes read, float MACs


@needs_avx2
def test_call_tir_from_relax():
    m, n, k = 1, 32, 64
    x, c, _ = S.random_operands(m, n, k, seed=3)
    variant = S.variants(m, n, k, HOST)[0]
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [xv]):
        gv = bb.add_func(S.sparse24_kernel(m, n, k, HOST, variant), "sparse24")
        weights = [relax.const(w) for w in S.kernel_operands(variant, c)]
        out = bb.emit(relax.call_tir(gv, [xv, *weights], relax.TensorType((m, n), "float32")))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=HOST), tvm.cpu())
    ref = x @ mask24.decompress(c).T
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-4)


@needs_avx2
def test_pick_variant_returns_a_candidate():
    best, times = S.pick_variant(1, 64, 128, HOST, number=2, repeat=1)
    assert best in S.variants(1, 64, 128, HOST) and set(times) == {v.name for v in S.variants(1, 64, 128, HOST)}


# ---------------------------------------------------------------------------- broadcast GEMM


@pytest.mark.parametrize("m,n,k,k_block", [
    (2, 13, 64, 16),      # m = 2: one m vector, mostly padding; odd n
    (7, 9, 128, 32),      # m < 8, odd n, 4 chunks
    (49, 33, 256, 128),   # 7x7 1x1 conv: the last m vector has one row; odd n, a clamped last block
    (196, 21, 64, 32),    # 14x14: 25 m vectors in 5 blocks of 5
    (49, 12, 36, 0),      # k % 8 != 0: the element-wise x copy, no chunks
    (17, 10, 40, 20),     # k_block not a multiple of 8
])  # fmt: skip
def test_broadcast_k_blocked_matches_numpy(m, n, k, k_block):
    for rows, m_rows in ((2, 7), (3, 4), (1, 1)):
        _check(m, n, k, S.Variant(S.Gather.BROADCAST, rows=rows, unroll=4, m_rows=m_rows, k_block=k_block))


@needs_avx2
@pytest.mark.parametrize("m,n,k", [(2, 13, 64), (7, 9, 128), (49, 33, 512), (196, 21, 64), (8, 24, 1024)])
def test_default_gemm_variants_match_numpy(m, n, k):
    for variant in S.variants(m, n, k, HOST):
        _check(m, n, k, variant)


def test_k_block_keeps_the_x_chunk_in_budget():
    assert S.k_block(64, 56) == 0  # 14 KB: all of k fits
    assert S.k_block(512, 56) == 128 and S.k_block(2048, 56) == 128  # 28 KB chunks
    assert S.k_block(256, 200) == 32  # 25 vectors wide: 25.6 KB
    for k, width in ((512, 56), (2048, 40), (1000, 56), (36, 8000)):
        kb = S.k_block(k, width)
        assert kb == 0 or (k % kb == 0 and kb % 4 == 0)
    with pytest.raises(ValueError):
        S.sparse24_kernel(49, 8, 64, HOST, S.Variant(S.Gather.BROADCAST, k_block=24))  # 24 does not divide 64


@needs_avx2
def test_default_gemm_variant_for_1x1_convs_is_k_blocked_broadcast():
    for m, n, k in ((49, 2048, 512), (49, 512, 2048), (196, 1024, 256)):
        v = S.variants(m, n, k, HOST)[0]
        assert v.gather is S.Gather.BROADCAST and v.k_block and k % v.k_block == 0
        assert v.rows * min(v.m_rows, -(-m // 8)) <= 14  # accumulators fit 16 registers with the broadcast


@needs_avx2
@pytest.mark.parametrize("by_m", [False, True])
def test_broadcast_assembly_keeps_accumulators_in_registers(by_m):
    variant = S.Variant(S.Gather.BROADCAST, 2, 4, 7, k_block=128, by_m=by_m)
    asm = S.build(S.sparse24_kernel(49, 64, 512, HOST, variant), HOST).inspect_source("asm")
    fmas = re.findall(r"vfmadd\w+\s+([^\n]*)", asm)
    # the inner loop: x row from memory (xt), broadcast weight and accumulator in ymm registers
    in_loop = [f for f in fmas if re.fullmatch(r"-?\d*\(%\w+(,%\w+(,\d)?)?\), %ymm\d+, %ymm\d+", f.strip())]
    assert len(in_loop) >= 2 * 7 * 8, fmas[:4]  # 2 rows x 7 vectors x 8 kept weights unrolled
    assert not any("rsp" in f or "rbp)" in f.split(",")[-1] for f in fmas)  # no accumulator on the stack
    assert "vbroadcastss" in asm and "vperm2f128" in asm  # the 8x8 transposes of x and y


@needs_avx2
@pytest.mark.parametrize("m,n,k,variant", [
    (200, 21, 64, S.Variant(S.Gather.BROADCAST, 2, 4, 4, by_m=True)),  # 7 m-blocks x 2 row ranges, n % 8 = 5
    (17, 30, 128, S.Variant(S.Gather.BROADCAST, 3, 2, 2, k_block=32, by_m=True)),  # 3 rows a block, 4 chunks
    (64, 16, 64, S.Variant(S.Gather.BROADCAST, 2, 4, 8, by_m=True)),  # one m-block: tasks over rows only
    (57, 20, 256, S.Variant(S.Gather.BROADCAST, 2, 2, 2, k_block=64, shared=True, tail=True, by_m=True)),
    (196, 40, 256, S.Variant(S.Gather.BROADCAST, 2, 4, 5, k_block=128, shared=True, by_m=True)),
])  # fmt: skip
def test_by_m_kernels_match_numpy(m, n, k, variant):
    """Tasks over m-blocks (each transposing its own x chunks, writing its own rows of y),
    split over ranges of whole 8-row groups when there are fewer blocks than tasks wanted."""
    _check(m, n, k, variant, pairs=variant.shared)


@needs_avx2
@pytest.mark.parametrize("cores", [1, 2, 3, 4])
@pytest.mark.parametrize("m,n,k,variant", [
    (196, 40, 256, S.Variant(S.Gather.BROADCAST, 2, 4, 5, k_block=128, shared=True, by_m=True)),  # 5 blocks: 1-2 cut
    (200, 21, 64, S.Variant(S.Gather.BROADCAST, 2, 4, 4, by_m=True)),  # 7 blocks, n % 8 = 5: empty pieces at 4 cores
    (57, 20, 256, S.Variant(S.Gather.BROADCAST, 2, 2, 2, k_block=64, shared=True, tail=True, by_m=True)),  # 4 blocks + tail row
])  # fmt: skip
def test_by_m_tasks_for_any_core_count(m, n, k, variant, cores):
    """The m-blocks shared among the target's cores: whole blocks per thread, the rest cut into
    row ranges (``by_m_tasks``), for core counts that divide the blocks and that do not."""
    target = tvm.target.Target({**HOST.export(), "num-cores": cores})
    _check(m, n, k, variant, pairs=variant.shared, target=target)


def test_by_m_task_layout():
    from hwcompress.backends.cpu_sparse_gemm import by_m_tasks

    assert by_m_tasks(5, 128, 2, 4) == (2, 1, 64)  # 196 rows, 2 threads: 2 whole blocks each, the 5th halved
    assert by_m_tasks(20, 64, 2, 4) == (10, 0, 64)  # 784 rows: 10 whole blocks each, none cut
    assert by_m_tasks(1, 256, 2, 4) == (0, 1, 128)  # one block: halved
    assert by_m_tasks(5, 10, 4, 4) == (1, 1, 4)  # 10 row blocks in 8-row groups (4 blocks): 4 + 4 + 2 + nothing


def test_by_m_variants_validation_naming_and_order():
    with pytest.raises(ValueError, match="by_m is a broadcast kernel"):
        S.Variant(S.Gather.PERMILPS, 2, 2, 2, by_m=True)
    assert S.Variant(S.Gather.BROADCAST, 2, 4, 5, k_block=128, shared=True, by_m=True).name == "broadcast_r2_u4_m5_kb128_shared_bym"
    with pytest.raises(ValueError, match="multiple of 8"):
        S.sparse24_kernel(64, 8, 48, HOST, S.Variant(S.Gather.BROADCAST, 2, 2, 2, k_block=12, by_m=True))
    if S.has_avx2(HOST):
        # many m-blocks (a 28x28 map): by_m first; one m-block (7x7): none offered
        for pairs in (False, True):
            assert S.variants(784, 128, 512, HOST, pairs)[0].by_m
            assert not any(v.by_m for v in S.variants(49, 512, 2048, HOST, pairs))
        assert not S.variants(98, 256, 1024, HOST)[0].by_m  # 98 rows: 2 m-blocks, by_m second
        assert any(v.by_m for v in S.variants(98, 256, 1024, HOST))


# ------------------------------------------------------------------ pairs (Sparse24.pairs)


@needs_avx2
@pytest.mark.parametrize("m,n,k", [(49, 33, 128), (196, 40, 256), (9, 17, 32), (48, 8, 1024)])
def test_pairs_kernels_match_numpy(m, n, k):
    """Rows 2i, 2i + 1 read the x under the first row's positions: right on weights whose
    pairs share positions (odd n: the last row alone; k_block chunks; m not a multiple of 8)."""
    pairs = [v for v in S.variants(m, n, k, HOST, pairs=True) if v.shared]
    assert pairs and S.variants(m, n, k, HOST, pairs=True)[0].shared  # the default for pair weights
    assert not any(v.shared for v in S.variants(m, n, k, HOST))  # never for other weights
    for variant in pairs:
        _check(m, n, k, variant, pairs=True)
    _check(m, n, k, S.Variant(S.Gather.BROADCAST, 4, 3, 2, shared=True), pairs=True)  # 2 pairs, a tail step
    tails = [v for v in pairs if v.tail]
    assert bool(tails) == (m % 8 == 1 and m > 8)  # odd squares' last row: the default there
    assert not tails or pairs[0].tail


@needs_avx2
@pytest.mark.parametrize("m,n,k,variant", [
    (49, 33, 128, S.Variant(S.Gather.BROADCAST, 4, 3, 2, shared=True, tail=True)),  # 2 pairs, 3 m-blocks, a tail step
    (17, 9, 36, S.Variant(S.Gather.BROADCAST, 2, 2, 1, k_block=12, shared=True, tail=True)),  # chunks of 6 kept values (< 8)
    (57, 20, 1024, S.Variant(S.Gather.BROADCAST, 2, 1, 4, k_block=128, shared=True, tail=True)),  # 8 chunks
])  # fmt: skip
def test_tail_row_kernel_matches_numpy(m, n, k, variant):
    """x's last row (m % 8 == 1) rides along in the pairs' loop: its partial sums live in y's
    last row between reduction chunks, computed with the last m-block only."""
    _check(m, n, k, variant, pairs=True)


def test_pairs_variant_validation_and_naming():
    with pytest.raises(ValueError, match="even number of rows"):
        S.Variant(S.Gather.BROADCAST, 3, 2, 4, shared=True)
    with pytest.raises(ValueError, match="shared is a broadcast kernel"):
        S.Variant(S.Gather.LANES, 2, 2, shared=True)
    v = S.Variant(S.Gather.BROADCAST, 2, 2, 6, k_block=128, shared=True)
    assert v.name == "broadcast_r2_u2_m6_kb128_shared"
    assert S.Variant(S.Gather.BROADCAST, 2, 2, 6, shared=True, tail=True).name == "broadcast_r2_u2_m6_shared_t1"
    with pytest.raises(ValueError, match="tail row needs a shared kernel"):
        S.Variant(S.Gather.BROADCAST, 2, 2, 6, tail=True)
    with pytest.raises(ValueError, match="m % 8 == 1"):
        S.sparse24_kernel(48, 8, 64, HOST, S.Variant(S.Gather.BROADCAST, 2, 2, 6, shared=True, tail=True))
    if S.has_avx2(HOST):  # a pairs name for weights whose pairs do not share: the default
        assert S.variant_named(48, 64, 512, HOST, v.name, pairs=True) == v
        assert not S.variant_named(48, 64, 512, HOST, v.name, pairs=False).shared


@needs_avx2
def test_cpu_backend_runs_the_pairs_kernel_only_on_pair_weights():
    import tvm_ffi

    from hwcompress.backends.cpu import _sparse_kernel

    pairs = S.Variant(S.Gather.BROADCAST, 2, 2, 6, k_block=128, shared=True)
    _, c, _ = S.random_operands(48, 64, 512, pairs=True)
    _, own, _ = S.random_operands(48, 64, 512)
    for weights, expected in ((c, pairs), (own, S.variants(48, 64, 512, HOST)[0])):
        kernel, operands = _sparse_kernel(HOST, 48, 64, 512, mask24.decompress(weights), pairs.name)
        assert tvm_ffi.structural_equal(kernel, S.sparse24_kernel(48, 64, 512, HOST, expected))
        # chunk-major (4 chunks of 128 k): the same bytes as mask24's values and positions
        assert [w.shape for w in operands] == [(4, 64, 64), (4, 64, 16)]
        assert [w.nbytes for w in operands] == [weights.values.nbytes, weights.meta.nbytes]


@needs_avx2
def test_pairs_assembly_loads_each_x_once_for_both_rows():
    """The per-row broadcast kernel's FMAs read x from memory (one load per FMA); the pairs
    kernel loads each x vector into a register and feeds both rows' FMAs from it."""
    asm = S.build(S.sparse24_kernel(48, 64, 512, HOST, S.Variant(S.Gather.BROADCAST, 2, 2, 6, k_block=128, shared=True)), HOST).inspect_source("asm")
    fmas = [f.strip() for f in re.findall(r"vfmadd\w+\s+([^\n]*)", asm)]
    assert len(fmas) >= 2 * 6 * 2 and all(re.fullmatch(r"%ymm\d+, %ymm\d+, %ymm\d+", f) for f in fmas), fmas[:4]


def test_broadcast_kernels_build_for_avx512_targets():
    """The brief's deployment CPU (AVX-512): every broadcast candidate builds for it, the 16-lane
    ones among them (they used to fail to build: a 16-lane ``x`` load in the 8x8 transposes)."""
    avx512 = load_target("x86-avx512").tvm_target()
    for m, pairs in ((49, True), (196, True), (49, False)):
        for variant in S.variants(m, 24, 64, avx512, pairs=pairs):
            if variant.gather is S.Gather.BROADCAST:
                assert "vfmadd" in S.build(S.sparse24_kernel(m, 24, 64, avx512, variant), avx512).inspect_source("asm")


# ------------------------------------------------------------------ 16-lane (AVX-512) kernels


@needs_avx2
@pytest.mark.parametrize("m,n,k,variant", [
    (49, 33, 128, S.Variant(S.Gather.BROADCAST, 2, 4, 6, shared=True, tail=True, wide=True)),  # 7x7: 48 rows + the tail row
    (196, 40, 256, S.Variant(S.Gather.BROADCAST, 2, 4, 4, k_block=128, shared=True, by_m=True, wide=True)),  # 7 blocks, last shifted
    (200, 21, 64, S.Variant(S.Gather.BROADCAST, 2, 2, 2, k_block=32, shared=True, by_m=True, wide=True)),  # n % 8 = 5, 2 chunks
    (40, 17, 96, S.Variant(S.Gather.BROADCAST, 3, 2, 2, wide=True)),  # per-row, 3 rows a block, m past the last vector
])  # fmt: skip
def test_wide_kernels_match_numpy(m, n, k, variant):
    """16-lane accumulators and FMAs (zmm on AVX-512; LLVM splits them into two ymm on an AVX2
    host, so this runs on either)."""
    _check(m, n, k, variant, pairs=variant.shared)


def test_wide_variant_validation_naming_and_offer():
    with pytest.raises(ValueError, match="wide is a broadcast kernel of an even m_rows"):
        S.Variant(S.Gather.BROADCAST, 2, 4, 5, wide=True)
    with pytest.raises(ValueError, match="wide is a broadcast kernel"):
        S.Variant(S.Gather.PERMILPS, 2, 2, 2, wide=True)
    assert S.Variant(S.Gather.BROADCAST, 2, 4, 4, k_block=128, shared=True, by_m=True, wide=True).name == "broadcast_r2_u4_m4_kb128_shared_bym_z"
    with pytest.raises(ValueError, match="even number of 8-row vectors"):  # 20 rows: one block of 3 vectors
        S.sparse24_kernel(20, 8, 64, HOST, S.Variant(S.Gather.BROADCAST, 2, 2, 4, wide=True))
    avx512 = load_target("x86-avx512").tvm_target()
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    assert S.has_avx512(avx512) and not S.has_avx512(avx2)
    for m, n, k in ((3136, 64, 256), (49, 2048, 512), (784, 128, 512)):
        wide = [v for v in S.variants(m, n, k, avx512, pairs=True) if v.wide]
        assert wide and all(v.shared and S.m_blocking(m, v)[2] % 2 == 0 for v in wide)
        assert not S.variants(m, n, k, avx512, pairs=True)[0].wide  # a candidate, not the default
        assert not any(v.wide for v in S.variants(m, n, k, avx512) + S.variants(m, n, k, avx2, pairs=True))


def test_wide_assembly_keeps_zmm_accumulators_in_registers():
    """On an AVX-512 target the 16-lane pairs loop is zmm FMAs on registers only (one x load
    per kept value and vector, shared by the pair's two rows); compiled, not run."""
    avx512 = load_target("x86-avx512").tvm_target()
    variant = S.Variant(S.Gather.BROADCAST, 2, 4, 6, k_block=128, shared=True, wide=True)
    asm = S.build(S.sparse24_kernel(48, 64, 512, avx512, variant), avx512).inspect_source("asm")
    fmas = [f.strip() for f in re.findall(r"vfmadd\w+\s+([^\n]*)", asm)]
    assert len(fmas) >= 2 * 3 * 4 and all(re.fullmatch(r"%zmm\d+, %zmm\d+, %zmm\d+", f) for f in fmas), fmas[:4]


def test_broadcast_weights_are_chunk_major():
    """Chunk c's kept values and positions of every row are contiguous (the rows' sweep over a
    chunk streams them in order): the same bytes as mask24's, reordered; a chunk that is not
    whole meta bytes (k_block % 8 == 4) keeps mask24's row-major form."""
    from hwcompress.backends.cpu_sparse_gemm import pack_chunks

    _, c, _ = S.random_operands(3, 6, 96)
    v = S.Variant(S.Gather.BROADCAST, 2, 2, 1, k_block=32)
    values, meta = S.kernel_operands(v, c)
    assert values.shape == (3, 6, 16) and meta.shape == (3, 6, 4)
    for chunk in range(3):
        np.testing.assert_array_equal(values[chunk], c.values[:, 16 * chunk : 16 * chunk + 16])
        np.testing.assert_array_equal(meta[chunk], c.meta[:, 4 * chunk : 4 * chunk + 4])
    same = pack_chunks(c.values, c.meta, 96, S.Variant(S.Gather.BROADCAST, 2, 2, 1, k_block=12))
    assert same[0] is c.values and same[1] is c.meta
