"""The road of a merge: recipe -> plan -> (prepare) -> stream (read -> method -> write) -> model files ->
(finish) -> record. Each step is owned elsewhere: ``plan/`` resolves and checks the recipe, ``stream/`` reads,
computes and writes the tensors and counts the statistics, ``output_files`` writes everything besides the
weights, ``checkpoint.writer`` the shards. This module only runs them in order, with the method's model-level
passes (``methods.context``) around the stream, and turns errors into a clean output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.checkpoint.writer import OutputFolder, rescale_shards
from mergelab.config import Recipe
from mergelab.errors import MergelabError, OutputError, RecipeError
from mergelab.methods.context import ModelContext
from mergelab.output_files import write_model_files, write_record
from mergelab.plan.build import build_plan
from mergelab.plan.data import MergePlan
from mergelab.plan.sources import open_inputs
from mergelab.stream.options import MergeOptions, plan_key
from mergelab.stream.pipeline import stream
from mergelab.stream.schedule import schedule

log = logging.getLogger("mergelab")


def run_merge(recipe: Recipe, out_dir: str | Path, options: MergeOptions | None = None,
              recipe_dir: Path | None = None) -> Path:
    """Merge a validated recipe into ``out_dir``. User errors raise ``MergelabError`` and leave nothing."""
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    readers = open_inputs(recipe, recipe_dir, options.allow_pickle)
    try:
        return merge_opened(recipe, readers, out_dir, options)
    finally:
        for reader in readers.values():
            reader.close()


def model_context(plan: MergePlan, device: str, merged: ModelReader | None = None) -> ModelContext:
    """What the method's model-level passes see of the plan."""
    first = plan.jobs[0] if plan.jobs else None
    base = first.base.model if first is not None and first.base is not None else None
    return ModelContext(plan.readers, base, plan.reference, tuple(plan.jobs), device, merged)


def merge_opened(recipe: Recipe, readers: dict[str, ModelReader], out_dir: Path, options: MergeOptions) -> Path:
    """Plan, stream and finish a merge of models already opened."""
    plan = build_plan(recipe, readers, strict=options.strict, allow_mixed=options.allow_mixed,
                      shard_size=options.shard_size)
    for warning in plan.warnings:
        log.warning(warning)
    seed = recipe.seed if options.seed is None else options.seed
    output = OutputFolder(out_dir, [r.folder for r in readers.values()], options.overwrite, options.resume,
                          plan_key(plan, options))
    try:
        passes: dict[str, dict[str, Any]] = {}
        extras: dict[str, dict[str, Any]] = {}
        if plan.method.prepare is not None:
            prepared = plan.method.prepare(model_context(plan, options.device))
            extras = prepared.extras
            passes["prepare"] = prepared.record
        stats = stream(schedule(plan, options, seed, extras), output)
        write_model_files(plan, output)
        if plan.method.finish is not None:
            merged = open_model(output.partial)
            try:
                finished = plan.method.finish(model_context(plan, options.device, merged))
            finally:
                merged.close()
            rescale_shards(output.partial, finished.scales)
            passes["finish"] = {**finished.record, "rescaled": finished.scales}
        write_record(plan, output, stats.tensors, seed, passes)
    except MergelabError:
        output.discard()
        raise
    except OSError as error:  # disk full, permissions: keep what is done for --resume
        raise OutputError(f"writing {output.partial} failed ({error.strerror}); free space or fix permissions, "
                          "then run the same command with --resume") from None
    return output.finish()
