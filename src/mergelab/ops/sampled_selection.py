"""Exact order statistics in two cheaper passes where a sample predicts them (``SampledSelection``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.ops.radix_selection import Rank, Selection
from mergelab.ops.selection_ops import SelectionOps, selection_ops, working_dtype


@dataclass
class _Bracket:
    """Values in ``[low, high]`` hold a wanted rank of ``ranks`` if ``below`` (values < low) <= rank < numel -
    ``above`` (values > high)."""

    ranks: list[int]
    low: float
    high: float
    below: int = 0
    above: int = 0


class SampledSelection:
    """The same exact order statistics as ``Selection``, in two cheaper passes where a sample predicts them.

    Pass 1 keeps every ``stride``-th value fed. Between the passes each wanted rank gets a bracket of sample
    values four standard deviations of a sample rank (plus two) either side of where the rank falls in the
    sample (ranks whose sample windows overlap, such as the two ranks a linear quantile interpolates, share
    one). Pass 2 counts the values below and above each bracket and gathers those inside any bracket: per
    bracket two compare-and-count steps and two boolean steps, then one gather, several times cheaper than a
    16-bit histogram. A rank that falls outside its bracket (an unlucky
    sample; a strided sample of periodic data) is then found by ``Selection`` in further passes, so the result
    is exact whatever the sample; a NaN also falls back. Values equal to a bracket end are counted by value,
    so -0.0 and +0.0 count as equal. Same interface as
    ``Selection``.
    """

    def __init__(self, numel: int, ranks: Sequence[int], stride: int = 61, gather_limit: int = 1 << 16):
        self.numel, self.ranks, self.stride, self.gather_limit = numel, sorted(set(ranks)), stride, gather_limit
        self.found: dict[int, Rank] = {}
        self.nan = False
        self._sample: list[Any] = []
        self._brackets: list[_Bracket] | None = None
        self._inside: list[Any] = []  # pass 2: the values inside any bracket
        self._fallback: Selection | None = None
        self._xp: SelectionOps | None = None
        self._offset = 0

    @property
    def done(self) -> bool:
        return self.nan or len(self.found) == len(self.ranks)

    def feed(self, values: torch.Tensor) -> None:
        if self._fallback is not None:
            self._fallback.feed(values)
            return
        if self._xp is None:
            self._xp = selection_ops(values.device)
        xp = self._xp
        flat = xp.values(values.reshape(-1), working_dtype(values.dtype))
        if self._brackets is None:  # the sample keeps its stride across feeds
            self._sample.append(xp.copy(flat[(-self._offset) % self.stride :: self.stride]))
            self._offset = (self._offset + flat.shape[0]) % self.stride
            return
        outside = None  # outside every bracket (brackets may share values): one gather, split in end_pass
        for bracket in self._brackets:
            below_low = flat < bracket.low
            above_high = flat > bracket.high
            bracket.below += xp.count(below_low)
            bracket.above += xp.count(above_high)
            below_low |= above_high  # outside this bracket (a NaN is outside none, so it is gathered)
            outside = below_low if outside is None else outside.__iand__(below_low)
        self._inside.append(flat[~outside])

    def end_pass(self) -> None:
        xp = self._xp
        if self._fallback is not None:
            self._fallback.end_pass()
            if self._fallback.done:
                self.nan = self._fallback.nan
                self.found.update(self._fallback.found)
            return
        if self._brackets is None:
            sample = xp.concatenate(self._sample)
            self._sample = []
            if xp.has_nan(sample):
                self.nan = True
                return
            self._brackets = self._bracket(sample, xp)
            return
        missed = []
        gathered = xp.concatenate(self._inside)
        self._inside = []
        if xp.has_nan(gathered):
            self.nan = True
            return
        for bracket in self._brackets:
            inside = gathered[(gathered >= bracket.low) & (gathered <= bracket.high)]
            for rank, found in _resolve(bracket, inside, self.numel, xp).items():
                if found is None:
                    missed.append(rank)
                else:
                    self.found[rank] = found
        if missed:
            self._fallback = Selection(self.numel, missed, gather_limit=self.gather_limit)

    def _bracket(self, sample: Any, xp: SelectionOps) -> list[_Bracket]:
        size = sample.shape[0]
        ends = []
        for rank in self.ranks:
            q = (rank + 0.5) / self.numel
            center, spread = q * size, 4.0 * math.sqrt(size * q * (1.0 - q)) + 2.0
            ends.append((math.floor(center - spread), math.ceil(center + spread)))
        joined: list[tuple[list[int], int, int]] = []  # ranks sorted, so their sample windows are too
        for rank, (low, high) in zip(self.ranks, ends):
            if joined and low <= joined[-1][2]:
                joined[-1] = (joined[-1][0] + [rank], joined[-1][1], max(high, joined[-1][2]))
            else:
                joined.append(([rank], low, high))
        inner = sorted({i for _, low, high in joined for i in (low, high) if 0 <= i < size})
        values = dict(zip(inner, xp.nth(sample, inner))) if inner else {}
        return [_Bracket(ranks, values.get(low, -math.inf), values.get(high, math.inf))
                for ranks, low, high in joined]


def _resolve(bracket: _Bracket, inside: Any, numel: int, xp: SelectionOps) -> dict[int, Rank | None]:
    """The bracket's ranks from the values gathered inside it (None for a rank that lies outside)."""
    at_low = xp.count(inside == bracket.low)
    strict = None
    found: dict[int, Rank | None] = {}
    for rank in bracket.ranks:
        position = rank - bracket.below
        if not 0 <= position < numel - bracket.below - bracket.above:
            found[rank] = None
            continue
        if position < at_low:
            found[rank] = Rank(bracket.low, bracket.below, at_low)
            continue
        if strict is None:
            strict = xp.sort(inside[(inside > bracket.low) & (inside < bracket.high)])
        if position < at_low + strict.shape[0]:
            value = strict[position - at_low]
            first, stop = xp.run(strict, value)
            found[rank] = Rank(float(value), bracket.below + at_low + first, stop - first)
        else:
            found[rank] = Rank(bracket.high, bracket.below + at_low + strict.shape[0],
                               xp.count(inside == bracket.high))
    return found
