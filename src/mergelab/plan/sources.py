"""The planning rules that ``models:`` and ``slices:`` recipes share: opening the models, the method and its
input counts, which input tensor to read (tied embeddings, vocabulary rows), parameters resolved per tensor and
checked together, and the finished ``MergePlan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.dtypes import torch_dtype
from mergelab.checkpoint.reader import ModelReader
from mergelab.checkpoint.writer import PlannedTensor
from mergelab.config import Recipe
from mergelab.errors import CompatibilityError, RecipeError, closest
from mergelab.lora.adapted import check_adapter_bases, open_input
from mergelab.methods.registry import METHODS
from mergelab.methods.spec import MethodSpec
from mergelab.model_refs import resolve_model_ref
from mergelab.params import Scope, resolve
from mergelab.plan.data import MergePlan, ShardLayout, TensorJob
from mergelab.tokenizer_merge import prepare_inputs


def resolve_model_path(ref: str, recipe_dir: Path | None) -> str:
    """A recipe's model reference as a path, by the rule of ``mergelab.model_refs`` (recipe folder or cwd)."""
    return str(resolve_model_ref(ref, recipe_dir))


def open_inputs(recipe: Recipe, recipe_dir: Path | None, allow_pickle: bool) -> dict[str, ModelReader]:
    """Open every model the recipe names, keyed by its reference as written in the recipe (peft LoRA adapters,
    alone or as BASE+ADAPTER, are opened as their base with the adapter applied on read: ``lora.adapted``)."""
    readers = {ref: open_input(ref, recipe_dir, allow_pickle) for ref in recipe.model_paths()}
    check_adapter_bases(recipe, readers)
    return prepare_inputs(recipe, readers)  # chat template checked, vocabularies re-indexed (tokenizer_merge)


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise RecipeError(f"unknown merge_method '{name}'{closest(name, list(METHODS))}")
    return METHODS[name]


def check_architectures(readers: dict[str, ModelReader], allow_mixed: bool) -> None:
    types = {ref: r.model_type for ref, r in readers.items()}
    if len(set(types.values())) > 1 and not allow_mixed:
        detail = ", ".join(f"{ref}: {t}" for ref, t in types.items())
        raise CompatibilityError(f"models have different architectures (config.json model_type: {detail}); "
                                 "merge models of one architecture or pass --allow-mixed")


def expert_count_ok(spec: MethodSpec, count: int) -> bool:
    """Whether the method merges ``count`` models besides the base."""
    return count >= spec.min_experts and (spec.max_experts is None or count <= spec.max_experts)


def expert_count_text(spec: MethodSpec) -> str:
    """How many models besides the base a method merges, in words ('2 or more', '1')."""
    if spec.max_experts == spec.min_experts:
        return f"{spec.min_experts}"
    return f"{spec.min_experts}" + (f" to {spec.max_experts}" if spec.max_experts else " or more")


def output_dtype(recipe: Recipe, reference: ModelReader) -> torch.dtype:
    name = recipe.out_dtype or recipe.dtype
    if name is not None:
        return torch_dtype(name)
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


def check_param_groups(spec: MethodSpec, jobs: list[TensorJob]) -> None:
    """Run the method's ``check_params`` once per distinct set of resolved parameters (named by its first
    tensor), so combinations that are wrong together are refused while planning."""
    if spec.check_params is None:
        return
    seen: set[str] = set()
    for job in jobs:
        key = json.dumps(job.params, sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            spec.check_params(job.params, job.name)


def finish_plan(recipe: Recipe, spec: MethodSpec, readers: dict[str, ModelReader], reference: str,
                jobs: list[TensorJob], config: dict[str, Any], warnings: list[str], shard_size: int) -> MergePlan:
    """The ``MergePlan`` of a front-end's jobs, once their parameters pass the method's own checks."""
    check_param_groups(spec, jobs)
    out_dtype = output_dtype(recipe, readers[reference])
    layout = ShardLayout.of([PlannedTensor(job.name, job.shape, out_dtype) for job in jobs], shard_size)
    return MergePlan(recipe, spec, readers, reference, jobs, out_dtype, config,
                     tokenizer_folder(recipe, readers, reference), layout, warnings)
