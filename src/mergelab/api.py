"""The Python entry point: ``merge(recipe, out_dir)`` with a recipe given as a path, YAML text or dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergelab.config import Recipe, load_recipe, parse_recipe
from mergelab.engine import MergeOptions, run_merge


def as_recipe(recipe: Recipe | dict | str | Path) -> tuple[Recipe, Path | None]:
    """A validated recipe and the folder relative model paths may be resolved against."""
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, dict):
        return parse_recipe(recipe), None
    if isinstance(recipe, str) and "\n" in recipe:
        return parse_recipe(yaml.safe_load(recipe)), None
    path = Path(recipe)
    return load_recipe(path), path.parent


def merge(recipe: Recipe | dict | str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Run a recipe into ``out_dir`` (see ``MergeOptions`` for the options) and return the folder."""
    parsed, recipe_dir = as_recipe(recipe)
    options.setdefault("progress", False)
    return run_merge(parsed, out_dir, MergeOptions(**options), recipe_dir)
