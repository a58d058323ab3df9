"""Reading, computing and writing overlap: a small thread pool reads the inputs of the next ``read_ahead`` pieces
(memory maps made resident and checked for NaN/Inf), the calling thread and the compute lanes run the method, and
a writer thread appends results to the current shard, in plan order, so the output does not depend on the lane
count. Only the pieces in flight are in memory: about ``read_ahead + compute_threads + 1`` pieces whatever the
model size. The pipeline knows nothing of a method's maths.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from mergelab.checkpoint.writer import OutputFolder, ShardWriter
from mergelab.errors import CheckpointError
from mergelab.methods.spec import BlockState
from mergelab.plan.data import ShardLayout
from mergelab.stream.compute import Buffers, all_finite, compute_piece, observe_piece
from mergelab.stream.schedule import Piece, Run, job_pieces
from mergelab.stream.statistics import MergeStats, add_counts


def read_piece(run: Run, piece: Piece) -> list[torch.Tensor]:
    """Inputs of one piece (base first if any), rows trimmed by the vocabulary rule, checked for NaN/Inf when
    ``piece.check`` (here, on the reading threads, which are idle most of the time, rather than while computing)."""
    tensors = []
    for source in piece.job.sources:
        if piece.whole:
            tensor = source.read(run.plan.readers)
        else:
            tensor = run.plan.readers[source.model].get(source.name, (piece.start, piece.stop))
        if piece.check and not (all_finite([tensor]) or bool(torch.isfinite(tensor).all())):
            raise CheckpointError(f"{source.model}: tensor '{source.name}' contains NaN or Inf values; repair or "
                                  "exclude this model")
        tensors.append(tensor)
    return tensors


def one_torch_thread() -> contextlib.AbstractContextManager:
    """Torch operators of the calling thread run on one OpenMP thread until the context ends, then as before.

    OpenMP's thread count is a per-thread setting (``omp_set_num_threads``, through threadpoolctl), so other
    threads and torch's process-wide setting (``torch.set_num_threads``) are left alone. torch first sets a
    thread's count lazily, so that happens here (``get_num_threads``) before it is limited.
    """
    from threadpoolctl import ThreadpoolController

    torch.get_num_threads()
    return ThreadpoolController().select(user_api="openmp").limit(limits=1)


class _Writer(threading.Thread):
    """The writer thread: appends computed tensors to shards in plan order and records finished shards."""

    def __init__(self, output: OutputFolder, layout: ShardLayout):
        super().__init__(daemon=True)
        self.output, self.layout = output, layout
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.current: ShardWriter | None = None

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                shard_index, name, tensor = item
                if self.current is None:
                    self.current = ShardWriter(self.output.partial / self.layout.names[shard_index],
                                               self.layout.shards[shard_index])
                self.current.add(name, tensor)
                if self.current.complete:
                    self.output.record(self.layout.names[shard_index], self.current.close())
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


def stream(run: Run, output: OutputFolder) -> MergeStats:
    """Read, compute and write every tensor of the plan not already in a verified shard."""
    from tqdm import tqdm

    plan, options, layout = run.plan, run.options, run.plan.layout
    jobs = {job.name: job for job in plan.jobs}
    remaining = [(i, jobs[t.name]) for i, shard in enumerate(layout.shards) if layout.names[i] not in output.done
                 for t in shard]
    states: dict[str, BlockState] = {}
    buffers = Buffers()
    todo: Iterator[Piece] = (piece for i, job in remaining for piece in job_pieces(run, i, job, states))
    stats = MergeStats()
    writer = _Writer(output, layout)
    writer.start()
    bar = tqdm(total=len(plan.jobs), initial=len(plan.jobs) - len(remaining), unit="tensor",
               disable=not options.progress, desc="merging")
    started = time.perf_counter()
    pending: deque[tuple[Piece, Future]] = deque()
    computing: deque[tuple[Piece, Future]] = deque()
    single = run.one_thread
    lane_state = threading.local()

    def start_lane() -> None:
        if single:
            lane_state.threads = one_torch_thread()
            lane_state.threads.__enter__()

    def compute_in_lane(piece: Piece, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not hasattr(lane_state, "buffers"):
            lane_state.buffers = Buffers()
        return compute_piece(run, piece, inputs, None, lane_state.buffers)

    def deliver(in_flight: int) -> None:
        """Hand computed pieces to the writer in plan order until at most ``in_flight`` are computing."""
        while len(computing) > in_flight:
            piece, result = computing.popleft()
            out, counts = result.result()
            add_counts(stats, piece, counts)
            writer.put((piece.shard, piece.job.name, out))
            if piece.last:
                rate = stats.bytes_read / 1e9 / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)
                bar.update(1)

    lane_pool = ThreadPoolExecutor(max_workers=run.lanes, initializer=start_lane)
    try:
        with ThreadPoolExecutor(max_workers=options.read_threads, initializer=start_lane) as pool, \
                (one_torch_thread() if single else contextlib.nullcontext()):
            for piece in todo:
                pending.append((piece, pool.submit(read_piece, run, piece)))
                if len(pending) > options.read_ahead:
                    break
            while pending:
                piece, future = pending.popleft()
                inputs = future.result()
                next_piece = next(todo, None)
                if next_piece is not None:
                    pending.append((next_piece, pool.submit(read_piece, run, next_piece)))
                stats.bytes_read += sum(t.numel() * t.element_size() for t in inputs)
                if piece.pass_index is not None:  # a statistics pass; skipped if read ahead but not needed
                    if not states[piece.job.name].done:
                        observe_piece(run, piece, inputs, states[piece.job.name], buffers)
                    continue
                state = states.pop(piece.job.name, None) if piece.last else states.get(piece.job.name)
                if state is None and run.lanes > 1:
                    result = lane_pool.submit(compute_in_lane, piece, inputs)
                else:  # a block of a tensor whose state the blocks share: in order, on this thread
                    result = Future()
                    result.set_result(compute_piece(run, piece, inputs, state, buffers))
                del inputs
                computing.append((piece, result))
                deliver(run.lanes - 1)
            deliver(0)
    finally:
        lane_pool.shutdown(wait=True, cancel_futures=True)
        for _, future in pending:
            future.cancel()
        writer.queue.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error
    return stats
