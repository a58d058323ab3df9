"""The planner's entry point: checks common to both recipe shapes, then the ``models`` or ``slices`` front-end.

Everything that can be wrong with the inputs (missing tensors, shapes, architectures, parameters alone and
together) is found here, before a byte is written.
"""

from __future__ import annotations

from mergelab.checkpoint.reader import ModelReader
from mergelab.config import Recipe
from mergelab.mergekit_compat import compat_recipe, compat_spec
from mergelab.params import validate_scope
from mergelab.plan.data import DEFAULT_SHARD_SIZE, MergePlan
from mergelab.plan.models import plan_models
from mergelab.plan.slices import plan_slices
from mergelab.plan.sources import check_architectures, method_spec


def build_plan(recipe: Recipe, readers: dict[str, ModelReader], *, strict: bool = False,
               allow_mixed: bool = False, shard_size: int = DEFAULT_SHARD_SIZE) -> MergePlan:
    """Resolve a recipe into output tensor jobs, checked, with the output's shard layout for ``shard_size``."""
    recipe = compat_recipe(recipe)  # --compat mergekit: the recipe read, and the method computed, as mergekit does
    spec = compat_spec(recipe, method_spec(recipe.merge_method))
    check_architectures(readers, allow_mixed)
    validate_scope(spec, recipe.parameters, "top-level parameters", per_model=False)
    front_end = plan_slices if recipe.slices else plan_models
    return front_end(recipe, spec, readers, strict=strict, shard_size=shard_size)
