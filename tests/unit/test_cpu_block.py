"""The fused inverted-residual kernel (``backends.cpu_block``): the kernel against numpy, and
the rewrite in ``build.legalize`` (which blocks it takes, same outputs as three kernels)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hwcompress.backends.cpu_block import Block, block_kernel, fuse_inverted_residuals, gemm_tile
from asm_loops import fma_loops
from tool_modules import load_tool

RTOL = 1e-5  # float32 sums in another order: max |diff| / max |y|


def _weights(b: Block, seed: int = 0):
    return load_tool("bench_blocks").block_weights(b, seed)


def _reference(b: Block, a: dict) -> np.ndarray:
    """expand -> clip -> depthwise (pad 1) -> clip -> project [+ x], float64."""
    f = {k: v.astype(np.float64) for k, v in a.items()}
    ho, wo, s = *b.out_hw, b.stride
    e = np.clip(f["x"][0] @ f["we"] + f["be"], *b.clip_e)
    ep = np.pad(e, ((1, 1), (1, 1), (0, 0)))
    d = np.zeros((ho, wo, b.ce)) + f["bd"]
    for ky in range(3):
        for kx in range(3):
            d += ep[ky : ky + s * (ho - 1) + 1 : s, kx : kx + s * (wo - 1) + 1 : s] * f["wd"][3 * ky + kx]
    y = np.clip(d, *b.clip_d) @ f["wp"] + f["bp"]
    return (y + f["x"][0] if b.residual else y)[None]


def _run_kernel(b: Block, a: dict, regs: int = 16, bands: int = 2, group: int | None = None) -> np.ndarray:
    import tvm

    from hwcompress.targets import load_target

    func = block_kernel(b, 8, regs, bands, group).with_attr("global_symbol", "blk")
    lib = tvm.compile(tvm.IRModule({"blk": func}), target=load_target("host").tvm_target())
    ho, wo = b.out_hw
    args = [tvm.runtime.tensor(a[k]) for k in ("x", "we", "be", "wd", "bd", "wp", "bp")]
    out = tvm.runtime.tensor(np.full((1, ho, wo, b.co), np.nan, np.float32))
    lib["blk"](*args, out)
    return out.numpy()


@pytest.mark.parametrize(
    "block, bands, group",
    [
        (Block(12, 12, 8, 48, 8, 1, True), 2, 1),  # residual, stride 1, a row at a time
        (Block(12, 12, 8, 48, 8, 1, True), 2, 4),  # at most 4 rows a group: a band's 6 as 3 + 3
        (Block(13, 11, 8, 24, 16, 2, False), 3, 1),  # stride 2, odd sizes: shifted last tiles, 3 bands
        (Block(13, 11, 8, 24, 16, 2, False), 1, 3),  # stride 2 in groups of 3 (7 rows: 3 + 3 + 1)
        (Block(7, 7, 16, 96, 24, 1, False, (0.0, 1.0), (-1.0, 2.0)), 1, 7),  # other clips, the image at once
        (Block(9, 5, 8, 32, 8, 2, False), 8, 2),  # more bands than output rows
        (Block(7, 7, 16, 96, 16, 1, True), 2, 3),  # a group's pixels span rows: tiles cross rows
    ],
)
def test_kernel_matches_numpy(block, bands, group):
    a = _weights(block)
    got, want = _run_kernel(block, a, bands=bands, group=group), _reference(block, a)
    assert got.shape == want.shape and np.isfinite(got).all()  # every output written
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_kernel_with_32_registers():
    """AVX-512 hosts take larger register tiles; the kernel is the same computation."""
    block = Block(10, 10, 8, 48, 16, 1, False)
    a = _weights(block, seed=1)
    assert np.abs(_run_kernel(block, a, regs=32) - _reference(block, a)).max() <= RTOL * np.abs(_reference(block, a)).max()


def test_accumulators_stay_in_registers():
    """The register tiles' buffers are stack arrays that LLVM promotes to registers. Declared
    ``local``, they were workspace memory (TVM 0.27 puts only ``global`` allocations of a CPU
    function on the stack), whose final values LLVM kept live to the function's end: the
    projection's reduction loop then held 7 of its 12 accumulators on the stack (1.1-1.3x
    slower blocks)."""
    import tvm

    from hwcompress.backends.cpu_schedule import CpuFacts
    from hwcompress.targets import load_target

    target = load_target("host").tvm_target()
    if CpuFacts.from_target(target).vector_bits != 256:
        pytest.skip("the tiles checked are AVX2's (16 vector registers)")
    func = block_kernel(Block(56, 56, 24, 144, 24, 1, True), 8, 16, 2).with_attr("global_symbol", "blk")
    asm = tvm.compile(tvm.IRModule({"blk": func}), target=target).mod.inspect_source("asm")
    loops = fma_loops(asm)
    assert len(loops) >= 2, "expected the expand and projection reduction loops"
    for body in loops:
        stack = [x for x in body if "(%rsp)" in x and "ymm" in x]
        assert not stack, "vector stack traffic in a reduction loop:\n" + "\n".join(body)


def test_rows_per_group():
    from hwcompress.backends.cpu_block import rows_per_group

    assert rows_per_group(Block(56, 56, 24, 144, 24, 1, True), 28) == 1  # 28 KB of weights
    g = rows_per_group(Block(7, 7, 160, 960, 320, 1, False), 4)  # 1.8 MB of weights
    assert 1 < g <= 4


def test_gemm_tile_fits_the_register_file():
    for regs in (16, 32):
        for nvecs in (1, 2, 3, 4, 12, 18, 20, 40, 120):
            nv, tx = gemm_tile(nvecs, 56, regs)
            assert nvecs % nv == 0 and nv * tx + nv + 1 <= regs - 1
    assert gemm_tile(18, 56, 16) == (2, 6)  # the 6 x 16 AVX2 SGEMM tile
    assert gemm_tile(3, 56, 16) == (3, 3)  # not one vector x 13 pixels: one broadcast per FMA
    assert gemm_tile(2, 4, 16) == (2, 4)  # no wider than the row


# ------------------------------------------------------------------------------ the rewrite


def _graph(b: Block, a: dict, reuse_expanded: bool = False):
    return load_tool("bench_blocks").block_graph(b, a, reuse_expanded)


def _kernels(mod) -> list[str]:
    import tvm
    from tvm import relax

    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            names.append(re.sub(r"\d+$", "", e.args[0].name_hint))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


def _build_run(mod, x):
    import tvm

    from hwcompress import build as B
    from hwcompress.targets import load_target

    spec = load_target("host")
    out = tvm.relax.VirtualMachine(B.build(B.schedule(mod, spec), spec), tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy()


def _legalize(mod, blocks: bool = True):
    from hwcompress import build as B
    from hwcompress.targets import load_target

    return B.legalize(mod, load_target("host"), blocks=blocks)


@pytest.mark.parametrize("block", [Block(112, 112, 16, 96, 24, 2, False), Block(56, 56, 24, 144, 24, 1, True)])
def test_legalize_fuses_large_blocks_into_one_kernel(block):
    a = _weights(block)
    mod = _graph(block, a)
    fused, separate = _legalize(mod), _legalize(mod, blocks=False)
    assert _kernels(fused) == ["inverted_residual"]
    assert "inverted_residual" not in _kernels(separate) and len(_kernels(separate)) == 3
    got, want = _build_run(fused, a["x"]), _build_run(separate, a["x"])
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    assert np.abs(got - _reference(block, a)).max() <= RTOL * np.abs(want).max()


def test_small_blocks_and_shared_intermediates_stay_separate():
    small = Block(14, 14, 16, 96, 16, 1, True)  # 75 KB expanded: below MIN_BYTES
    assert "inverted_residual" not in _kernels(_legalize(_graph(small, _weights(small))))
    big = Block(56, 56, 24, 144, 24, 1, False)
    assert "inverted_residual" not in _kernels(_legalize(_graph(big, _weights(big), reuse_expanded=True)))
    # the size rule is the pass's parameter: with no minimum the small block fuses
    import tvm

    from hwcompress.targets import load_target

    with load_target("host").tvm_target():
        rewritten = fuse_inverted_residuals(min_bytes=0)(_graph(small, _weights(small)))
    assert any(isinstance(f, tvm.tirx.PrimFunc) for f in rewritten.functions.values())


def test_channels_not_multiples_of_the_vector_stay_separate():
    odd = Block(56, 56, 24, 148, 24, 1, False)
    assert "inverted_residual" not in _kernels(_legalize(_graph(odd, _weights(odd))))


def test_tuning_leaves_the_fused_kernel_alone(tmp_path):
    """A hand-written kernel is no tuning task (MetaSchedule cannot even count its FLOPs)."""
    from hwcompress.targets import load_target
    from hwcompress.tuning import tune_module

    block = Block(56, 56, 24, 144, 24, 1, True)
    mod = _legalize(_graph(block, _weights(block)))
    assert _kernels(mod) == ["inverted_residual"]
    result = tune_module(mod, load_target("host"), 4, tmp_path)
    assert result.tasks == [] and result.trials_run_now == 0


def test_bench_tool_layers_runs():
    rows = load_tool("bench_blocks").bench_layers("host", rounds=1, reps=1, every=False, only=1)
    assert len(rows) == 1 and rows[0]["fused_by_default"] and rows[0]["max_diff"] < 1e-3 and rows[0]["speedup"] > 0


def test_sparse_builds_fuse_the_blocks_without_2to4_weights():
    """After ``sparse-2-4`` a block fuses unless one of its 1x1 convs was made sparse (that one
    keeps its sparse kernel); a measured decision keeps a fused block's convs dense, untimed."""
    from hwcompress.build import BLOCKS_ATTR
    from hwcompress.passes import Sparse24
    from hwcompress.passes.sparsity import sparsify, sparsity_report
    from hwcompress.passes.sparsity.sparse24 import IN_BLOCK
    from hwcompress.targets import load_target

    block = Block(56, 56, 24, 144, 24, 1, True)
    mod, spec = _graph(block, _weights(block)), load_target("host")
    measured = sparsify(mod, Sparse24(), spec)
    report = {r["layer"]: r for r in sparsity_report(measured)["layers"]}
    assert report["conv2d[0]"]["reason"] == report["conv2d[2]"]["reason"] == IN_BLOCK
    assert not any("dense_ms" in r for r in report.values())
    assert _kernels(_legalize(measured)) == ["inverted_residual"]  # a sparse-2-4 build, still fused
    # a build without block kernels: timed like any layer
    unfused = sparsity_report(sparsify(mod.with_attr(BLOCKS_ATTR, False), Sparse24(), spec))["layers"]
    assert all("dense_ms" in r for r in unfused if r["layer"] in ("conv2d[0]", "conv2d[2]"))
    forced = sparsify(mod, Sparse24(layers=("conv2d[2]",), decide="all", permute=False), spec)
    kernels = _kernels(_legalize(forced))
    assert "inverted_residual" not in kernels and any(k.startswith("sparse24_gemm") for k in kernels)
