"""The recipe: mergekit's YAML shape, validated strictly.

mergekit silently ignores unknown keys and parameters; here each is an error naming the closest valid name.
Parameter settings follow mergekit's grammar: a scalar, a gradient (a list of numbers interpolated across
layers), or filtered values (``[{filter: self_attn, value: 0.5}, {value: 0.3}]``, the first matching filter
wins). Precedence, highest first: the model's (or slice source's) ``parameters``, the output slice's, the
top level's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergelab.checkpoint.dtypes import DTYPE_ALIASES, FLOAT_DTYPES
from mergelab.errors import RecipeError, closest
from mergelab.yaml_files import read_yaml

log = logging.getLogger("mergelab")

Scalar = Union[bool, int, float, str]


def known_dtype(value: str | None) -> str | None:
    """A dtype name with its alias resolved (``bf16`` -> ``bfloat16``); pydantic reports the ValueError."""
    if value is None:
        return None
    value = DTYPE_ALIASES.get(value, value)
    if value not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(FLOAT_DTYPES)}")
    return value


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
        return known_dtype(value)

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
        if self.models is not None and self.slices is not None:
            raise ValueError("the recipe gives both 'models' and 'slices'; keep one of them (slices for layer ranges)")
        if self.models == [] or self.slices == []:
            key = "models" if self.models == [] else "slices"
            raise ValueError(f"'{key}' is empty; list at least one model under it")
        if self.models is None and self.slices is None:
            raise ValueError("the recipe names no models; add a 'models' list (or 'slices' for layer ranges)")
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



def _explain(error: ValidationError, source: str) -> RecipeError:
    """One sentence for the first validation problem, with the closest valid key for unknown ones."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a misspelt key, then missing
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[", "union[")))
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        owner = _owner_of(first["loc"])
        where = ".".join(str(p) for p in first["loc"][:-1]) or "the top level"
        return RecipeError(f"{source}: unknown key '{key}' at {where}"
                           f"{closest(key, list(owner.model_fields))}; remove or rename it")
    if first["type"] == "missing":
        return RecipeError(f"{source}: required key '{loc}' is missing; add it")
    if first["type"] == "value_error":  # our own validators' sentences, without pydantic's "Value error, "
        return RecipeError(f"{source}: {loc + ': ' if loc else ''}{first['ctx']['error']}")
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


def drop_unknown_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A raw recipe without the keys the schema does not know (top level, models, slices, sources), each named in a
    one-line warning: mergekit ignores them. mergekit's ``modules`` key is refused: it changes what is merged."""
    if "modules" in data:
        raise RecipeError(f"{source}: mergekit's 'modules' key (a separate merge per module) is not supported; "
                          "write the recipe with 'models' or 'slices'")
    def known(entry: Any, schema: Any, where: str) -> Any:
        if not isinstance(entry, dict):
            return entry
        for key in entry:
            if key not in schema.model_fields:
                log.warning(f"compat mergekit: {source}: mergekit ignores key '{key}' at {where}; dropped")
        return {k: v for k, v in entry.items() if k in schema.model_fields}

    data = known(data, Recipe, "top level")
    if isinstance(data.get("models"), list):
        data["models"] = [known(m, ModelEntry, f"models[{i}]") for i, m in enumerate(data["models"])]
    if isinstance(data.get("slices"), list):
        data["slices"] = [known(sl, OutputSlice, f"slices[{i}]") for i, sl in enumerate(data["slices"])]
        for i, sl in enumerate(data["slices"]):
            if isinstance(sl, dict) and isinstance(sl.get("sources"), list):
                sl["sources"] = [known(src, SliceSource, f"slices[{i}].sources[{j}]")
                                 for j, src in enumerate(sl["sources"])]
    return data


def parse_recipe(data: Any, source: str = "recipe", compat: str | None = None) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML); under compat, keys mergekit ignores are dropped."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with at least 'merge_method' and 'models'")
    if (compat or data.get("compat")) == "mergekit":
        data = drop_unknown_keys({**data, "compat": "mergekit"}, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise _explain(error, source) from None


def load_recipe(path: str | Path, compat: str | None = None) -> Recipe:
    """Read and validate a YAML recipe file (``compat``: as ``--compat`` gives it)."""
    path = Path(path)
    recipe = parse_recipe(read_yaml(path), str(path), compat)
    template = recipe.chat_template
    if template and "{" not in template and (path.parent / template).is_file():  # a file beside the recipe
        recipe.chat_template = str((path.parent / template).resolve())
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, defaults left out."""
    return yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude_defaults=True, mode="json"), sort_keys=False)
