"""recipe -> plan -> (read | compute | write) -> model folder.

Reading, computing and writing overlap: a small thread pool reads the inputs of the next ``read_ahead`` output
tensors (memory-mapped, checked for NaN/Inf), the calling thread runs the method, and a writer thread appends
results to the current shard. Only the tensors in flight are in memory, so peak memory is bounded by about
``read_ahead + 2`` tensor groups whatever the model size; for elementwise methods a large tensor is split
into row blocks of at most ``chunk_elements`` elements, so memory does not grow even with the largest tensor.
The engine knows nothing of a method's maths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from mergelab.output_files import write_model_files, write_record
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
    chunk_elements: int = 1 << 22
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


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one output tensor: the whole tensor, or a row block of an elementwise method."""

    shard: int
    job: TensorJob
    start: int
    stop: int
    whole: bool


def pieces(plan: MergePlan, shard: int, job: TensorJob, max_elements: int) -> list[Piece]:
    """Split a job into row blocks of at most ``max_elements`` when its method is elementwise."""
    rows = job.shape[0] if job.shape else 1
    row_size = max(1, torch.Size(job.shape[1:]).numel()) if job.shape else 1
    per_piece = max(1, max_elements // row_size)
    if not plan.method.elementwise or rows <= per_piece or not job.shape:
        return [Piece(shard, job, 0, rows, True)]
    return [Piece(shard, job, a, min(a + per_piece, rows), False) for a in range(0, rows, per_piece)]


def _read(plan: MergePlan, piece: Piece) -> list[torch.Tensor]:
    """Inputs of one piece (base first if any), rows trimmed by the vocabulary rule."""
    tensors = []
    job = piece.job
    for source in ([job.base] if job.base else []) + job.experts:
        reader = plan.readers[source.model]
        if piece.whole:
            tensor = reader.get(source.name)
            if source.rows is not None:
                tensor = tensor[: source.rows]
        else:
            tensor = reader.get(source.name, (piece.start, piece.stop))
        tensors.append(tensor)
    return tensors


def _compute(plan: MergePlan, piece: Piece, inputs: list[torch.Tensor], options: MergeOptions,
             seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the method on one piece; return the output (output dtype, on CPU) and its element counts."""
    job = piece.job
    compute_dtype = torch.float64 if options.float64 else torch.float32
    moved = [t.to(options.device, compute_dtype) for t in inputs]
    sources = ([job.base] if job.base else []) + job.experts
    if not all_finite(moved):
        for source, tensor in zip(sources, moved):
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{source.model}: tensor '{source.name}' contains NaN or Inf values; repair "
                                      "or exclude this model")
    base = moved[0] if job.base else None
    experts = moved[1:] if job.base else moved
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=options.device).manual_seed(tensor_seed(seed, job.name))
    result = plan.method.fn(MethodCall(base, experts, job.info, job.params, generator))
    merged, method_stats = result if isinstance(result, tuple) else (result, {})
    out = merged.to(plan.out_dtype).cpu()
    checked = [merged, out] if plan.out_dtype == torch.float16 else [merged]  # float16 can overflow in the cast
    finite = all_finite(checked) or bool(torch.isfinite(out).all())
    del merged, moved, checked
    if not finite:
        raise RecipeError(f"method '{plan.method.name}' produced NaN or Inf in tensor '{job.name}' (as "
                          f"{plan.out_dtype}); check its parameters (weights summing to zero, extreme lambda)")
    equal = {s.model: torch.count_nonzero(out == t.to(out.dtype)).item() for s, t in zip(sources, inputs)}
    counts = {"numel": out.numel(), "equal_to": equal}
    return out, {**counts, **method_stats}


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, by one float32 sum each (a NaN or Inf anywhere makes the sum
    non-finite); a False may also mean a finite sum overflowed, so callers confirm with ``isfinite``. A sum is
    several times cheaper than ``isfinite(...).all()``, which writes a boolean tensor."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)


def _add_counts(stats: MergeStats, piece: Piece, counts: dict[str, Any]) -> None:
    """Accumulate a piece's counts; turn them into fractions when its tensor is complete."""
    entry = stats.tensors.setdefault(piece.job.name, {"numel": 0, "equal_to": {}})
    entry["numel"] += counts.pop("numel")
    for model, n in counts.pop("equal_to").items():
        entry["equal_to"][model] = entry["equal_to"].get(model, 0) + n
    entry.update(counts)
    if piece.stop == (piece.job.shape[0] if piece.job.shape else 1):
        total = max(entry["numel"], 1)
        entry["equal_to"] = {m: n / total for m, n in entry["equal_to"].items()}
        if piece.job.base is not None:
            entry["changed_from_base"] = 1.0 - entry["equal_to"][piece.job.base.model]


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
    todo = [piece for i, shard in enumerate(shards) if names[i] not in output.done for t in shard
            for piece in pieces(plan, i, jobs[t.name], options.chunk_elements)]
    stats = MergeStats()
    writer = _Writer(output, shards, names)
    writer.start()
    done_before = len(plan.jobs) - len({p.job.name for p in todo})
    bar = tqdm(total=len(plan.jobs), initial=done_before, unit="tensor", disable=not options.progress, desc="merging")
    started = time.perf_counter()
    pending: deque[tuple[Piece, Future]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=options.read_threads) as pool:
            upcoming = iter(todo)
            for piece in upcoming:
                pending.append((piece, pool.submit(_read, plan, piece)))
                if len(pending) > options.read_ahead:
                    break
            while pending:
                piece, future = pending.popleft()
                inputs = future.result()
                next_piece = next(upcoming, None)
                if next_piece is not None:
                    pending.append((next_piece, pool.submit(_read, plan, next_piece)))
                stats.bytes_read += sum(t.numel() * t.element_size() for t in inputs)
                out, counts = _compute(plan, piece, inputs, options, seed)
                del inputs
                _add_counts(stats, piece, counts)
                writer.put((piece.shard, piece.job.name, out))
                if piece.stop == (piece.job.shape[0] if piece.job.shape else 1):
                    bar.update(1)
                bar.set_postfix_str(f"{stats.bytes_read / 1e9 / max(time.perf_counter() - started, 1e-9):.2f} GB/s")
    finally:
        for _, future in pending:
            future.cancel()
        writer.queue.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error
    return stats


def rescale_written(folder: Path, scales: dict[str, float]) -> None:
    """Multiply written tensors by factors (a ``finish`` pass), one shard in memory at a time, in float32."""
    if not scales:
        return
    from safetensors.torch import load_file, save_file

    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        if not scales.keys() & tensors.keys():
            continue
        for name, factor in scales.items():
            if name in tensors:
                tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
        tmp = shard.with_name(shard.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, shard)


def run_merge(recipe: Recipe, out_dir: str | Path, options: MergeOptions | None = None,
              recipe_dir: Path | None = None) -> Path:
    """Merge a validated recipe into ``out_dir``. User errors raise ``MergelabError`` and leave nothing."""
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    readers = open_inputs(recipe, recipe_dir, options.allow_pickle)
    try:
        return _merge_opened(recipe, readers, out_dir, options)
    finally:
        for reader in readers.values():
            reader.close()


def _merge_opened(recipe: Recipe, readers: dict[str, ModelReader], out_dir: Path, options: MergeOptions) -> Path:
    plan = build_plan(recipe, readers, strict=options.strict, allow_mixed=options.allow_mixed)
    for warning in plan.warnings:
        log.warning(warning)
    seed = recipe.seed if options.seed is None else options.seed
    output = OutputFolder(out_dir, [r.folder for r in readers.values()], options.overwrite, options.resume,
                          plan_key(plan, options))
    try:
        passes: dict[str, dict[str, Any]] = {}
        if plan.method.prepare is not None:
            prepared = plan.method.prepare(plan, options)
            for job in plan.jobs:
                job.params.update(prepared.params.get(job.name, {}))
            passes["prepare"] = prepared.record
        stats = stream(plan, output, options, seed)
        write_model_files(plan, output, options.shard_size)
        if plan.method.finish is not None:
            finished = plan.method.finish(plan, output.partial, options)
            rescale_written(output.partial, finished.scales)
            passes["finish"] = {**finished.record, "rescaled": finished.scales}
        write_record(plan, output, stats.tensors, seed, passes)
    except MergelabError:
        output.discard()
        raise
    except OSError as error:  # disk full, permissions: keep what is done for --resume
        raise OutputError(f"writing {output.partial} failed ({error.strerror}); free space or fix permissions, "
                          "then run the same command with --resume") from None
    return output.finish()
