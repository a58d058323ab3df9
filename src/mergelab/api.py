"""The Python entry point: ``merge(recipe, out_dir)`` with a recipe given as a path, YAML text or dict.

Errors are the CLI's ``MergelabError`` sentences with the command-line flags they mention written as the
keyword arguments of ``merge`` (``--overwrite`` -> ``overwrite=True``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from mergelab.config import Recipe, load_recipe, parse_recipe
from mergelab.engine import MergeOptions, run_merge
from mergelab.errors import MergelabError

FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: ([a-z0-9]+))?")


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
    try:
        parsed, recipe_dir = as_recipe(recipe)
        options.setdefault("progress", False)
        return run_merge(parsed, out_dir, MergeOptions(**options), recipe_dir)
    except MergelabError as error:
        raise type(error)(as_keywords(str(error))) from None


def as_keywords(message: str) -> str:
    """A CLI error sentence with each flag of ``MergeOptions`` written as ``merge``'s keyword argument."""
    fields = {f.name: f.type for f in dataclasses.fields(MergeOptions)}

    def keyword(match: re.Match) -> str:
        name, value = match.group(1).replace("-", "_"), match.group(2)
        if name not in fields:
            return match.group(0)
        if fields[name] in (bool, "bool"):
            return f"{name}=True" + (f" {value}" if value else "")
        return f"{name}={value!r}" if value else f"{name}=..."

    return FLAG.sub(keyword, message)
