"""The recipe: mergekit's YAML shape, validated strictly.

mergekit silently ignores unknown keys and parameters; here each is an error naming the closest valid name.
Parameter settings follow mergekit's grammar: a scalar, a gradient (a list of numbers interpolated across
layers), or filtered values (``[{filter: self_attn, value: 0.5}, {value: 0.3}]``, the first matching filter
wins). Precedence, highest first: the model's (or slice source's) ``parameters``, the output slice's, the
top level's.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergelab.errors import RecipeError

DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    """A filtered value: applies to tensors whose name contains ``filter`` (all when absent or ``*``)."""

    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(Strict):
    model: str
    parameters: dict[str, Setting] | None = None


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class OutputSlice(Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None


class ModelTokenSource(Strict):
    """A token's embedding row taken from one model's row for ``token`` or ``token_id`` (one of the two)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(Strict):
    kind: Literal["zero"]


class TokenSetting(Strict):
    """Where one output token's embedding and head rows come from (``tokenizer.tokens``); ``force`` applies it
    also to models that have the token."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerBlock(Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary, per-token row sources, padding of the rows."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(Strict):
    """A whole merge recipe (mergekit-compatible keys, plus ``seed``)."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    name: str | None = None
    seed: int = 0
    compat: Literal["mergekit"] | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = DTYPE_ALIASES.get(value, value)
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        from mergelab.chat_templates import check_value

        return None if value is None else check_value(value)

    @model_validator(mode="after")
    def _one_tokenizer_setting(self) -> Recipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices' at the top level, not both or neither")
        return self

    def model_paths(self) -> list[str]:
        """Every model the recipe names, base first, without repeats."""
        paths = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            paths.append(entry.model)
        for out_slice in self.slices or []:
            if out_slice.base_model:
                paths.append(out_slice.base_model)
            paths.extend(src.model for src in out_slice.sources)
        return list(dict.fromkeys(paths))


def closest(word: str, options: list[str] | tuple[str, ...]) -> str:
    """" (did you mean 'x'?)" for the closest valid name, or a list of the valid names."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(sorted(options))})"


_KEYS_BY_MODEL = {
    "Recipe": Recipe,
    "ModelEntry": ModelEntry,
    "SliceSource": SliceSource,
    "OutputSlice": OutputSlice,
    "Conditional": Conditional,
}


def _explain(error: ValidationError, source: str) -> RecipeError:
    """One sentence for the first validation problem, with the closest valid key for unknown ones."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[", "union[")))
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        owner = _owner_of(first["loc"])
        return RecipeError(f"{source}: unknown key '{key}' at {loc or 'top level'}"
                           f"{closest(key, list(owner.model_fields))}; remove or rename it")
    if first["type"] == "missing":
        return RecipeError(f"{source}: required key '{loc}' is missing; add it")
    return RecipeError(f"{source}: {loc or 'recipe'}: {first['msg']}")


def _owner_of(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The schema class that holds the key at ``loc`` (for suggesting names)."""
    parts = [p for p in loc[:-1] if not isinstance(p, int)]
    owner: type[BaseModel] = Recipe
    for part in parts:
        nested = {"models": ModelEntry, "slices": OutputSlice, "sources": SliceSource,
                  "tokenizer": TokenizerBlock}.get(str(part))
        if nested is not None:
            owner = nested
    return owner


def parse_recipe(data: Any, source: str = "recipe", compat: str | None = None) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML); under compat, keys mergekit ignores are dropped."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with at least 'merge_method' and 'models'")
    if (compat or data.get("compat")) == "mergekit":
        from mergelab.mergekit_compat import drop_unknown_keys

        data = drop_unknown_keys({**data, "compat": "mergekit"}, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise _explain(error, source) from None


def load_recipe(path: str | Path, compat: str | None = None) -> Recipe:
    """Read and validate a YAML recipe file (``compat``: as ``--compat`` gives it)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); fix the syntax") from None
    recipe = parse_recipe(data, str(path), compat)
    template = recipe.chat_template
    if template and "{" not in template and (path.parent / template).is_file():  # a file beside the recipe
        recipe.chat_template = str((path.parent / template).resolve())
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, defaults left out."""
    return yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude_defaults=True, mode="json"), sort_keys=False)
