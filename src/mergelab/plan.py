"""Recipe + opened models -> the list of output tensors, each with its inputs and resolved parameters.

Everything that can be wrong with the inputs (missing tensors, shapes, architectures, parameters) is found
here, before a byte is written. The plan is also what ``--print-plan`` and ``mergelab check`` show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.layout import num_layers, tensor_info
from mergelab.checkpoint.reader import ModelReader
from mergelab.config import DTYPES, Recipe
from mergelab.errors import CompatibilityError, RecipeError
from mergelab.hub_cache import cached_snapshot
from mergelab.mergekit_compat import compat_recipe, compat_spec
from mergelab.methods import METHODS
from mergelab.methods.spec import MethodSpec, TensorInfo
from mergelab.params import Scope, resolve, validate_scope

log = logging.getLogger("mergelab")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


@dataclass(frozen=True)
class Source:
    """One input tensor: which model, which name, and how many leading rows to keep (vocabulary rule)."""

    model: str
    name: str
    rows: int | None = None


@dataclass
class TensorJob:
    """One output tensor: its inputs, the method and the parameters resolved for it."""

    name: str
    shape: tuple[int, ...]
    info: TensorInfo
    base: Source | None
    experts: list[Source]
    params: dict[str, Any]


@dataclass
class MergePlan:
    """The resolved recipe: method, models, output tensors in write order, output dtype and config."""

    recipe: Recipe
    method: MethodSpec
    readers: dict[str, ModelReader]
    reference: str
    jobs: list[TensorJob]
    out_dtype: torch.dtype
    config: dict[str, Any]
    tokenizer_folder: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        size = torch.tensor([], dtype=self.out_dtype).element_size()
        return sum(int(torch.Size(job.shape).numel()) * size for job in self.jobs)


def resolve_model_path(ref: str, recipe_dir: Path | None) -> str:
    """A recipe's model reference as a path: as given, or relative to the recipe's folder."""
    path = Path(ref).expanduser()
    if not path.exists() and recipe_dir is not None and (recipe_dir / path).exists():
        path = recipe_dir / path
    if not path.exists():  # issue 20: org/name[@revision] from the local Hugging Face cache
        path = cached_snapshot(ref) or path
    return str(path)


def method_spec(name: str) -> MethodSpec:
    from mergelab.config import closest

    if name not in METHODS:
        raise RecipeError(f"unknown merge_method '{name}'{closest(name, list(METHODS))}")
    return METHODS[name]


def _check_architectures(readers: dict[str, ModelReader], allow_mixed: bool) -> None:
    types = {ref: r.model_type for ref, r in readers.items()}
    if len(set(types.values())) > 1 and not allow_mixed:
        detail = ", ".join(f"{ref}: {t}" for ref, t in types.items())
        raise CompatibilityError(f"models have different architectures (config.json model_type: {detail}); "
                                 "merge models of one architecture or pass --allow-mixed")


def output_dtype(recipe: Recipe, reference: ModelReader) -> torch.dtype:
    name = recipe.out_dtype or recipe.dtype
    if name is not None:
        return TORCH_DTYPES[name]
    floats = [reference.dtype(n) for n in reference.names if reference.dtype(n).is_floating_point]
    return floats[0] if floats else torch.float32


def vocab_rows(job_name: str, kind: str, ref_shape: tuple[int, ...], model: str, reader: ModelReader, name: str,
                strict: bool, warnings: list[str]) -> int | None:
    """The vocabulary rule: extra embedding/head rows of an input beyond the reference's are dropped."""
    shape = reader.shape(name)
    if shape == ref_shape:
        return None
    if kind in ("embedding", "head") and shape[1:] == ref_shape[1:] and shape[0] > ref_shape[0]:
        if strict:
            raise CompatibilityError(f"{model}: tensor '{name}' has {shape[0]} vocabulary rows but the base has "
                                     f"{ref_shape[0]}; align the tokenizers or drop --strict")
        warnings.append(f"{model}: '{name}' has {shape[0]} rows; rows beyond the base's {ref_shape[0]} are dropped")
        return ref_shape[0]
    raise CompatibilityError(f"{model}: tensor '{job_name}' has shape {list(shape)} but the base has "
                             f"{list(ref_shape)}; these models cannot be merged tensor by tensor")


def input_name(reader: ModelReader, name: str, model: str) -> str:
    """The name to read in one input, with the tied-embedding rule (lm_head read from embed_tokens)."""
    if reader.has(name):
        return name
    if name.endswith("lm_head.weight") and reader.config.get("tie_word_embeddings", False):
        for candidate in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if reader.has(candidate):
                return candidate
    raise CompatibilityError(f"{model}: tensor '{name}' is missing from this model but present in the base; "
                             "are these fine-tunes of the same base?")


