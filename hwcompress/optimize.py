"""Which graph optimizations a build runs by default, and how the target spec decides them.

``Optimize`` is the typed config behind ``hwc build --no-fold-bn --no-fuse --winograd
on|off|auto --layout auto|NCHW|NHWC|NCHW8c...``: conv+BN folding and fusion are on everywhere;
Winograd follows the target's ``[hardware].winograd`` and the conv layout its
``[hardware].conv_layout`` unless forced. ``effective_recipe`` turns the user's recipe and these
options into the ordered steps that really run: BN folding first (pruning and quantization
want BN already in the weights), the user's steps, the conv layout, then Winograd last (it
needs the final channel counts, and quantized convs are not eligible). The layout step goes
before the recipe's first ``int8``, ``fuse`` or Winograd step: int8 quantizes the convs in the
layout its kernels read (NHWC / OHWI on CPU targets), and ``fuse`` and Winograd turn convs into
kernels or groups that ``ConvertLayout`` cannot see, while Winograd reads NHWC convs directly.
Pruning runs before the layout (its groups follow NCHW imports) and before int8 (it cuts float
weights), as does ``sparse-2-4`` (2:4 INT8: it prunes the float weights and, told that int8
follows, measures its decision on INT8 kernels); a recipe ordering them otherwise is refused,
as is ``fuse`` / Winograd before int8 (the convs would no longer be there to quantize). The layout step is skipped when the layout
resolves to ``NCHW``, the layout ONNX imports. A technique the user's recipe already names is
not added a second time: the recipe's own settings win.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from .targets import DataLayout

AUTO = "auto"


class Switch(Enum):
    ON = "on"
    OFF = "off"
    AUTO = "auto"  # the target spec decides


@dataclass(frozen=True)
class Optimize:
    """Default graph optimizations of a build.

    Parameters
    ----------
    fold_bn : fold inference BatchNorm into conv / matmul weights (frontend and ``fold-bn``)
    fuse : let TVM fuse conv + bias + activation + residual add into one kernel
    blocks : also the backend's multi-layer kernels where ``fuse`` is on (CPU: MobileNet-style
        inverted residuals, expand + depthwise + project, as one kernel; ``backends.cpu_block``)
    winograd : Winograd for eligible 3x3 stride-1 convs; ``auto`` = ``[hardware].winograd``
    layout : conv layout (a ``DataLayout`` or its name); ``auto`` = ``[hardware].conv_layout``
    """

    fold_bn: bool = True
    fuse: bool = True
    blocks: bool = True
    winograd: Switch = Switch.AUTO
    layout: DataLayout | str = AUTO

    def __post_init__(self):
        for name in ("fold_bn", "fuse", "blocks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Optimize.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.winograd, str):
            try:
                object.__setattr__(self, "winograd", Switch(self.winograd))
            except ValueError:
                raise ValueError(f"Optimize.winograd must be on, off or auto, got {self.winograd!r}") from None
        if not isinstance(self.winograd, Switch):
            raise TypeError(f"Optimize.winograd must be a Switch or on/off/auto, got {self.winograd!r}")
        if self.layout != AUTO:
            try:
                object.__setattr__(self, "layout", DataLayout(self.layout))
            except ValueError:
                choices = ", ".join(k.value for k in DataLayout)
                raise ValueError(f"Optimize.layout must be auto or one of {choices}, got {self.layout!r}") from None

    def winograd_on(self, spec) -> bool:
        return spec.hardware.winograd if self.winograd is Switch.AUTO else self.winograd is Switch.ON

    def layout_for(self, spec) -> DataLayout:
        """The conv layout a build for ``spec`` uses (``auto``: ``[hardware].conv_layout``)."""
        return spec.hardware.conv_layout if self.layout == AUTO else self.layout

    def to_dict(self, spec) -> dict:
        """As recorded in the manifest: the switches and what ``auto`` resolved to."""
        return {
            "fold_bn": self.fold_bn,
            "fuse": self.fuse,
            "blocks": self.blocks and self.fuse,
            "winograd": self.winograd.value,
            "winograd_applied": self.winograd_on(spec),
            "layout": self.layout if self.layout == AUTO else self.layout.value,
            "layout_applied": self.layout_for(spec).value,
        }


def as_optimize(value) -> Optimize:
    if value is None:
        return Optimize()
    if isinstance(value, Optimize):
        return value
    raise TypeError(f"optimize must be an Optimize, got {type(value).__name__}")


def effective_recipe(recipe, optimize: Optimize, spec):
    """The steps a build runs: default BN folding, the recipe's steps, the conv layout (before
    the recipe's first ``int8`` / ``fuse`` / ``winograd`` step, if any), default Winograd.

    Returns a ``Recipe``; the user's recipe is never changed.
    """
    from .errors import RecipeError
    from .passes import ConvLayout, FoldBatchNorm, Fuse, Int8Static, Sparse24, Winograd
    from .recipe import Recipe, as_recipe

    recipe = as_recipe(recipe)
    _check_int8_order(recipe.steps)
    named = {type(step) for step in recipe.steps}
    if not optimize.fold_bn and FoldBatchNorm in named:
        raise RecipeError("the recipe has a fold-bn step but BN folding is switched off (--no-fold-bn)")
    if optimize.winograd is Switch.OFF and Winograd in named:
        raise RecipeError("the recipe has a winograd step but Winograd is switched off (--winograd off)")
    mine = [s for s in recipe.steps if isinstance(s, ConvLayout)]
    if optimize.layout != AUTO and any(s.layout is not optimize.layout for s in mine):
        raise RecipeError(
            f"the recipe has a layout step ({mine[0].layout.value}) but --layout {optimize.layout.value} was asked for"
        )
    head = [FoldBatchNorm()] if optimize.fold_bn and FoldBatchNorm not in named else []
    if any(isinstance(s, Int8Static) for s in recipe.steps):  # 2:4 INT8: measure the INT8 kernels
        recipe = Recipe(tuple(replace(s, int8=True) if isinstance(s, Sparse24) else s for s in recipe.steps))
    tail = [Winograd()] if optimize.winograd_on(spec) and Winograd not in named else []
    steps = list(recipe.steps)
    layout = optimize.layout_for(spec)
    if layout is not DataLayout.NCHW and not mine:
        at = next((i for i, s in enumerate(steps) if isinstance(s, (Int8Static, Sparse24, Fuse, Winograd))), len(steps))
        steps.insert(at, ConvLayout(layout))
    return Recipe((*head, *steps, *tail))


def _check_int8_order(steps) -> None:
    """Pruning and a layout step before ``int8``; ``fuse`` and Winograd after it."""
    from .errors import RecipeError
    from .passes import ChannelPrune, ConvLayout, Fuse, Int8Static, Sparse24, Winograd

    at = next((i for i, s in enumerate(steps) if isinstance(s, Int8Static)), None)
    if at is None:
        return
    for step in steps[:at]:
        if isinstance(step, (Fuse, Winograd)):
            name = type(step).__name__.lower()
            raise RecipeError(f"the recipe runs {name} before int8, which then finds no convs to quantize; put int8 first")
    for step in steps[at + 1 :]:
        if isinstance(step, (ChannelPrune, ConvLayout, Sparse24)):
            name = {ChannelPrune: "prune", ConvLayout: "layout", Sparse24: "sparse-2-4"}[type(step)]
            raise RecipeError(f"the recipe runs {name} after int8; it must come before int8 (it rewrites float convs)")
