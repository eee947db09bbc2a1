"""Recipes: an ordered list of typed technique configs, from and to TOML.

A technique registers its frozen config dataclass and its verb here (``register_technique``);
the CLI's technique flags and a recipe file build the same ``Recipe``, and the manifest
records ``Recipe.to_dict()``. A recipe file looks like::

    [[steps]]
    technique = "prune"
    ratio = 0.4
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import RecipeError


@dataclass(frozen=True)
class Technique:
    name: str
    config: type
    apply: Callable  # (IRModule, config, TargetSpec) -> IRModule
    exact: bool = True  # False: the output changes on purpose (pruning): verify against the compressed graph


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(name: str, config: type, apply: Callable, exact: bool = True) -> None:
    """Make ``config`` usable in recipes under ``name``; ``apply(mod, config, spec)`` runs it.
    ``exact=False``: the technique changes the model's outputs on purpose (pruning)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{config.__name__} must be a dataclass")
    _TECHNIQUES[name] = Technique(name, config, apply, exact)


def techniques() -> dict[str, Technique]:
    _load_builtin()
    return dict(_TECHNIQUES)


def _load_builtin() -> None:
    """Register the shipped techniques (importing hwcompress.passes stays light)."""
    from . import passes  # noqa: F401


def _technique_of(config) -> Technique:
    for tech in _TECHNIQUES.values():  # the exact class first: a config may subclass another's
        if type(config) is tech.config:
            return tech
    for tech in _TECHNIQUES.values():
        if isinstance(config, tech.config):
            return tech
    raise RecipeError(f"{type(config).__name__} is not a registered technique config")


@dataclass(frozen=True)
class Recipe:
    """Ordered technique configs, applied to the imported module in this order."""

    steps: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        for step in self.steps:
            _technique_of(step)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> "Recipe":
        unknown = set(data) - {"steps"}
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (expected 'steps')")
        steps = data.get("steps", [])
        if not isinstance(steps, list):
            raise RecipeError(f"{where}: steps: expected a list of tables")
        return cls(tuple(_step_from_dict(s, f"{where}: steps[{i}]") for i, s in enumerate(steps)))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [{"technique": _technique_of(s).name, **_plain(dataclasses.asdict(s))} for s in self.steps]}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @property
    def exact(self) -> bool:
        """True when no step changes the model's outputs on purpose."""
        return all(_technique_of(s).exact for s in self.steps)

    def apply(self, mod, spec):
        """Run every step's verb in order."""
        for step in self.steps:
            mod = _technique_of(step).apply(mod, step, spec)
        return mod


def _step_from_dict(raw: Any, where: str):
    if not isinstance(raw, Mapping) or "technique" not in raw:
        raise RecipeError(f"{where}: expected a table with a 'technique' field")
    name = raw["technique"]
    _load_builtin()
    tech = _TECHNIQUES.get(name)
    if tech is None:
        known = ", ".join(sorted(_TECHNIQUES)) or "none registered yet"
        raise RecipeError(f"{where}: unknown technique {name!r} (known: {known})")
    fields = {f.name for f in dataclasses.fields(tech.config)}
    args = {k: v for k, v in raw.items() if k != "technique"}
    unknown = set(args) - fields
    if unknown:
        raise RecipeError(f"{where}: {name}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(fields))})")
    try:
        return tech.config(**args)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {name}: {e}") from None


def _plain(value):
    """Enums and tuples to TOML/JSON-friendly values."""
    if hasattr(value, "to_recipe_value"):  # e.g. in-memory calibration data: not recorded
        return value.to_recipe_value()
    if isinstance(value, dict):
        plain = {k: _plain(v) for k, v in value.items()}
        return {k: v for k, v in plain.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Enum) or (hasattr(value, "value") and not isinstance(value, (int, float, str, bool))):
        return value.value  # str-valued enums (DataLayout) too: plain strings in manifests
    return value


def as_recipe(recipe) -> Recipe:
    """Accept a ``Recipe``, a dict, a TOML path, or None (the empty recipe)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_toml(recipe)
    raise RecipeError(f"recipe must be a Recipe, dict or TOML path, got {type(recipe).__name__}")
