"""Default CUDA schedule of the Winograd conv kernels that ``passes.winograd`` emits.

dlight has no rule for a kernel of chained reductions: ``GeneralReduction`` either raises or
puts every intermediate into shared memory (over a megabyte for ResNet-18's layers: ptxas
refuses it). This rule, first in the CUDA backend's list, makes each stage its own launch with
the intermediates in global memory:

* each transform (``data_pack_rows`` -> ``data_pack``, ``inverse_rows`` -> ``inverse``): one
  launch, a thread per (tile, channel) holding the first product's alpha x alpha values in
  registers, every loop unrolled (the padding and the constant ``A``/``B`` inlined);
* ``bgemm``: alpha^2 GEMMs in one launch (``blockIdx.z``), each block a ``_TILE_P x _TILE_O``
  output tile (``_THREADS_P x _THREADS_O`` threads, ``_VEC_P x _VEC_O`` outputs per thread in
  registers), the reduction in steps of ``_STEP_K`` through shared memory;
* the output gather with the epilogue (bias, residual add, activation) inlined.
"""

from __future__ import annotations

from ..passes.winograd_te import STAGE_ATTR

_THREADS_P, _VEC_P = 8, 4  # bgemm: tile rows (Winograd tiles) per block = 32
_THREADS_O, _VEC_O = 16, 4  # bgemm: tile columns (output channels) per block = 64
_STEP_K = 16  # bgemm: input channels per shared-memory step
_THREADS = 256  # threads per block of the elementwise-like stages
_STAGES = ("data_pad", "data_pack_rows", "data_pack", "bgemm", "inverse_rows", "inverse")


def winograd_rule():
    """A dlight rule: schedules a fused Winograd kernel, declines (None) anything else."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class CudaWinograd(GPUScheduleRule):
        def apply(self, func, target, tunable):
            import tvm

            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            return schedule_winograd(tvm.s_tir.Schedule(func))

        def __repr__(self):
            return "CudaWinograd"

    return CudaWinograd()


def schedule_winograd(sch):
    """``sch`` scheduled for CUDA, or None if it holds no (complete) Winograd kernel."""
    from tvm.s_tir.dlight.analysis import get_root_block

    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(get_root_block(sch))}
    stages = {str(sch.get(b).annotations[STAGE_ATTR]): b for b in blocks.values() if STAGE_ATTR in sch.get(b).annotations}
    if not set(_STAGES) <= set(stages) or "conv2d_winograd" not in blocks:
        return None
    for name in ("A", "B", "input_tile"):
        sch.compute_inline(blocks[name])
    sch.compute_inline(stages["data_pad"])
    _transform(sch, stages["data_pack"], stages["data_pack_rows"])
    _transform(sch, stages["inverse"], stages["inverse_rows"])
    _schedule_bgemm(sch, stages["bgemm"])
    _inline_epilogue(sch, blocks["conv2d_winograd"])
    for block in sch.get_child_blocks(get_root_block(sch)):
        if not any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block)):
            _one_thread_per_output(sch, block, unroll_reduction=False)
    return sch


def _transform(sch, second, first) -> None:
    """Both one-sided products of a transform in one launch: a thread per (tile, channel)
    computes ``first``'s alpha x alpha values in registers, then its ``second`` outputs."""
    a, b, p, c, r = sch.get_loops(second)
    sch.reorder(p, c, a, b, r)
    bx, tx = sch.split(sch.fuse(p, c), factors=[None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for loop in (a, b, r):
        sch.unroll(loop)
    sch.set_scope(first, 0, "local")
    sch.compute_at(first, tx)
    for loop in sch.get_loops(first)[2:]:
        sch.unroll(loop)


def _inline_epilogue(sch, out) -> None:
    """The chain of elementwise consumers of ``out`` (bias, residual add, activation) into it."""
    from tvm.s_tir.schedule import ScheduleError

    while len(consumers := sch.get_consumers(out)) == 1:
        try:
            sch.reverse_compute_inline(consumers[0])
        except ScheduleError:
            return


def _one_thread_per_output(sch, block, unroll_reduction: bool) -> None:
    """Spatial loops fused and spread over blocks of ``_THREADS`` threads; the reduction loop
    (the block's last, if any) stays inside the thread, unrolled where asked."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == 0]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind != 0]
    sch.reorder(*spatial, *reduce)
    bx, tx = sch.split(sch.fuse(*spatial), factors=[None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if reduce and unroll_reduction:
        sch.unroll(reduce[-1])


def _schedule_bgemm(sch, block) -> None:
    """Batched GEMM ``bgemm[e, n, p, o] = sum_k data_pack[e, n, p, k] * weight[e, n, ..., k, ...]``
    as a shared-memory-tiled GEMM per (e, n)."""
    eps, nu, p, o, k = sch.get_loops(block)
    p_block, p_thread, p_vec = sch.split(p, factors=[None, _THREADS_P, _VEC_P])
    o_block, o_thread, o_vec = sch.split(o, factors=[None, _THREADS_O, _VEC_O])
    k_step, k_inner = sch.split(k, factors=[None, _STEP_K])
    batch = sch.fuse(eps, nu)
    sch.reorder(batch, p_block, o_block, p_thread, o_thread, k_step, k_inner, p_vec, o_vec)
    sch.bind(batch, "blockIdx.z")
    sch.bind(p_block, "blockIdx.y")
    sch.bind(o_block, "blockIdx.x")
    sch.bind(p_thread, "threadIdx.y")
    sch.bind(o_thread, "threadIdx.x")
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, o_thread)
    for index in (0, 1):  # the data tile and the weight tile, staged through shared memory
        shared = sch.cache_read(block, index, "shared")
        sch.compute_at(shared, k_step)
        loops = sch.get_loops(shared)
        own = loops[[sch.get(loop) for loop in loops].index(sch.get(k_step)) + 1 :]
        fused = sch.fuse(*own)
        _ty, _tx = sch.split(fused, factors=[None, _THREADS_P, _THREADS_O])[1:]
        sch.bind(_ty, "threadIdx.y")
        sch.bind(_tx, "threadIdx.x")
    sch.decompose_reduction(block, k_step)
    sch.unroll(k_inner)

