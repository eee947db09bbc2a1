"""Structured channel pruning: ``prune(mod, ChannelPrune(ratio=0.4, ...))``.

Three ideas are kept apart (as in Torch-Pruning):

* which channels are coupled: ``prune_groups.analyze`` (residual adds, concats, depthwise
  convs, BN / activations, the matmul after global pooling or flatten);
* how channels are scored: L1 / L2 filter norms, or ``reconstruct`` (ThiNet: with
  calibration data, remove the channels whose removal least changes the next layers'
  outputs, then refit those layers by least squares), in ``prune_importance`` / ``prune_calib``;
* how a layer is cut: ``apply_removal`` slices the weight constants, so the IR has the
  reduced shapes (fewer parameters and FLOPs), not masks.

``ratio`` is the fraction of the module's *parameters* to remove. Widths are rounded to the
target's ``[hardware].channel_multiple`` (or ``round_to``). Without calibration data the
removed channel fraction is kept even across groups; with it, the budget goes first to the
groups whose removal changes the output least (per-group sensitivity: output error vs width).
``per_layer`` fixes the removed *channel* fraction of named groups (``g3`` or the name of one
of the group's convs, as ``hwc inspect --prune-groups`` prints them).

Prune before the layout pass and BN folding's absence is fine: ``batch_norm`` follows its
channels. In builds BN is folded first (``optimize.effective_recipe``), so the filter norms
include the BN scales.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .prune_importance import allowed_widths, distribute, filter_norms, nearest_width
from .prune_rewrite import apply_removal, mask_channels

__all__ = ["ChannelPrune", "Criterion", "PrunePlan", "apply_removal", "mask_channels", "plan_prune", "prune", "prune_groups"]

log = logging.getLogger("hwcompress")

MAX_GROUP_RATIO = 0.9  # a group keeps at least 10% of its channels when the budget is spread


class Criterion(str, enum.Enum):
    """How channels are scored."""

    L1 = "l1"
    L2 = "l2"
    RECONSTRUCT = "reconstruct"


@dataclass(frozen=True)
class ChannelPrune:
    """Remove whole channels (filters) from convs and matmuls.

    Parameters
    ----------
    ratio : float
        Fraction of the module's parameters to remove, in ``[0, 1)``.
    criterion : Criterion or str
        ``l1`` / ``l2`` filter norms, or ``reconstruct`` (needs ``calib``).
    per_layer : mapping of str to float
        Removed channel fraction of named groups (``g3`` or a member conv's name); these groups
        are left out of the ``ratio`` budget.
    round_to : int or None
        Kept widths are multiples of this; None: the target's ``channel_multiple``.
    calib : str, ndarray, list or mapping, or None
        Calibration data: a directory (``.npy`` files, one batch each, or ``.npz`` files keyed
        by input name), an array of samples, a list of batches, or ``{input name: samples}``.
        With it the budget is distributed by sensitivity.
    """

    ratio: float = 0.0
    criterion: Criterion = Criterion.L1
    per_layer: Mapping[str, float] = field(default_factory=dict)
    round_to: int | None = None
    calib: object = field(default=None, compare=False)

    def __post_init__(self):
        from .prune_calib import Calibration

        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ChannelPrune.ratio must be a number in [0, 1), got {self.ratio!r}")
        try:
            object.__setattr__(self, "criterion", Criterion(self.criterion))
        except ValueError:
            raise ValueError(f"ChannelPrune.criterion must be one of l1, l2, reconstruct, got {self.criterion!r}") from None
        if not isinstance(self.per_layer, Mapping):
            raise TypeError(f"ChannelPrune.per_layer must be a mapping of group name to ratio, got {self.per_layer!r}")
        for name, r in self.per_layer.items():
            if not isinstance(name, str) or isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"ChannelPrune.per_layer[{name!r}] must be a ratio in [0, 1), got {r!r}")
        object.__setattr__(self, "per_layer", dict(self.per_layer))
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"ChannelPrune.round_to must be a positive int or None, got {self.round_to!r}")
        if self.calib is not None and not isinstance(self.calib, (str, Calibration)):
            object.__setattr__(self, "calib", Calibration(self.calib))
        if self.criterion is Criterion.RECONSTRUCT and self.calib is None:
            raise ValueError("ChannelPrune(criterion='reconstruct') needs calibration data (calib=...)")


@dataclass
class PrunePlan:
    """What ``prune`` will cut: per group its width before and after, and why locked ones
    are left alone; ``sensitivity[g]`` maps widths to output error when calibration ran.
    ``module`` is the module the plan is for (ReLU6 canonicalized), ``analysis`` its groups."""

    groups: list
    widths: list[int]
    removed: set
    refit: dict
    sensitivity: dict
    params_before: int
    params_estimate: int
    module: object = None
    analysis: object = None

    def summary(self) -> str:
        lines = []
        for g, w in zip(self.groups, self.widths):
            if not g.prunable:
                lines.append(f"{g.name}: {g.channels} channels kept (locked: {g.reason or 'a single channel'})")
            else:
                lines.append(f"{g.name}: {g.channels} -> {w} channels")
        return "\n".join(lines)


def prune_groups(mod):
    """The channel dependency groups of ``mod["main"]`` (``hwc inspect --prune-groups``)."""
    from .fuse import canonicalize_clip
    from .prune_groups import analyze

    mod = canonicalize_clip(mod)  # ReLU6 as R.clip follows its channels; the importer's kernels do not
    return analyze(mod["main"], mod).groups


def prune_sensitivity(mod, calib, spec=None, round_to: int | None = None) -> dict:
    """Per prunable group, how much the model's output moves as the group narrows.

    ``{group name: {kept width: error}}``: the relative squared error of the first output on
    the calibration data ``calib`` (a directory, an array or ``{input: array}``) with the
    group's least important channels (ThiNet order, as ``hwc build --prune --calib`` uses)
    zeroed down to that width; widths on the target's ``channel_multiple`` (or ``round_to``).
    This is the curve the global ratio is distributed by (``hwc inspect --prune-groups --calib``).
    """
    plan = plan_prune(mod, ChannelPrune(ratio=0.5, criterion="reconstruct", calib=calib, round_to=round_to), spec, refit=False)
    return {plan.groups[g].name: dict(sorted(curve.items(), reverse=True)) for g, curve in plan.sensitivity.items()}


def _multiple(config: ChannelPrune, spec) -> int:
    """Kept widths are multiples of this: ``round_to``, else the target's ``channel_multiple``
    and, on a target with an NPU, its input and output channel multiples too."""
    if config.round_to is not None:
        return config.round_to
    if spec is None:
        return 1
    npu = spec.npu
    extra = (npu.in_channel_multiple, npu.out_channel_multiple) if npu is not None else ()
    return math.lcm(spec.hardware.channel_multiple, *extra)


def plan_prune(mod, config: ChannelPrune, spec=None, refit: bool = True) -> PrunePlan:
    """Decide which channels go, without rewriting the module.

    Parameters
    ----------
    mod : tvm.IRModule
        Relax module as imported (``main``).
    config : ChannelPrune
    spec : TargetSpec or None
        Read for ``channel_multiple`` when ``config.round_to`` is None.
    refit : bool
        Solve the least-squares refit of ``reconstruct`` (False: only the choice of channels
        and the sensitivity curves are wanted; ``plan.refit`` stays empty).
    """
    from .. import analysis
    from ..errors import RecipeError
    from .fuse import canonicalize_clip
    from .prune_groups import analyze

    mod = canonicalize_clip(mod)  # ReLU6 as R.clip follows its channels; the importer's kernels do not
    a = analyze(mod["main"], mod)
    multiple = _multiple(config, spec)
    total = analysis.summarize(mod).params
    tracked = sum(numel for numel, _o, _i in a.weights)
    fixed = total - tracked

    def frac(var, w):
        chan = a.chan[var]
        kept = 0.0
        for e in chan:
            g = a.group_of.get(a.comp(e))
            kept += 1.0 if g is None else w[g] / a.groups[g].channels
        return kept / len(chan)

    def params(w):
        return fixed + sum(n * frac(o, w) * (frac(i, w) if i is not None else 1.0) for n, o, i in a.weights)

    groups = a.groups
    fixed_width = {}
    for name, r in config.per_layer.items():
        try:
            g = a.group(name)
        except KeyError:
            known = ", ".join(x.name for x in groups)
            raise RecipeError(f"prune: per_layer names {name!r}, which is no pruning group ({known}; see hwc inspect --prune-groups)") from None
        if not groups[g].prunable:
            raise RecipeError(f"prune: per_layer names {name!r}, group {groups[g].name}, which cannot be pruned: {groups[g].reason}")
        fixed_width[g] = nearest_width(groups[g].channels, r, multiple)
    choices = []
    for g, grp in enumerate(groups):
        if g in fixed_width:
            choices.append([fixed_width[g]])
        elif grp.prunable and config.ratio > 0:
            choices.append(allowed_widths(grp.channels, multiple))
        else:
            choices.append([grp.channels])
    floor = [max(1, int(np.ceil(grp.channels * (1 - MAX_GROUP_RATIO)))) for grp in groups]

    calib = None
    if config.calib is not None and (config.ratio > 0 or config.per_layer):
        from .prune_calib import Calibration, CalibRunner

        calib = CalibRunner(mod, a, Calibration.of(config.calib, mod["main"]))
    orders = _orders(a, config, calib)
    sensitivity = {}
    cost = None
    if calib is not None and config.ratio > 0:
        sensitivity = calib.sensitivity(orders, choices, floor)

        def measured_cost(g, w):
            curve = sensitivity.get(g, {})
            if w in curve:
                return curve[w]
            xs = sorted(curve)
            return float(np.interp(w, xs, [curve[x] for x in xs])) if xs else 0.0

        cost = measured_cost

    widths = distribute(choices, params, (1 - config.ratio) * total, cost, floor)
    removed = set()
    for g, w in enumerate(widths):
        removed.update(orders[g][: groups[g].channels - w])
    refitted = calib.refit(removed) if refit and calib is not None and config.criterion is Criterion.RECONSTRUCT and removed else {}
    if config.ratio > 0 and params(widths) > (1 - config.ratio) * total + 0.5:
        log.warning(
            "prune: reached %.1f%% fewer parameters, not the %.1f%% asked (locked groups, widths rounded to %d)",
            100 * (1 - params(widths) / total), 100 * config.ratio, multiple,
        )
    return PrunePlan(groups, widths, removed, refitted, sensitivity, total, int(round(params(widths))), mod, a)


def _orders(a, config: ChannelPrune, calib) -> list[list[int]]:
    """Per group, its components in the order they are removed (least important first)."""
    if config.criterion is Criterion.RECONSTRUCT:
        return calib.thinet_orders()
    p = 1 if config.criterion is Criterion.L1 else 2
    score: dict[int, float] = {}
    for var, weight, out_axis in a.sources:
        norms = filter_norms(weight, out_axis, p)
        norms = norms / max(norms.mean(), 1e-30)  # layers count alike whatever their scale
        for e, v in zip(a.chan[var], norms):
            c = a.comp(e)
            score[c] = score.get(c, 0.0) + float(v)
    return [sorted(comps, key=lambda c: (score.get(c, 0.0), c)) for comps in a.group_comps]


def prune(mod, config: ChannelPrune, spec=None):
    """Structured channel pruning of ``mod["main"]``.

    Parameters
    ----------
    mod : tvm.IRModule
        A Relax module as imported (before ``build.legalize`` and the layout pass).
    config : ChannelPrune
    spec : TargetSpec or None
        Its ``[hardware].channel_multiple`` rounds the kept widths (unless ``round_to``).

    Returns
    -------
    tvm.IRModule
        A new module with reduced weight shapes; locked groups are logged and left alone.
    """
    if config.ratio == 0 and not config.per_layer:
        return mod
    plan = plan_prune(mod, config, spec)
    for g in plan.groups:
        if not g.prunable and g.channels > 1:
            log.info("prune: %s (%d channels) left unpruned: %s", g.name, g.channels, g.reason)
    log.info("prune: %s", "; ".join(f"{g.name} {g.channels}->{w}" for g, w in zip(plan.groups, plan.widths) if g.prunable))
    return apply_removal(plan.module, plan.analysis, plan.removed, plan.refit)