def tokenizer_folder(recipe: Recipe, readers: dict[str, ModelReader], reference: str) -> Path:
    """Where the output's tokenizer files come from: the base (default) or the model ``tokenizer_source`` names."""
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):  # union: the tokenizer is built by tokenizer_merge
        return readers[reference].folder
    if source in readers:
        return readers[source].folder
    folder = Path(source)
    if not folder.is_dir():
        raise RecipeError(f"tokenizer_source '{source}' is neither 'base' nor an existing model folder; "
                          "'union' is not supported")
    return folder


def build_plan(recipe: Recipe, readers: dict[str, ModelReader], *, strict: bool = False,
               allow_mixed: bool = False) -> MergePlan:
    """Resolve a ``models:`` recipe into output tensor jobs (slices are planned by ``slices.plan_slices``)."""
    recipe = compat_recipe(recipe)  # issue 20: --compat mergekit reads the recipe and computes as mergekit does
    spec = compat_spec(recipe, method_spec(recipe.merge_method))
    _check_architectures(readers, allow_mixed)
    validate_scope(spec, recipe.parameters, "top-level parameters", per_model=False)
    if recipe.slices:
        from mergelab.slices import plan_slices

        return plan_slices(recipe, spec, readers, strict=strict)
    entries = recipe.models or []
    for entry in entries:
        validate_scope(spec, entry.parameters, f"parameters of model {entry.model}", per_model=True)
    base = recipe.base_model
    if spec.base == "required" and base is None:
        raise RecipeError(f"method '{spec.name}' needs a base_model (task vectors are taken against it); add one")
    warnings: list[str] = []
    if spec.base == "ignored":
        expert_entries = entries
        if base is not None and base not in [e.model for e in entries]:
            warnings.append(f"method '{spec.name}' ignores base_model; list the model under 'models' to include it")
        base = None
    else:
        expert_entries = [e for e in entries if e.model != base]
    n = len(expert_entries)
    if n < spec.min_experts or (spec.max_experts is not None and n > spec.max_experts):
        wanted = f"{spec.min_experts}" + ("" if spec.max_experts == spec.min_experts else
                                          f" to {spec.max_experts}" if spec.max_experts else " or more")
        raise RecipeError(f"method '{spec.name}' merges {wanted} model(s) besides the base, but the recipe gives {n}")
    reference = base if base is not None else expert_entries[0].model
    ref_reader = readers[reference]
    config = ref_reader.config
    layers = num_layers(config)
    jobs = []
    for name in ref_reader.names:
        if not ref_reader.dtype(name).is_floating_point:
            raise CompatibilityError(f"{reference}: tensor '{name}' is not floating point; it cannot be merged")
        info = tensor_info(name, config)
        t = info.layer / (layers - 1) if info.layer is not None and layers > 1 else 0.0
        shape = ref_reader.shape(name)
        sources = []
        for entry in expert_entries:
            in_name = input_name(readers[entry.model], name, entry.model)
            rows = vocab_rows(name, info.kind, shape, entry.model, readers[entry.model], in_name, strict, warnings)
            sources.append(Source(entry.model, in_name, rows))
        params = resolve_params(spec, [e.parameters for e in expert_entries], [recipe.parameters], name, t)
        jobs.append(TensorJob(name, shape, info, Source(base, name) if base else None, sources, params))
    return MergePlan(recipe, spec, readers, reference, jobs, output_dtype(recipe, ref_reader), dict(config),
                     tokenizer_folder(recipe, readers, reference), warnings)


def resolve_params(spec: MethodSpec, model_scopes: list[Scope], shared_scopes: list[Scope], name: str,
                   t: float) -> dict[str, Any]:
    """Per-model parameters as lists (model scope first, then shared scopes), shared ones as scalars."""
    params: dict[str, Any] = dict(spec.fixed)
    for param in spec.params:
        if param.name in spec.fixed:
            continue
        if param.per_model:
            params[param.name] = [resolve(param, [scope, *shared_scopes], name, t, f"tensor {name}")
                                  for scope in model_scopes]
        else:
            params[param.name] = resolve(param, shared_scopes, name, t, f"tensor {name}")
    return params


def describe(plan: MergePlan) -> str:
    """A readable plan: per tensor group (same method parameters), which tensors and which values."""
    groups: dict[str, list[str]] = {}
    for job in plan.jobs:
        key = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        groups.setdefault(key, []).append(job.name)
    lines = [f"method: {plan.method.name} ({plan.method.citation})",
             f"base: {plan.recipe.base_model or '(none)'}; reference for shapes and config: {plan.reference}",
             f"output: {len(plan.jobs)} tensors, {plan.output_bytes / 1e9:.3f} GB as {str(plan.out_dtype)[6:]}"]
    for key, names in groups.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
        lines.append(f"- {key or '(no parameters)'}\n    {shown}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    assert name in DTYPES, name
    return name
