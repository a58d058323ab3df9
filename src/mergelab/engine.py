"""recipe -> plan -> (read | compute | write) -> model folder.

Reading, computing and writing overlap: a small thread pool reads the inputs of the next ``read_ahead`` output
tensors (memory-mapped, checked for NaN/Inf), the calling thread runs the method, and a writer thread appends
results to the current shard. Only the tensors in flight are in memory, so peak memory is bounded by about
``read_ahead + 2`` tensor groups whatever the model size. The engine knows nothing of a method's maths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.checkpoint.writer import OutputFolder, PlannedTensor, ShardWriter, plan_shards, shard_file_names
from mergelab.config import Recipe
from mergelab.errors import CheckpointError, MergelabError, OutputError, RecipeError
from mergelab.methods.spec import MethodCall
from mergelab.output_files import write_metadata_files
from mergelab.plan import MergePlan, TensorJob, build_plan, resolve_model_path

log = logging.getLogger("mergelab")


@dataclass
class MergeOptions:
    """How to run a merge (never what to compute: that is the recipe)."""

    device: str = "cpu"
    float64: bool = False
    shard_size: int = 5_000_000_000
    overwrite: bool = False
    resume: bool = False
    allow_pickle: bool = False
    allow_mixed: bool = False
    strict: bool = False
    seed: int | None = None
    read_ahead: int = 2
    read_threads: int = 2
    progress: bool = True


@dataclass
class MergeStats:
    """Per-tensor statistics gathered while streaming (fractions of elements, method statistics)."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_read: int = 0


def open_inputs(recipe: Recipe, recipe_dir: Path | None, allow_pickle: bool) -> dict[str, ModelReader]:
    """Open every model the recipe names, keyed by its reference as written in the recipe."""
    return {ref: open_model(resolve_model_path(ref, recipe_dir), allow_pickle=allow_pickle)
            for ref in recipe.model_paths()}


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are computed in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def plan_key(plan: MergePlan, options: MergeOptions) -> str:
    """Identity of a merge's output: recipe, input fingerprints and the options that change bytes."""
    parts = {
        "recipe": plan.recipe.model_dump(mode="json"),
        "inputs": {ref: r.fingerprint for ref, r in plan.readers.items()},
        "shard_size": options.shard_size, "float64": options.float64, "seed": options.seed,
        "device": options.device,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read(plan: MergePlan, job: TensorJob) -> list[torch.Tensor]:
    """Inputs of one job (base first if any), rows trimmed by the vocabulary rule, checked finite."""
    tensors = []
    for source in ([job.base] if job.base else []) + job.experts:
        tensor = plan.readers[source.model].get(source.name)
        if source.rows is not None:
            tensor = tensor[: source.rows]
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source.model}: tensor '{source.name}' contains NaN or Inf values; repair or "
                                  "exclude this model")
        tensors.append(tensor)
    return tensors


def _compute(plan: MergePlan, job: TensorJob, inputs: list[torch.Tensor], options: MergeOptions,
             seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the method on one job; return the output (in the output dtype, on CPU) and its statistics."""
    compute_dtype = torch.float64 if options.float64 else torch.float32
    moved = [t.to(options.device, compute_dtype) for t in inputs]
    base = moved[0] if job.base else None
    experts = moved[1:] if job.base else moved
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=options.device).manual_seed(tensor_seed(seed, job.name))
    result = plan.method.fn(MethodCall(base, experts, job.info, job.params, generator))
    merged, method_stats = result if isinstance(result, tuple) else (result, {})
    out = merged.to(plan.out_dtype).cpu()
    del merged, moved
    if not torch.isfinite(out).all():
        raise RecipeError(f"method '{plan.method.name}' produced NaN or Inf in tensor '{job.name}' (as "
                          f"{plan.out_dtype}); check its parameters (weights summing to zero, extreme lambda)")
    stats: dict[str, Any] = {"numel": out.numel()}
    sources = ([job.base] if job.base else []) + job.experts
    equal = {s.model: _fraction_equal(out, t) for s, t in zip(sources, inputs)}
    if job.base is not None:
        stats["changed_from_base"] = 1.0 - equal[job.base.model]
    stats["equal_to"] = equal
    stats.update(method_stats)
    return out, stats


def _fraction_equal(out: torch.Tensor, parent: torch.Tensor) -> float:
    """Fraction of output elements equal to a parent's, compared in the output dtype."""
    parent = parent.to(out.dtype)
    return torch.count_nonzero(out == parent).item() / max(out.numel(), 1)


class _Writer(threading.Thread):
    """The writer thread: appends computed tensors to shards in plan order and records finished shards."""

    def __init__(self, output: OutputFolder, shards: list[list[PlannedTensor]], names: list[str]):
        super().__init__(daemon=True)
        self.output, self.shards, self.names = output, shards, names
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.current: ShardWriter | None = None

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                shard_index, name, tensor = item
                if self.current is None:
                    self.current = ShardWriter(self.output.partial / self.names[shard_index],
                                               self.shards[shard_index])
                self.current.add(name, tensor)
                if self.current.complete:
                    self.output.record(self.names[shard_index], self.current.close())
                    self.current = None
            if self.current is not None:  # stopped before the shard was complete: leave no .tmp behind
                self.current.abort()
        except BaseException as error:  # handed to the main thread
            self.error = error
            if self.current is not None:
                self.current.abort()
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)


