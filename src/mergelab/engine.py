"""recipe -> plan -> (read | compute | write) -> model folder.

Reading, computing and writing overlap: a small thread pool reads the inputs of the next ``read_ahead`` pieces
(memory maps made resident and checked for NaN/Inf), the calling thread and the compute lanes run the method, and a
writer thread appends results to the current shard. Only the pieces in flight are in memory, so peak memory is
bounded by about ``read_ahead + compute_threads + 1`` pieces whatever the model size. A piece is a whole tensor, or
a row block of at most ``chunk_elements`` elements: elementwise methods are always computed in blocks; ``TwoPass``
methods (a per-tensor statistic, then elementwise) stream the blocks of a tensor above ``stream_elements`` once per
statistics pass, then once more to compute, so memory does not grow even with the largest tensor. Both kinds compute
a piece in cache-sized tiles (``tile_elements``) on one torch thread; up to ``compute_threads`` pieces that carry no
cross-piece state are computed side by side in a thread pool, and their results reach the writer in plan order, so
the output does not depend on the thread count. The output statistics (fractions equal to each input) are counted
per piece on the stored bit patterns (per tile in the compute dtype where an input's dtype differs from the
output's). The engine knows nothing of a method's maths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.checkpoint.writer import OutputFolder, PlannedTensor, ShardWriter, plan_shards, shard_file_names
from mergelab.config import Recipe
from mergelab.errors import CheckpointError, MergelabError, OutputError, RecipeError
from mergelab.methods.spec import BlockState, MethodCall
from mergelab.output_files import write_model_files, write_record
from mergelab.plan import MergePlan, TensorJob, build_plan, resolve_model_path
from mergelab.tokenizer_merge import prepare_inputs

log = logging.getLogger("mergelab")


@dataclass
class MergeOptions:
    """How to run a merge (never what to compute: that is the recipe).

    Sizes in elements: ``chunk_elements`` per row block read from disk; ``stream_elements``: ``TwoPass`` methods
    read larger tensors in blocks, once per statistics pass; ``tile_elements`` per tile computed from a piece
    (cache-sized). ``compute_threads``: pieces of elementwise and ``TwoPass`` methods computed side by side on
    the CPU, each on one torch thread. Parallel pieces rather than multi-threaded torch ops: with OpenMP threads
    on a shared 2-core machine every op waited in a barrier for a busy core (4x the CPU time for the same merge),
    while independent pieces never wait for each other.
    """

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
    stream_elements: int = 1 << 24
    tile_elements: int = 1 << 18
    compute_threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    progress: bool = True


@dataclass
class MergeStats:
    """Per-tensor statistics gathered while streaming (fractions of elements, method statistics)."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_read: int = 0


def open_inputs(recipe: Recipe, recipe_dir: Path | None, allow_pickle: bool) -> dict[str, ModelReader]:
    """Open every model the recipe names, keyed by its reference as written in the recipe."""
    readers = {ref: open_model(resolve_model_path(ref, recipe_dir), allow_pickle=allow_pickle)
               for ref in recipe.model_paths()}
    return prepare_inputs(recipe, readers)  # issue 20: chat template checked, vocabularies re-indexed


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
    """Rows ``[start, stop)`` of one output tensor: the whole tensor or a row block. ``pass_index`` numbers the
    statistics passes of a ``TwoPass`` method (None: the piece is computed and written); ``check``: its inputs
    are checked for NaN/Inf (once per tensor: in the first pass that reads them)."""

    shard: int
    job: TensorJob
    start: int
    stop: int
    whole: bool
    pass_index: int | None = None
    check: bool = True

    @property
    def last(self) -> bool:
        """The piece ends its tensor (and so its pass)."""
        return self.stop == (self.job.shape[0] if self.job.shape else 1)


