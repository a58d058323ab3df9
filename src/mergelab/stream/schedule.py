"""Each tensor job's execution mode, decided once (``execution``), and the pieces it is read and computed in.

A piece is a whole tensor, or a row block of at most ``chunk_elements`` elements: elementwise methods are always
computed in blocks; ``TwoPass`` methods (a per-tensor statistic, then elementwise) stream the blocks of a tensor
above ``stream_elements`` once per statistics pass, then once more to compute, so memory does not grow even with
the largest tensor. Both kinds are computed in cache-sized tiles; pieces that carry no cross-piece state may go to
``compute_threads`` lanes. The decision is per tensor: a method's ``needs_whole`` names the tensors it must take
whole (the SVD methods' in-layer matrices), and those are one untiled piece while its other tensors stream.
``mergelab check`` reads the same decision for its memory estimate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.methods.spec import BlockState, MethodSpec
from mergelab.plan.data import MergePlan, TensorJob
from mergelab.stream.extras import PieceExtras
from mergelab.stream.options import MergeOptions, tensor_seed


@dataclass(frozen=True)
class Execution:
    """How one tensor job runs.

    ``blocks``: its row ranges when it is read and computed in row blocks, else None (one piece, whole).
    ``two_pass``: a ``TwoPass`` method, whose statistics passes run over the blocks (or over the tiles of the
    whole tensor in memory) before the output pass. ``tiled``: pieces are computed in cache-sized tiles on one
    torch thread (elementwise and ``TwoPass`` methods), else in one call on the whole piece. ``lanes``: how many
    pieces without shared state may be computed side by side (1: all on the calling thread).
    """

    blocks: tuple[tuple[int, int], ...] | None
    two_pass: bool
    tiled: bool
    lanes: int


def tiles_on_cpu(method: MethodSpec, options: MergeOptions) -> bool:
    """Every tensor of the method is computed in cache-sized tiles on the CPU: then each thread computing runs
    torch on one thread, and pieces without shared state go to compute lanes. A method with ``needs_whole``
    tensors runs all its pieces on the calling thread with torch's own threads, which its whole tensors (an SVD)
    use."""
    tiled = (method.elementwise or method.two_pass is not None) and method.needs_whole is None
    return tiled and torch.device(options.device).type == "cpu"


def lanes_for(method: MethodSpec, options: MergeOptions) -> int:
    """Compute lanes of a merge: ``compute_threads`` for tiled methods on the CPU, else 1."""
    return max(1, options.compute_threads) if tiles_on_cpu(method, options) else 1


def execution(method: MethodSpec, job: TensorJob, options: MergeOptions) -> Execution:
    """The one decision of how ``job`` runs.

    A tensor the method ``needs_whole`` is one untiled piece. Otherwise elementwise methods split any tensor larger
    than a block. ``TwoPass`` methods split tensors of 2 or more dimensions above ``stream_elements`` (smaller ones
    are read once, whole, instead of once per pass), and random ones only on the CPU, where a generator draws the
    same numbers whether a tensor comes whole or in blocks (CUDA's draws depend on the launch shape).
    """
    whole = method.needs_whole is not None and method.needs_whole(job.info, tuple(job.shape), job.params)
    elementwise = method.elementwise and not whole
    two_pass = not method.elementwise and method.two_pass is not None and not whole
    tiled, lanes = elementwise or two_pass, lanes_for(method, options)
    if not job.shape:
        return Execution(None, two_pass, tiled, lanes)
    rows, row_size = job.shape[0], max(1, torch.Size(job.shape[1:]).numel())
    per_piece = max(1, options.chunk_elements // row_size)
    blockwise = elementwise or (
        two_pass and len(job.shape) >= 2 and rows * row_size > options.stream_elements
        and (not method.random or torch.device(options.device).type == "cpu"))
    if not blockwise or rows <= per_piece:
        return Execution(None, two_pass, tiled, lanes)
    return Execution(tuple((a, min(a + per_piece, rows)) for a in range(0, rows, per_piece)), two_pass, tiled, lanes)


@dataclass(frozen=True)
class Run:
    """One merge in flight: the plan, the options, the seed, each job's ``Execution``, the per-tensor extras
    of the method's ``prepare`` pass (``MethodCall.extras``, read from disk per tensor by ``PieceExtras``), the
    compute lanes, and whether the threads that
    compute run torch on one thread each (``tiles_on_cpu``)."""

    plan: MergePlan
    options: MergeOptions
    seed: int
    executions: dict[str, Execution]
    extras: PieceExtras
    lanes: int
    one_thread: bool

    def generator(self, job: TensorJob) -> torch.Generator | None:
        """The tensor's seeded generator for a random method, else None."""
        if not self.plan.method.random:
            return None
        return torch.Generator(device=self.options.device).manual_seed(tensor_seed(self.seed, job.name))


def schedule(plan: MergePlan, options: MergeOptions, seed: int, extras: dict[str, dict[str, Any]]) -> Run:
    """Decide every job's execution once."""
    return Run(plan, options, seed, {job.name: execution(plan.method, job, options) for job in plan.jobs},
               PieceExtras(extras),
               lanes_for(plan.method, options), tiles_on_cpu(plan.method, options))


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


def job_pieces(run: Run, shard: int, job: TensorJob, states: dict[str, BlockState]) -> Iterator[Piece]:
    """The pieces of one job, in order. For a ``TwoPass`` job in blocks, the statistics passes come first; how
    many is known only once a pass has been observed, so a pass may be yielded ahead (read-ahead) and then
    skipped by the pipeline when the state turns out ``done``."""
    blocks = run.executions[job.name].blocks
    if blocks is None:
        yield Piece(shard, job, 0, job.shape[0] if job.shape else 1, True)
        return
    checked = False
    if run.executions[job.name].two_pass:
        state = states[job.name] = run.plan.method.two_pass.start(job.info, job.params, job.shape,
                                                                  run.generator(job))
        pass_index = 0
        while not state.done:
            for start, stop in blocks:
                if state.done:
                    break
                yield Piece(shard, job, start, stop, False, pass_index, check=pass_index == 0)
            checked, pass_index = True, pass_index + 1
    for start, stop in blocks:
        yield Piece(shard, job, start, stop, False, check=not checked)
