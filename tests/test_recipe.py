"""Loading recipes: overrides typed by the schema, defaults, messages naming the key and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.errors import RecipeError
from runner.recipe import load_recipe
from runner.recipe.schema import load_schema


def test_defaults_filled(small_recipe: Path) -> None:
    r = load_recipe(small_recipe)
    assert r.get("lora.r") == 8
    assert r.get("quantization.bnb_4bit_quant_type") == "nf4"
    assert r.get("train.optim") == "paged_adamw_8bit"
    assert r.get("tokenize.max_length") == 512


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("lora.r=16", "lora.r", 16),
        ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),
        ("train.gradient_checkpointing=false", "train.gradient_checkpointing", False),
        ("train.optim=adamw_torch", "train.optim", "adamw_torch"),
        ("train.bf16=auto", "train.bf16", "auto"),
        ('lora.target_modules=["q_proj", "v_proj"]', "lora.target_modules", ["q_proj", "v_proj"]),
        ("recipe.description=123", "recipe.description", "123"),
    ],
)
def test_set_overrides_are_typed(small_recipe: Path, item: str, key: str, value: object) -> None:
    assert load_recipe(small_recipe, [item]).get(key) == value


def test_set_override_validated_like_the_file(small_recipe: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(small_recipe, ["lora.r=0", "train.learning_rat=1"])
    assert e.value.lines == [
        "--set lora.r=0: $.lora.r: 0 is less than the minimum of 1",
        "--set train.learning_rat=1: $.train.learning_rat: unknown key 'learning_rat'; "
        "did you mean 'learning_rate'?",
    ]


def test_set_without_equals_sign(small_recipe: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(small_recipe), "--set", "lora.r"])
    assert result.exit_code == 2
    assert result.output == "--set lora.r: expected KEY=VALUE, e.g. --set lora.r=16\n"


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.output == f"{tmp_path / 'nope.toml'}: no such recipe file; check the path\n"


def test_every_schema_key_typed_described_and_defaulted() -> None:
    def walk(node: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}"
            assert sub.get("description"), where
            if sub.get("type") == "object" and "properties" in sub:
                assert sub.get("additionalProperties") is False, where
                walk(sub, where)
            else:
                assert "type" in sub or "anyOf" in sub, where

    schema = load_schema()
    assert schema["additionalProperties"] is False
    walk(schema, "$")


def test_schema_command_prints_the_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == load_schema()