def row_blocks(plan: MergePlan, job: TensorJob, options: MergeOptions) -> list[tuple[int, int]] | None:
    """Row ranges of at most ``chunk_elements`` elements when the job is computed in blocks, else None.

    Elementwise methods split any tensor larger than a block. ``TwoPass`` methods split tensors of 2 or more
    dimensions above ``stream_elements`` (smaller ones are read once, whole, instead of once per pass), and
    random ones only on the CPU, where a generator draws the same numbers whether a tensor comes whole or in
    blocks (CUDA's draws depend on the launch shape).
    """
    if not job.shape:
        return None
    rows, row_size = job.shape[0], max(1, torch.Size(job.shape[1:]).numel())
    per_piece = max(1, options.chunk_elements // row_size)
    method = plan.method
    blockwise = method.elementwise or (
        method.two_pass is not None and len(job.shape) >= 2 and rows * row_size > options.stream_elements
        and (not method.random or torch.device(options.device).type == "cpu"))
    if not blockwise or rows <= per_piece:
        return None
    return [(a, min(a + per_piece, rows)) for a in range(0, rows, per_piece)]


def job_pieces(plan: MergePlan, shard: int, job: TensorJob, options: MergeOptions, seed: int,
               states: dict[str, BlockState]) -> Iterator[Piece]:
    """The pieces of one job, in order. For a ``TwoPass`` job in blocks, the statistics passes come first; how
    many is known only once a pass has been observed, so a pass may be yielded ahead (read-ahead) and then
    skipped by ``stream`` when the state turns out ``done``."""
    blocks = row_blocks(plan, job, options)
    if blocks is None:
        yield Piece(shard, job, 0, job.shape[0] if job.shape else 1, True)
        return
    checked = False
    if not plan.method.elementwise:
        state = states[job.name] = plan.method.two_pass.start(job.info, job.params, job.shape,
                                                               _generator(plan, job, options, seed))
        pass_index = 0
        while not state.done:
            for start, stop in blocks:
                if state.done:
                    break
                yield Piece(shard, job, start, stop, False, pass_index, check=pass_index == 0)
            checked, pass_index = True, pass_index + 1
    for start, stop in blocks:
        yield Piece(shard, job, start, stop, False, check=not checked)


def _generator(plan: MergePlan, job: TensorJob, options: MergeOptions, seed: int) -> torch.Generator | None:
    if not plan.method.random:
        return None
    return torch.Generator(device=options.device).manual_seed(tensor_seed(seed, job.name))


def _read(plan: MergePlan, piece: Piece) -> list[torch.Tensor]:
    """Inputs of one piece (base first if any), rows trimmed by the vocabulary rule, checked for NaN/Inf when
    ``piece.check`` (here, on the reading threads, which are idle most of the time, rather than while computing)."""
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
        if piece.check and not (all_finite([tensor]) or bool(torch.isfinite(tensor).all())):
            raise CheckpointError(f"{source.model}: tensor '{source.name}' contains NaN or Inf values; repair or "
                                  "exclude this model")
        tensors.append(tensor)
    return tensors


class _Buffers:
    """Reused work memory for tiles: one flat buffer per slot, grown when a larger tile needs it, so computing
    a piece allocates nothing large (fresh large allocations cost page faults on every piece)."""

    def __init__(self) -> None:
        self.flat: dict[int, torch.Tensor] = {}

    def get(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = torch.Size(shape).numel()
        flat = self.flat.get(slot)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != device:
            flat = self.flat[slot] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return flat[:numel].view(shape)


class _Tiles:
    """A piece's inputs cast to the compute dtype tile by tile: row ranges of at most ``tile_elements`` (one tile
    on other devices), each cast into the same buffers, so the method's many elementwise passes stay in the CPU
    cache and allocate nothing large. A tile's tensors are valid until the next tile is cast; one more buffer
    holds the tile's output back in the compute dtype, for counting equal elements."""

    def __init__(self, piece: Piece, inputs: list[torch.Tensor], options: MergeOptions, buffers: _Buffers):
        self.piece, self.inputs = piece, inputs
        self.dtype = torch.float64 if options.float64 else torch.float32
        self.device = torch.device(options.device)
        shape = tuple(inputs[0].shape)
        rows = shape[0] if shape else 1
        row_size = max(1, torch.Size(shape[1:]).numel()) if shape else 1
        per_tile = max(1, options.tile_elements // row_size) if self.device.type == "cpu" else rows
        self.bounds = [(a, min(a + per_tile, rows)) for a in range(0, rows, per_tile)] or [(0, 0)]
        tile_shape = (min(per_tile, rows), *shape[1:]) if shape else ()
        self.buffers = [buffers.get(i, tile_shape, self.dtype, self.device) for i in range(len(inputs) + 1)]

    def cast(self, a: int, b: int) -> list[torch.Tensor]:
        """Rows ``[a, b)`` of every input in the compute dtype."""
        return [buffer[: b - a].copy_(t[a:b]) if t.dim() else buffer.copy_(t)
                for buffer, t in zip(self.buffers, self.inputs)]

    def call(self, a: int, b: int, generator: torch.Generator | None = None) -> MethodCall:
        job = self.piece.job
        moved = self.cast(a, b)
        return MethodCall(moved[0] if job.base else None, moved[1:] if job.base else moved, job.info, job.params,
                          generator)


def _observe(plan: MergePlan, piece: Piece, inputs: list[torch.Tensor], options: MergeOptions,
             state: BlockState, buffers: _Buffers) -> None:
    """A statistics-pass piece: feed its tiles to the tensor's state, and close the pass after its last block."""
    tiles = _Tiles(piece, inputs, options, buffers)
    for a, b in tiles.bounds:
        state.observe(tiles.call(a, b))
    if piece.last:
        state.end_pass()


def _compute(plan: MergePlan, piece: Piece, inputs: list[torch.Tensor], options: MergeOptions, seed: int,
             state: BlockState | None, buffers: _Buffers) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the method on one piece; return the output (output dtype, on CPU) and its element counts.

    Elementwise and ``TwoPass`` methods run tile by tile (``_Tiles``); a whole tensor of a ``TwoPass`` method
    runs its statistics passes over the tiles in memory first. Other methods get the whole piece as one tile.
    """
    job, method = piece.job, plan.method
    tiled = method.elementwise or method.two_pass is not None
    tiles = _Tiles(piece, inputs, options if tiled else replace(options, tile_elements=1 << 62),
                   buffers if tiled else _Buffers())
    generator = None if method.two_pass is not None else _generator(plan, job, options, seed)
    if state is None and not method.elementwise and method.two_pass is not None:  # a whole TwoPass tensor
        state = method.two_pass.start(job.info, job.params, job.shape, _generator(plan, job, options, seed))
        while not state.done:
            for a, b in tiles.bounds:
                state.observe(tiles.call(a, b))
            state.end_pass()
    shape = job.shape if piece.whole else (piece.stop - piece.start, *job.shape[1:])
    out = torch.empty(shape, dtype=plan.out_dtype)
    totals: dict[str, Any] = {"numel": 0, "equal_to": {}}
    for a, b in tiles.bounds:
        call = tiles.call(a, b, generator)
        result = method.fn(call) if state is None else method.two_pass.block(call, state)
        counts = _output(plan, piece, tiles, call, result, (a, b), out[a:b] if out.dim() else out)
        totals["numel"] += counts.pop("numel")
        for model, n in counts.pop("equal_to").items():
            totals["equal_to"][model] = totals["equal_to"].get(model, 0) + n
        totals.update(counts)
    same_bits = None  # inputs of the output's dtype: counted once on the whole piece (a few calls, not per tile)
    for source, raw in zip(([job.base] if job.base else []) + job.experts, inputs):
        if raw.dtype == out.dtype:
            same_bits = same_bits or _SameBits(out)
            totals["equal_to"][source.model] = same_bits.count(raw)
    return out, totals


def _output(plan: MergePlan, piece: Piece, tiles: _Tiles, call: MethodCall, result: Any, rows: tuple[int, int],
            out: torch.Tensor) -> dict[str, Any]:
    """Cast one tile's result into ``out`` (its ``rows`` of the piece's output), check it, and count the elements
    equal to each input of another dtype than the output's: in the compute dtype (an input that the output dtype
    holds exactly) or in the output dtype (one that rounds to it). Inputs of the output's dtype are compared on
    their bit patterns, once per piece, by ``_compute``."""
    job = piece.job
    merged, method_stats = result if isinstance(result, tuple) else (result, {})
    out.copy_(merged)
    checked = [merged, out] if plan.out_dtype == torch.float16 else [merged]  # float16 can overflow in the cast
    if not (all_finite(checked) or bool(torch.isfinite(out).all())):
        raise RecipeError(f"method '{plan.method.name}' produced NaN or Inf in tensor '{job.name}' (as "
                          f"{plan.out_dtype}); check its parameters (weights summing to zero, extreme lambda)")
    sources = ([job.base] if job.base else []) + job.experts
    moved = ([call.base] if job.base else []) + call.experts
    rounded = None
    equal = {}
    for source, raw, tensor in zip(sources, tiles.inputs, moved):
        if raw.dtype == out.dtype:  # counted on the whole piece by ``_compute``
            continue
        if _exactly_in(raw.dtype, plan.out_dtype):
            if rounded is None:  # the output as written, back in the compute dtype
                rounded = tiles.buffers[-1][: out.shape[0]] if out.dim() else tiles.buffers[-1]
                rounded.copy_(out)
            equal[source.model] = _count_equal(rounded, tensor)
        else:  # the input rounds to the output dtype: compare there, as the recorded fraction means
            tile = raw[rows[0]:rows[1]] if raw.dim() else raw
            equal[source.model] = int(torch.count_nonzero(out == tile.to(out.dtype)))
    return {"numel": out.numel(), "equal_to": equal, **method_stats}


def _exactly_in(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Every value of ``dtype`` is a value of ``out_dtype`` (so equality can be tested in the compute dtype)."""
    if dtype == out_dtype or out_dtype == torch.float64:
        return True
    return out_dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)


