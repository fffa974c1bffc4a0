"""Recipes: TOML in, a typed, validated Recipe out. Imports no torch."""

from runner.recipe.load import load_recipe
from runner.recipe.model import BUILTIN_TINY, TINY_CORPUS_TRAIN, Recipe, flatten

__all__ = ["BUILTIN_TINY", "TINY_CORPUS_TRAIN", "Recipe", "flatten", "load_recipe"]
