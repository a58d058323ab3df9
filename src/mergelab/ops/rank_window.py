"""Rank windows of a tensor's magnitudes over row blocks: the exact, streamed mask of a trim (TIES, Breadcrumbs).

``RankWindow`` keeps the entries whose magnitudes rank inside a window, as a stable sort would rank them,
taking the tensor in row blocks with exactly the result a whole tensor gives, so a merge can bound its memory by
the block size. The window's end values come from an exact streamed selection (``exact_selection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergelab.ops.mask_ops import MaskOps, mask_ops
from mergelab.ops.radix_selection import Selection
from mergelab.ops.sampled_selection import SampledSelection

# Buckets of at most this many magnitudes are gathered and sorted rather than narrowed by another histogram
# level (a sort costs more per element than a histogram pass beyond some 10^5 elements). Larger tensors find
# their window's ends from a sample first (``SampledSelection``) when ``SAMPLE`` is set.
GATHER_LIMIT = 1 << 16
SAMPLE = True


def exact_selection(numel: int, ranks: list[int]) -> Selection | SampledSelection:
    """The streamed selection of exact order statistics used for per-tensor thresholds over row blocks: from a
    sample's brackets above ``GATHER_LIMIT`` values (when ``SAMPLE``), else by radix levels."""
    if SAMPLE and numel > GATHER_LIMIT:
        return SampledSelection(numel, ranks, gather_limit=GATHER_LIMIT)
    return Selection(numel, ranks, gather_limit=GATHER_LIMIT)


@dataclass
class _Edge:
    """Entries equal to ``value``, a magnitude at one end of a rank window: ``equal`` of them, ``below`` smaller;
    the ``take_from``-th to ``take_to``-th of them in position order (0-based, stop exclusive) are kept, and
    ``seen`` counts those met in the blocks masked so far."""

    value: float
    below: int
    equal: int
    take_from: int
    take_to: int
    seen: int = 0

    @property
    def full(self) -> bool:
        return self.take_from == 0 and self.take_to == self.equal

    @property
    def pending(self) -> bool:
        """Some of the kept entries equal to ``value`` are still to come."""
        return not self.full and self.seen < self.take_to

    def take(self, equal: Any, keep: Any, xp: MaskOps) -> None:
        """Set ``keep`` (a 0/1 array, 0 where ``equal``) to 1 at this block's kept entries among ``equal`` (its
        entries equal to ``value``); blocks must come in position order."""
        first, stop = max(self.take_from - self.seen, 0), self.take_to - self.seen
        count = xp.count(equal)
        if first == 0 and count <= stop:
            xp.add_(keep, equal)
        elif first < min(count, stop):
            keep.reshape(-1)[xp.positions(equal)[first:stop]] = 1.0
        self.seen += count


class RankWindow:
    """The entries ranked ``first`` to ``stop - 1`` (0-based) when a tensor's magnitudes are sorted, largest first
    if ``descending``, equal magnitudes in position order (a stable sort's order); computed over row blocks.

    Pass 1: ``feed`` every block's magnitudes (``|delta|``: non-negative, any order), then ``end_pass``; repeat
    until ``done`` (exact selection, ``exact_selection``: 2 passes, rarely more). It finds the
    smallest and largest kept magnitude and how many entries are smaller than and equal to each. Pass 2: ``mask``
    every block once, in position order: entries strictly between the two magnitudes are kept, and of the
    entries equal to one of them those whose rank, counted across blocks, falls in the window.
    """

    def __init__(self, numel: int, first: int, stop: int, descending: bool):
        self.numel, self.first, self.stop, self.descending = numel, max(first, 0), min(stop, numel), descending
        self.everything = self.first == 0 and self.stop == numel
        self.nothing = self.first >= self.stop
        # the kept magnitudes are those at ranks [low, high) of an ascending sort; a bound at an end of the
        # tensor needs no statistic
        low, high = (numel - self.stop, numel - self.first) if descending else (self.first, self.stop)
        self._ranks = {"low": low if low > 0 else None, "high": high - 1 if high < numel else None}
        self.low: _Edge | None = None
        self.high: _Edge | None = None
        wanted = [r for r in self._ranks.values() if r is not None]
        self._selection: Selection | SampledSelection | None = None
        if not (self.everything or self.nothing):
            self._selection = exact_selection(numel, wanted)

    @property
    def done(self) -> bool:
        return self._selection is None or self._selection.done

    def feed(self, magnitudes: torch.Tensor) -> None:
        self._selection.feed(magnitudes)

    def end_pass(self) -> None:
        self._selection.end_pass()
        if not self._selection.done:
            return
        if self._selection.nan:  # NaN magnitudes rank nowhere: keep nothing
            self.nothing, self._selection = True, None
            return
        edges: dict[float, _Edge] = {}
        for side, rank in self._ranks.items():
            if rank is None:
                continue
            found = self._selection.found[rank]
            if found.value not in edges:
                ahead = self.numel - found.below - found.equal if self.descending else found.below
                edges[found.value] = _Edge(found.value, found.below, found.equal, max(0, self.first - ahead),
                                           min(found.equal, self.stop - ahead))
            setattr(self, side, edges[found.value])
        self._selection = None

    def mask(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """Pass 2: this block's kept entries as 1.0 and the others as 0.0, written over ``magnitudes`` (which
        must be contiguous) and returned; every block once, in position order."""
        if self.everything or self.nothing:
            return magnitudes.fill_(1.0 if self.everything else 0.0)
        xp = mask_ops(magnitudes)
        values = xp.view(magnitudes)
        low, high = self.low, self.high
        pending = [e for e in {id(e): e for e in (low, high) if e is not None}.values() if e.pending]
        equal = [(edge, values == edge.value) for edge in pending]  # before the magnitudes are overwritten
        if low is high and not low.full:  # one magnitude, partly kept: nothing lies strictly inside
            values[...] = 0.0
        else:
            below_high = None
            if high is not None and low is not None:
                below_high = values <= high.value if high.full else values < high.value
            if low is not None:
                xp.compare_(values, "ge" if low.full else "gt", low.value)
                if below_high is not None:
                    xp.multiply_(values, below_high)
            else:
                xp.compare_(values, "le" if high.full else "lt", high.value)
        for edge, mask in equal:
            edge.take(mask, values, xp)
        return magnitudes

    def rewind(self) -> None:
        """Make the next ``mask`` the first block again, so that the blocks can be masked in another pass."""
        for edge in (self.low, self.high):
            if edge is not None:
                edge.seen = 0

    def whole(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """The boolean mask of a whole tensor (both passes over one block; overwrites ``magnitudes``)."""
        while not self.done:
            self.feed(magnitudes)
            self.end_pass()
        return self.mask(magnitudes).bool()