def _count_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.device.type == "cpu":  # numpy's comparisons are vectorised, several times faster than torch's here
        return int(np.count_nonzero(a.numpy() == b.numpy()))
    return int(torch.count_nonzero(a == b))


_INTEGER_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _SameBits:
    """Counts the elements of a tensor of ``out``'s dtype that equal ``out`` as numbers, by comparing bit patterns
    as integers (half the bytes of a float32 comparison, and no cast back). Equal numbers have equal bits except
    +0 and -0, so at the (few) positions where ``out`` holds a zero, pairs that differ only in the sign bit are
    added; neither side holds NaN (inputs and outputs are checked)."""

    def __init__(self, out: torch.Tensor):
        self.kind = _INTEGER_VIEWS[out.element_size()]
        self.magnitude = torch.iinfo(self.kind).max  # every bit but the sign
        self.out = out.view(self.kind).numpy().reshape(-1)
        self.zeros = np.flatnonzero(np.bitwise_and(self.out, self.magnitude) == 0)  # where out is +0 or -0
        self.out_zeros = self.out[self.zeros]

    def count(self, tile: torch.Tensor) -> int:
        other = tile.view(self.kind).numpy().reshape(-1)
        same = int(np.count_nonzero(self.out == other))
        if self.zeros.size:
            at_zeros = other[self.zeros]
            signed = (at_zeros != self.out_zeros) & (np.bitwise_and(at_zeros, self.magnitude) == 0)
            same += int(np.count_nonzero(signed))
        return same


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, by one sum each (a NaN or Inf anywhere makes the sum non-finite);
    a False may also mean a finite sum overflowed, so callers confirm with ``isfinite``. A sum is several times
    cheaper than ``isfinite(...).all()``, which writes a boolean tensor. It is taken in the tensor's own dtype:
    torch accumulates bfloat16 and float16 in float32 anyway, while ``sum(dtype=float32)`` would first cast the
    whole tensor. Integer tensors hold no NaN."""
    return all(not t.is_floating_point() or math.isfinite(t.sum().item()) for t in tensors)


def _add_counts(stats: MergeStats, piece: Piece, counts: dict[str, Any]) -> None:
    """Accumulate a piece's counts; turn them into fractions when its tensor is complete."""
    entry = stats.tensors.setdefault(piece.job.name, {"numel": 0, "equal_to": {}})
    entry["numel"] += counts.pop("numel")
    for model, n in counts.pop("equal_to").items():
        entry["equal_to"][model] = entry["equal_to"].get(model, 0) + n
    entry.update(counts)
    if piece.last:
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
    remaining = [(i, jobs[t.name]) for i, shard in enumerate(shards) if names[i] not in output.done for t in shard]
    states: dict[str, BlockState] = {}
    buffers = _Buffers()
    todo = (piece for i, job in remaining for piece in job_pieces(plan, i, job, options, seed, states))
    stats = MergeStats()
    writer = _Writer(output, shards, names)
    writer.start()
    bar = tqdm(total=len(plan.jobs), initial=len(plan.jobs) - len(remaining), unit="tensor",
               disable=not options.progress, desc="merging")
    started = time.perf_counter()
    pending: deque[tuple[Piece, Future]] = deque()
    computing: deque[tuple[Piece, Future]] = deque()
    threads = torch.get_num_threads()
    lanes = 1
    if (plan.method.elementwise or plan.method.two_pass is not None) and torch.device(options.device).type == "cpu":
        torch.set_num_threads(1)
        lanes = max(1, options.compute_threads)
    lane_buffers = threading.local()

    def compute_in_lane(piece: Piece, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not hasattr(lane_buffers, "buffers"):
            lane_buffers.buffers = _Buffers()
        return _compute(plan, piece, inputs, options, seed, None, lane_buffers.buffers)

    def deliver(in_flight: int) -> None:
        """Hand computed pieces to the writer in plan order until at most ``in_flight`` are computing."""
        while len(computing) > in_flight:
            piece, result = computing.popleft()
            out, counts = result.result()
            _add_counts(stats, piece, counts)
            writer.put((piece.shard, piece.job.name, out))
            if piece.last:
                rate = stats.bytes_read / 1e9 / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)
                bar.update(1)

    lane_pool = ThreadPoolExecutor(max_workers=lanes)
    try:
        with ThreadPoolExecutor(max_workers=options.read_threads) as pool:
            for piece in todo:
                pending.append((piece, pool.submit(_read, plan, piece)))
                if len(pending) > options.read_ahead:
                    break
            while pending:
                piece, future = pending.popleft()
                inputs = future.result()
                next_piece = next(todo, None)
                if next_piece is not None:
                    pending.append((next_piece, pool.submit(_read, plan, next_piece)))
                stats.bytes_read += sum(t.numel() * t.element_size() for t in inputs)
                if piece.pass_index is not None:  # a statistics pass; skipped if read ahead but not needed
                    if not states[piece.job.name].done:
                        _observe(plan, piece, inputs, options, states[piece.job.name], buffers)
                    continue
                state = states.pop(piece.job.name, None) if piece.last else states.get(piece.job.name)
                if state is None and lanes > 1:
                    result = lane_pool.submit(compute_in_lane, piece, inputs)
                else:  # a block of a tensor whose state the blocks share: in order, on this thread
                    result = Future()
                    result.set_result(_compute(plan, piece, inputs, options, seed, state, buffers))
                del inputs
                computing.append((piece, result))
                deliver(lanes - 1)
            deliver(0)
    finally:
        lane_pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
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
