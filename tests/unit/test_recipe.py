from dataclasses import dataclass

import pytest

from hwcompress.errors import RecipeError
from hwcompress.recipe import Recipe, as_recipe, register_technique


@dataclass(frozen=True)
class _Scale:
    factor: float = 1.0

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError("factor must be > 0")


def _apply(mod, config, spec):
    return (mod, config.factor)


register_technique("test-scale", _Scale, _apply)


def test_round_trip_dict_and_toml(tmp_path):
    recipe = Recipe((_Scale(2.0), _Scale(3.0)))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert Recipe.from_toml(path) == recipe == as_recipe(str(path))


def test_apply_runs_steps_in_order():
    assert Recipe((_Scale(2.0),)).apply("m", None) == ("m", 2.0)


def test_empty_recipe_is_identity():
    assert as_recipe(None).apply("m", None) == "m"
    assert as_recipe(None).to_dict() == {"steps": []}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": [{"technique": "nope"}]}, "unknown technique 'nope'"),
        ({"steps": [{"technique": "test-scale", "factr": 2}]}, "unknown field"),
        ({"steps": [{"technique": "test-scale", "factor": -1}]}, "factor must be > 0"),
        ({"step": []}, "unknown field"),
        ({"steps": [{"factor": 1}]}, "technique"),
    ],
)
def test_bad_recipes_are_named(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[steps]\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml(path)
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_toml(tmp_path / "missing.toml")
