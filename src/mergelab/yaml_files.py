"""Reading a YAML file (a recipe, a MoE config) with one-sentence errors: a missing file, or the line, column
and construct where the syntax broke."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import RecipeError


def read_yaml(path: Path, what: str = "recipe file") -> Any:
    """The parsed content of a YAML file; a missing file or bad syntax raises ``RecipeError``."""
    if not path.is_file():
        raise RecipeError(f"{what} {path} does not exist; check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}{_yaml_position(error)} is not valid YAML ({_yaml_problem(error)}); fix the "
                          "syntax there") from None


def _yaml_position(error: yaml.YAMLError) -> str:
    """':LINE:COLUMN' (1-based, as editors count) where the YAML parser stopped, when it says."""
    mark = getattr(error, "problem_mark", None)
    return "" if mark is None else f":{mark.line + 1}:{mark.column + 1}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, with the construct it was reading ("while parsing a flow sequence")."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return str(error).splitlines()[0]
    context, opened = getattr(error, "context", None), getattr(error, "context_mark", None)
    if not context:
        return problem
    return f"{problem}, {context}" + (f" opened at line {opened.line + 1}" if opened is not None else "")
