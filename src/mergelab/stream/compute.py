"""One piece through the method: inputs cast to the compute dtype tile by tile, the method called, the result
cast to the output dtype, checked, and its elements counted against the inputs (``statistics``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import BlockState, MethodCall
from mergelab.stream.schedule import Piece, Run
from mergelab.stream.statistics import SameBits, add_equal, count_equal, exactly_in


class Buffers:
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


class Tiles:
    """A piece's inputs cast to the compute dtype tile by tile: row ranges of at most ``tile_elements`` (one tile
    on other devices, or for methods that are not tiled), each cast into the same buffers, so the method's many
    elementwise passes stay in the CPU cache and allocate nothing large. A tile's tensors are valid until the next
    tile is cast; one more buffer holds the tile's output back in the compute dtype, for counting equal elements."""

    def __init__(self, run: Run, piece: Piece, inputs: list[torch.Tensor], buffers: Buffers):
        self.run, self.piece, self.inputs = run, piece, inputs
        self.extras = run.extras.of(piece.job.name, piece.last and piece.pass_index is None)
        options = run.options
        self.dtype = torch.float64 if options.float64 else torch.float32
        self.device = torch.device(options.device)
        shape = tuple(inputs[0].shape)
        rows = shape[0] if shape else 1
        row_size = max(1, torch.Size(shape[1:]).numel()) if shape else 1
        tiled = run.executions[piece.job.name].tiled and self.device.type == "cpu"
        per_tile = max(1, options.tile_elements // row_size) if tiled else max(rows, 1)
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
                          generator, self.extras)


def observe_piece(run: Run, piece: Piece, inputs: list[torch.Tensor], state: BlockState, buffers: Buffers) -> None:
    """A statistics-pass piece: feed its tiles to the tensor's state, and close the pass after its last block."""
    tiles = Tiles(run, piece, inputs, buffers)
    for a, b in tiles.bounds:
        state.observe(tiles.call(a, b))
    if piece.last:
        state.end_pass()


def compute_piece(run: Run, piece: Piece, inputs: list[torch.Tensor], state: BlockState | None,
                  buffers: Buffers) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the method on one piece; return the output (output dtype, on CPU) and its element counts.

    Tiled methods run tile by tile (``Tiles``); a whole tensor of a ``TwoPass`` method runs its statistics passes
    over the tiles in memory first. Other methods get the whole piece as one tile.
    """
    job, method, plan = piece.job, run.plan.method, run.plan
    execution = run.executions[job.name]
    tiles = Tiles(run, piece, inputs, buffers if execution.tiled else Buffers())
    generator = None if method.two_pass is not None else run.generator(job)
    if state is None and execution.two_pass:  # a whole TwoPass tensor
        state = method.two_pass.start(job.info, job.params, job.shape, run.generator(job))
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
        add_equal(totals, _output(run, piece, tiles, call, result, (a, b), out[a:b] if out.dim() else out))
    same_bits = None  # inputs of the output's dtype: counted once on the whole piece (a few calls, not per tile)
    for source, raw in zip(job.sources, inputs):
        if raw.dtype == out.dtype:
            same_bits = same_bits or SameBits(out)
            totals["equal_to"][source.model] = same_bits.count(raw)
    return out, totals


def _output(run: Run, piece: Piece, tiles: Tiles, call: MethodCall, result: Any, rows: tuple[int, int],
            out: torch.Tensor) -> dict[str, Any]:
    """Cast one tile's result into ``out`` (its ``rows`` of the piece's output), check it, and count the elements
    equal to each input of another dtype than the output's: in the compute dtype (an input that the output dtype
    holds exactly) or in the output dtype (one that rounds to it). Inputs of the output's dtype are compared on
    their bit patterns, once per piece, by ``compute_piece``."""
    job, out_dtype = piece.job, run.plan.out_dtype
    merged, method_stats = result if isinstance(result, tuple) else (result, {})
    out.copy_(merged)
    checked = [merged, out] if out_dtype == torch.float16 else [merged]  # float16 can overflow in the cast
    if not (all_finite(checked) or bool(torch.isfinite(out).all())):
        raise RecipeError(f"method '{run.plan.method.name}' produced NaN or Inf in tensor '{job.name}' (as "
                          f"{out_dtype}); check its parameters (weights summing to zero, extreme lambda)")
    moved = ([call.base] if job.base else []) + call.experts
    rounded = None
    equal = {}
    for source, raw, tensor in zip(job.sources, tiles.inputs, moved):
        if raw.dtype == out.dtype:  # counted on the whole piece by ``compute_piece``
            continue
        if exactly_in(raw.dtype, out_dtype):
            if rounded is None:  # the output as written, back in the compute dtype
                rounded = tiles.buffers[-1][: out.shape[0]] if out.dim() else tiles.buffers[-1]
                rounded.copy_(out)
            equal[source.model] = count_equal(rounded, tensor)
        else:  # the input rounds to the output dtype: compare there, as the recorded fraction means
            tile = raw[rows[0]:rows[1]] if raw.dim() else raw
            equal[source.model] = int(torch.count_nonzero(out == tile.to(out.dtype)))
    return {"numel": out.numel(), "equal_to": equal, **method_stats}


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, by one sum each (a NaN or Inf anywhere makes the sum non-finite);
    a False may also mean a finite sum overflowed, so callers confirm with ``isfinite``. A sum is several times
    cheaper than ``isfinite(...).all()``, which writes a boolean tensor. It is taken in the tensor's own dtype:
    torch accumulates bfloat16 and float16 in float32 anyway, while ``sum(dtype=float32)`` would first cast the
    whole tensor. Integer tensors hold no NaN."""
    return all(not t.is_floating_point() or math.isfinite(t.sum().item()) for t in tensors)
