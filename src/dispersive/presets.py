"""Old name of :mod:`dispersive.recipes` ("preset" now means a TOML config in configs/); kept so
that ``from dispersive.presets import ...`` keeps working."""

from dispersive.recipes import BLOCK_RULES, RECIPES, Recipe, get_recipe, resolve_block

__all__ = ["BLOCK_RULES", "PRESETS", "Preset", "get_preset", "resolve_block"]

Preset = Recipe
PRESETS = RECIPES
get_preset = get_recipe
