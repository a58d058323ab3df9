"""``--compat mergekit`` (or ``compat: mergekit``): mergekit 0.1.5's arithmetic, for reproducing its bytes.

mergekit casts every input to the recipe's ``dtype`` (or, without one, keeps the stored dtype, promoted across the
inputs) and computes in that dtype; linear, SLERP and Karcher accumulate in float32 and round back. Under compat
the recipe is read as mergekit reads it (``compat_recipe``) and every method both tools have runs mergekit's
formulas in that working dtype (``compat_spec``):

- task-arithmetic family: ``Δ = Σ_i w_i s(δ_i)`` with the weights applied before the TIES sign vote
  (``sign(Σ_i w_i δ_i)``), the divisor ``Σ_i w_i m_i`` (zeros set to 1), ``λ`` applied after normalising; the
  TIES trim keeps the ``max(1, ⌊density·n⌋)`` largest magnitudes in ``torch.argsort`` order, Breadcrumbs the
  window of an ascending ``torch.sort``; random drops (DARE, DELLA) use mergelab's draws (they only need to run);
- ``karcher``: equal weights over the models and the base (the base joins the mean, last), mergekit's iteration;
- ``arcee_fusion``: forward KL on softmaxes in the working dtype, quantiles read at index ``⌊q (n − 1)⌋`` of the
  sorted saliencies (mergekit samples 10^6 of them on larger tensors, at random), a float32 mask, so the output is
  float32 unless ``out_dtype`` says otherwise;
- ``slerp``, ``nuslerp``, ``multislerp``, ``model_stock``, ``sce``, ``linear``: mergekit's formulas in the working
  dtype.

A parameter mergekit does not know for the method (it ignores it silently) is dropped with a one-line warning.
Methods mergekit lacks run as without compat.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from mergelab.checkpoint.dtypes import torch_dtype
from mergelab.config import Recipe, Setting
from mergelab.mergekit_arithmetic import ARITHMETIC
from mergelab.methods.context import ModelContext
from mergelab.methods.spec import MethodCall, MethodSpec, ModelPass

log = logging.getLogger("mergelab")

_TASK = ("weight", "lambda", "normalize", "int8_mask", "rescale")
MERGEKIT_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": _TASK,
    "ties": (*_TASK, "density"),
    "dare_linear": (*_TASK, "density"),
    "dare_ties": (*_TASK, "density"),
    "della": (*_TASK, "density", "epsilon"),
    "della_linear": (*_TASK, "density", "epsilon"),
    "breadcrumbs": (*_TASK, "density", "gamma"),
    "breadcrumbs_ties": (*_TASK, "density", "gamma"),
    "slerp": ("t",),
    "nuslerp": ("weight", "nuslerp_row_wise", "nuslerp_flatten"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "karcher": ("max_iter", "tol"),
    "model_stock": ("filter_wise",),
    "sce": ("select_topk", "int8_mask"),
    "arcee_fusion": (),
}



def _kept(scope: dict[str, Setting] | None, known: tuple[str, ...], where: str, method: str) -> dict | None:
    if not scope:
        return scope
    for name in scope:
        if name not in known:
            log.warning(f"compat mergekit: {where}: mergekit's {method} ignores parameter '{name}'; dropped")
    return {k: v for k, v in scope.items() if k in known}


def compat_recipe(recipe: Recipe) -> Recipe:
    """The recipe as mergekit 0.1.5 reads it: parameters it does not know dropped (each with a warning), the base
    among karcher's models, and arcee_fusion's float32 output where ``out_dtype`` does not say otherwise."""
    method = recipe.merge_method
    known = MERGEKIT_PARAMS.get(method)
    if recipe.compat != "mergekit" or known is None:
        return recipe
    models = [e.model_copy(update={"parameters": _kept(e.parameters, known, f"model {e.model}", method)})
              for e in recipe.models or []]
    if method == "karcher" and recipe.base_model and recipe.base_model not in [e.model for e in models]:
        models.append(models[0].model_copy(update={"model": recipe.base_model, "parameters": None}))
    slices = [s.model_copy(update={
        "parameters": _kept(s.parameters, known, "slice", method),
        "sources": [src.model_copy(update={"parameters": _kept(src.parameters, known, f"source {src.model}",
                                                                  method)}) for src in s.sources]})
        for s in recipe.slices or []]
    update: dict[str, Any] = {"models": models or None, "slices": slices or None,
                              "parameters": _kept(recipe.parameters, known, "top-level parameters", method)}
    if method == "arcee_fusion" and recipe.out_dtype is None:
        update["out_dtype"] = "float32"
    return recipe.model_copy(update=update)


def compat_spec(recipe: Recipe, spec: MethodSpec) -> MethodSpec:
    """The method as mergekit computes it, when compat is on and mergekit has the method; else ``spec``."""
    if recipe.compat != "mergekit" or spec.name not in ARITHMETIC:
        return spec
    working = torch_dtype(recipe.dtype) if recipe.dtype else None  # validated and de-aliased by the schema

    def prepare(context: ModelContext) -> ModelPass:
        extras = {}
        for job in context.tensors:
            dtype = working
            if dtype is None:  # mergekit keeps the stored dtypes, promoted across the inputs
                for source in ([job.base] if job.base else []) + job.experts:
                    stored = context.readers[source.model].dtype(source.name)
                    dtype = stored if dtype is None else torch.promote_types(dtype, stored)
            extras[job.name] = {"working_dtype": dtype}
        return ModelPass(extras=extras, record={"compat": "mergekit 0.1.5"})

    arithmetic = ARITHMETIC[spec.name]

    def run(call: MethodCall) -> torch.Tensor:
        dtype = call.extras["working_dtype"]
        base = None if call.base is None else call.base.to(dtype)
        return arithmetic(base, [e.to(dtype) for e in call.experts], call)

    return replace(spec, fn=run, prepare=prepare, finish=None, elementwise=False, two_pass=None,
                   random=spec.random or spec.name == "arcee_fusion",
                   citation=spec.citation + "; mergekit 0.1.5 arithmetic (--compat mergekit)")
