"""The rules ``default_cpu_schedule`` (in ``cpu_schedule``) tries.

``tiled_reduction``: one multiply-accumulate / max / sum reduction block (conv2d incl.
depthwise and grouped, matmul / dense / GEMV, pooling) with injective producers (padding)
and an elementwise epilogue (bias, BN arithmetic, relu, residual add). The output is
register-tiled (``u`` x ``v``: ``v`` vectorized with the target's lanes, both unrolled),
the reduction loops stay outside the tile, the accumulator is a small ``local`` buffer
(``cache_write``, laid out with ``v`` innermost so LLVM keeps it in registers), the epilogue
is inlined into the write-back, and a weight-like operand that would be read with a stride
along ``v`` is repacked (``cache_read`` + ``transform_layout``) once per call.

``per_block``: inline injective producers (unless ``inline=False``), then parallelize the
outer spatial loops and vectorize the innermost spatial loop of every remaining block
(softmax, mean, transpose, reshape, pad, elementwise).

A rule takes a fresh ``Schedule`` and the ``CpuFacts`` and returns False when it does not fit;
otherwise it yields a schedule equivalent to the input or raises (the primitives check legality).
``tiled_reduction`` lives in ``cpu_tiled``; the loop-nest analysis and the helpers both rules
use, in ``cpu_nest``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import attempt
from .cpu_nest import _has_reduction, _root_blocks, _schedule_block
from .cpu_tiled import tiled_reduction

if TYPE_CHECKING:
    from .cpu_schedule import CpuFacts

__all__ = ["per_block", "tiled_reduction"]


def per_block(sch, facts: CpuFacts, inline: bool = True) -> bool:
    """Inline injective producers, then parallelize + vectorize each remaining loop nest."""
    if inline:
        for block in reversed(_root_blocks(sch)[:-1]):
            if not _has_reduction(sch.get(block)):
                attempt(sch.compute_inline, block)
    for block in _root_blocks(sch):
        _schedule_block(sch, block, facts)
    return True
