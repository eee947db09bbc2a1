"""The NPU stub's cycle estimate from the target's ``[npu]`` cost model (formula in
``docs/npu-command-stream.md``, section "Cost model")."""

from __future__ import annotations

import math

from .program import AvgPool2D, Conv2D, Dense, MaxPool2D, Program


def _round_up(x: int, m: int) -> int:
    return -(-x // max(1, m)) * max(1, m)


def command_cycles(program: Program, npu) -> list[int]:
    """Estimated cycles of each command on ``npu`` (a ``targets.Npu``); see the doc's cost model.

    ``max(ceil(MACs_eff / macs_per_cycle), ceil(bytes / bytes_per_cycle))`` where ``MACs_eff``
    pads channel counts up to the NPU's channel multiples (idle MAC lanes still cost cycles).
    """
    if npu.macs_per_cycle <= 0 or npu.bytes_per_cycle <= 0:
        raise ValueError("npu cost model needs macs_per_cycle > 0 and bytes_per_cycle > 0")
    t, icm, ocm = program.tensors, npu.in_channel_multiple, npu.out_channel_multiple
    out = []
    for cmd in program.commands:
        o = t[cmd.output].shape
        if isinstance(cmd, Conv2D):
            co, kh, kw, ci = t[cmd.weight].shape
            g = cmd.groups
            if g > 1 and ci == 1 and co == g:  # depthwise: channels map to the output lanes
                macs = o[0] * o[1] * o[2] * _round_up(co, ocm) * kh * kw
            else:
                macs = o[0] * o[1] * o[2] * g * _round_up(co // g, ocm) * kh * kw * _round_up(ci, icm)
        elif isinstance(cmd, Dense):
            co, ci = t[cmd.weight].shape
            macs = o[0] * _round_up(co, ocm) * _round_up(ci, icm)
        elif isinstance(cmd, (MaxPool2D, AvgPool2D)):
            macs = o[0] * o[1] * o[2] * _round_up(o[3], ocm) * cmd.kernel[0] * cmd.kernel[1]
        else:
            macs = math.prod(o)
        moved = sum(t[r].nbytes for r in set(cmd.reads())) + t[cmd.output].nbytes
        out.append(max(-(-macs // npu.macs_per_cycle), -(-moved // npu.bytes_per_cycle)))
    return out


def cycles(program: Program, npu) -> int:
    """Estimated total cycles of ``program`` on ``npu`` (sum of :func:`command_cycles`)."""
    return sum(command_cycles(program, npu))