def stream(plan: MergePlan, output: OutputFolder, options: MergeOptions, seed: int) -> MergeStats:
    """Read, compute and write every tensor of the plan not already in a verified shard."""
    from tqdm import tqdm

    planned = [PlannedTensor(job.name, job.shape, plan.out_dtype) for job in plan.jobs]
    shards = plan_shards(planned, options.shard_size)
    names = shard_file_names(len(shards))
    jobs = {job.name: job for job in plan.jobs}
    todo = [(i, jobs[t.name]) for i, shard in enumerate(shards) if names[i] not in output.done for t in shard]
    stats = MergeStats()
    writer = _Writer(output, shards, names)
    writer.start()
    bar = tqdm(total=len(plan.jobs), initial=len(plan.jobs) - len(todo), unit="tensor", disable=not options.progress,
               desc="merging")
    started = time.perf_counter()
    pending: deque[tuple[int, TensorJob, Future]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=options.read_threads) as pool:
            upcoming = iter(todo)
            for shard_index, job in upcoming:
                pending.append((shard_index, job, pool.submit(_read, plan, job)))
                if len(pending) > options.read_ahead:
                    break
            while pending:
                shard_index, job, future = pending.popleft()
                inputs = future.result()
                next_item = next(upcoming, None)
                if next_item is not None:
                    pending.append((*next_item, pool.submit(_read, plan, next_item[1])))
                stats.bytes_read += sum(t.numel() * t.element_size() for t in inputs)
                out, tensor_stats = _compute(plan, job, inputs, options, seed)
                del inputs
                stats.tensors[job.name] = tensor_stats
                writer.put((shard_index, job.name, out))
                bar.update(1)
                bar.set_postfix_str(f"{stats.bytes_read / 1e9 / max(time.perf_counter() - started, 1e-9):.2f} GB/s")
    finally:
        for _, _, future in pending:
            future.cancel()
        writer.queue.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error
    return stats


def run_merge(recipe: Recipe, out_dir: str | Path, options: MergeOptions | None = None,
              recipe_dir: Path | None = None) -> Path:
    """Merge a validated recipe into ``out_dir``. User errors raise ``MergelabError`` and leave nothing."""
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    readers = open_inputs(recipe, recipe_dir, options.allow_pickle)
    plan = build_plan(recipe, readers, strict=options.strict, allow_mixed=options.allow_mixed)
    for warning in plan.warnings:
        log.warning(warning)
    seed = recipe.seed if options.seed is None else options.seed
    output = OutputFolder(out_dir, [r.folder for r in readers.values()], options.overwrite, options.resume,
                          plan_key(plan, options))
    try:
        stats = stream(plan, output, options, seed)
        write_metadata_files(plan, output, stats.tensors, options.shard_size, seed)
    except MergelabError:
        output.discard()
        raise
    except OSError as error:  # disk full, permissions: keep what is done for --resume
        raise OutputError(f"writing {output.partial} failed ({error.strerror}); free space or fix permissions, "
                          "then run the same command with --resume") from None
    return output.finish()
