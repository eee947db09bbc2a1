"""Input-channel permutations folded into the layer that produces the input (ASP's way).

``Sparse24(permute=True)`` reorders each layer's reduction axis (its input channels) so that
2:4 keeps more magnitude, and the layer then reads its input through that order. Where the
input is computed by a conv / matmul through nothing but a per-channel bias add and
ReLU / clip (each the only user of the one before: the middle layers of a ResNet
bottleneck), the producer can compute its output channels in that order instead: its
weight's output channels and its bias permuted, the consumer reads its input as it is. No
``take`` pass and no in-kernel permutation remain for such layers; the graph computes the
same values. An input with other users (a block's input, also added back as the residual)
keeps its ``take``.

``fold_of(var2val, users, x)`` finds the producer of ``x``; ``permute_outputs`` /
``permute_inputs`` reorder a conv's (OHWI) or matmul's (``[K, N]``) weight; ``permute_bias``
a per-channel constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONV2D, MATMUL = "relax.nn.conv2d", "relax.matmul"
ELEMENTWISE = ("relax.nn.relu", "relax.clip")


@dataclass(frozen=True)
class Fold:
    """The layer bound to ``producer`` computes its output channels in the consumer's input
    order; ``bias``: the var of the per-channel bias add between them (its constant is
    permuted too), None when there is none."""

    producer: object
    bias: object = None


def _op(value) -> str | None:
    return getattr(getattr(value, "op", None), "name", None)


def _permutable(call) -> bool:
    """A conv (NHWC / OHWI, one group) or matmul by a constant weight: its output channels
    can be reordered by reordering its weight."""
    from ...backends.sparse_lower import const_value  # (imported late: it imports this package)

    if _op(call) not in (CONV2D, MATMUL) or const_value(call.args[1]) is None:
        return False
    if _op(call) == MATMUL:
        return call.args[1].ty.ndim == 2
    a = call.attrs
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    return layouts == ("NHWC", "OHWI", "NHWC") and int(a.groups) == 1


def fold_of(var2val: dict, users: dict, x) -> Fold | None:
    """The ``Fold`` that would give ``x`` (a var read by one layer only) in any channel order,
    or None: ``x`` computed from a permutable conv / matmul by per-channel bias adds (at most
    one; scalar constants added are fine) and ReLU / clip, every var on the way read once."""
    from tvm import relax

    from ...backends.sparse_lower import const_value

    bias, cur = None, x
    while isinstance(cur, relax.Var) and len(users.get(cur, [])) == 1:
        value = var2val.get(cur)
        op = _op(value)
        if op in ELEMENTWISE:
            cur = value.args[0]
        elif op == "relax.add":
            consts = [(i, const_value(a)) for i, a in enumerate(value.args) if const_value(a) is not None]
            if len(consts) != 1:
                return None
            i, c = consts[0]
            if c.size > 1:  # per-channel: permuted with the channels (one such add at most)
                channels = int(value.ty.shape[-1])
                if bias is not None or c.size != channels or c.shape[-1] != channels:
                    return None
                bias = cur
            cur = value.args[1 - i]
        elif _permutable(value):
            return Fold(cur, bias)
        else:
            return None
    return None


def permute_outputs(op: str, w: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``w`` with its output channels in the order ``perm`` (OHWI: axis 0; ``[K, N]``: N)."""
    return np.ascontiguousarray(w[perm] if op == CONV2D else w[:, perm])


def permute_inputs(op: str, w: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``w`` reading its input channels in the order ``perm`` (OHWI: the last axis; ``[K, N]``: K)."""
    return np.ascontiguousarray(w[..., perm] if op == CONV2D else w[perm])


def permute_bias(c: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """A per-channel constant (channels last) in the order ``perm``."""
    return np.ascontiguousarray(c.reshape(-1)[perm].reshape(c.shape))
