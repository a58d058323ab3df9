"""``slices:`` recipes: output layers stacked from layer ranges of the inputs (frankenmerges), as mergekit does.

Each output slice merges the same number of layers from each of its sources (``layer_range`` half-open), and
slices are stacked in order, so the output has the sum of the slices' lengths as its layer count and its layers
are renumbered from 0. Tensors outside the layer stack come from the first slice's sources (embeddings) or the
last slice's (final norm, head), as in mergekit. Gradients run over each slice (``t = i / (len − 1)``, 1 for
a one-layer slice) and are 0 outside the stack. Parameter precedence: slice source, output slice, top level.
The same layers may appear in several slices (layer duplication is what frankenmerges do).
"""

from __future__ import annotations

from typing import Any

from mergelab.checkpoint.layout import TensorInfo, layer_index, num_layers, rename_layer, tensor_info
from mergelab.checkpoint.reader import ModelReader
from mergelab.config import OutputSlice, Recipe
from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodSpec
from mergelab.params import validate_scope
from mergelab.plan.data import MergePlan, Source, TensorJob
from mergelab.plan.sources import expert_count_ok, finish_plan, input_name, resolve_params, vocab_rows


def _check_slice(index: int, out_slice: OutputSlice, spec: MethodSpec, readers: dict[str, ModelReader],
                 base: str | None) -> int:
    """Validate one output slice and return its length in layers."""
    where = f"slices[{index}]"
    validate_scope(spec, out_slice.parameters, f"parameters of {where}", per_model=False)
    lengths = set()
    seen = set()
    for source in out_slice.sources:
        start, end = source.layer_range
        available = num_layers(readers[source.model].config)
        if not 0 <= start < end <= available:
            raise RecipeError(f"{where}: layer_range [{start}, {end}) of {source.model} is empty or outside its "
                              f"{available} layers; use 0 <= start < end <= {available}")
        if source.model in seen:
            raise RecipeError(f"{where}: model {source.model} is listed twice in one slice; give each source once")
        seen.add(source.model)
        validate_scope(spec, source.parameters, f"parameters of {source.model} in {where}", per_model=True)
        lengths.add(end - start)
    if len(lengths) > 1:
        raise RecipeError(f"{where}: sources span different numbers of layers ({sorted(lengths)}); a slice merges "
                          "layer i of each source, so give every source the same length")
    if spec.base == "required" and base not in seen:
        raise RecipeError(f"{where}: method '{spec.name}' needs the base model {base} among the slice's sources")
    n_experts = len(out_slice.sources) - (1 if spec.base != "ignored" and base in seen else 0)
    if not expert_count_ok(spec, n_experts):
        raise RecipeError(f"{where}: method '{spec.name}' cannot merge {n_experts} source(s) besides the base")
    return lengths.pop()


def _job(spec: MethodSpec, recipe: Recipe, readers: dict[str, ModelReader], out_slice: OutputSlice, base: str | None,
         out_name: str, in_layer: dict[str, int] | None, info: TensorInfo, t: float, strict: bool,
         warnings: list[str]) -> TensorJob:
    """One output tensor of a slice: inputs renamed to each source's layer, parameters by precedence."""
    reference = base if base in readers and base in [s.model for s in out_slice.sources] else out_slice.sources[0].model
    ref_reader = readers[reference]
    ref_name = out_name if in_layer is None else rename_layer(out_name, in_layer[reference])
    shape = ref_reader.shape(ref_name)
    base_source, experts, scopes = None, [], []
    for source in out_slice.sources:
        name = out_name if in_layer is None else rename_layer(out_name, in_layer[source.model])
        name = input_name(readers[source.model], name, source.model)
        rows = vocab_rows(name, info.kind, shape, source.model, readers[source.model], name, strict, warnings)
        if spec.base != "ignored" and source.model == base:
            base_source = Source(source.model, name, rows)
        else:
            experts.append(Source(source.model, name, rows))
            scopes.append(source.parameters)
    params = resolve_params(spec, scopes, [out_slice.parameters, recipe.parameters], out_name, t)
    return TensorJob(out_name, shape, info, base_source, experts, params)


def _remap_config(config: dict[str, Any], layer_sources: list[tuple[str, int]], readers: dict[str, ModelReader],
                  ) -> dict[str, Any]:
    """The reference config with the new layer count and per-layer lists (e.g. ``layer_types``) remapped."""
    config = dict(config)
    old = num_layers(config)
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == old and old > 0:
            config[key] = [readers[model].config.get(key, value)[layer] for model, layer in layer_sources]
    config["num_hidden_layers"] = len(layer_sources)
    return config


def plan_slices(recipe: Recipe, spec: MethodSpec, readers: dict[str, ModelReader], *, strict: bool,
                shard_size: int) -> MergePlan:
    """Resolve a ``slices:`` recipe into output tensor jobs in write order (pre, layers, post)."""
    slices = recipe.slices or []
    bases = [s.base_model or recipe.base_model for s in slices]
    if spec.base == "required" and any(b is None for b in bases):
        raise RecipeError(f"method '{spec.name}' needs a base_model (top level or per slice); add one")
    lengths = [_check_slice(i, s, spec, readers, b) for i, (s, b) in enumerate(zip(slices, bases))]
    total = sum(lengths)
    first_ref = slices[0].sources[0].model
    ref_reader = readers[first_ref]
    ref_layer = slices[0].sources[0].layer_range[0]
    layer_names = [n for n in ref_reader.names if layer_index(n) == ref_layer]
    outside = [n for n in ref_reader.names if layer_index(n) is None]
    warnings: list[str] = []
    jobs: list[TensorJob] = []
    layer_sources: list[tuple[str, int]] = []
    config_for_info = {"num_hidden_layers": total}

    def outside_jobs(names: list[str], out_slice: OutputSlice, base: str | None) -> None:
        for name in names:
            info = tensor_info(name, config_for_info)
            jobs.append(_job(spec, recipe, readers, out_slice, base, name, None, info, 0.0, strict, warnings))

    pre = [n for n in outside if tensor_info(n, {}).kind == "embedding"]
    outside_jobs(pre, slices[0], bases[0])
    out_layer = 0
    for out_slice, base, length in zip(slices, bases, lengths):
        for i in range(length):
            in_layer = {s.model: s.layer_range[0] + i for s in out_slice.sources}
            t = i / (length - 1) if length > 1 else 1.0
            for name in layer_names:
                out_name = rename_layer(name, out_layer)
                info = TensorInfo(out_name, out_layer, tensor_info(name, {}).kind, total)
                jobs.append(_job(spec, recipe, readers, out_slice, base, out_name, in_layer, info, t, strict,
                                 warnings))
            layer_sources.append((out_slice.sources[0].model, out_slice.sources[0].layer_range[0] + i))
            out_layer += 1
    outside_jobs([n for n in outside if n not in pre], slices[-1], bases[-1])
    config = _remap_config(ref_reader.config, layer_sources, readers)
    return finish_plan(recipe, spec, readers, first_ref, jobs, config, warnings, shard_size)
