"""The ``models:`` front-end: every tensor of the reference model merged from the same inputs, with parameters
resolved per tensor (gradients over the layer stack, filters, precedence model > top level)."""

from __future__ import annotations

from mergelab.checkpoint.layout import num_layers, tensor_info
from mergelab.checkpoint.reader import ModelReader
from mergelab.config import Recipe
from mergelab.errors import CompatibilityError, RecipeError
from mergelab.methods.spec import MethodSpec
from mergelab.params import validate_scope
from mergelab.plan.data import MergePlan, Source, TensorJob
from mergelab.plan.sources import (
    expert_count_ok,
    expert_count_text,
    finish_plan,
    input_name,
    resolve_params,
    vocab_rows,
)


def plan_models(recipe: Recipe, spec: MethodSpec, readers: dict[str, ModelReader], *, strict: bool,
                shard_size: int) -> MergePlan:
    """Resolve a ``models:`` recipe into output tensor jobs, in the reference model's tensor order."""
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
    if not expert_count_ok(spec, n):
        raise RecipeError(f"method '{spec.name}' merges {expert_count_text(spec)} model(s) besides the base, but "
                          f"the recipe gives {n}")
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
    return finish_plan(recipe, spec, readers, reference, jobs, dict(config), warnings, shard_size)
