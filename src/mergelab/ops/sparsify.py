"""Sparsifiers for task vectors: keep some entries, zero the rest, optionally rescale.

Each function takes one task vector and returns a tensor of the same shape; none knows about models. The
per-tensor statistics they need (the magnitude ranks of a trim, the L1 norms of a rescale) are also available
as streaming accumulators (``RankWindow``, ``L1Norm``) that take a tensor in row blocks with exactly the same
result, so a merge can bound its memory by the block size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mergelab.ops.quantile import SampledSelection, Selection

# Buckets of at most this many magnitudes are gathered and sorted rather than narrowed by another histogram
# level (a sort costs more per element than a histogram pass beyond some 10^5 elements). Larger tensors find
# their window's ends from a sample first (``SampledSelection``) when ``SAMPLE`` is set.
GATHER_LIMIT = 1 << 16
SAMPLE = True


@dataclass(frozen=True)
class ArrayOps:
    """The few mask steps spelled differently in numpy, used on the CPU (there its comparisons and mixed
    boolean/float steps are 3-10x faster than torch's), and torch, used on other devices. ``view`` gives the
    array form of a tensor (same memory); ``==``, ``<=``, indexing and slicing read the same in both."""

    view: Callable[[torch.Tensor], Any]
    compare_: Callable[[Any, str, float], Any]  # in place: 1.0 where ``array op value`` holds, else 0.0
    count: Callable[[Any], int]  # true entries of a boolean array
    positions: Callable[[Any], Any]  # flat indices of the true entries, in order
    multiply_: Callable[[Any, Any], Any]  # in place, by a boolean array
    add_: Callable[[Any, Any], Any]  # in place, a boolean array as 0/1


_UFUNCS = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal}
_NUMPY = ArrayOps(
    view=lambda t: t.numpy(),
    compare_=lambda a, op, value: _UFUNCS[op](a, value, out=a, casting="unsafe"),
    count=lambda m: int(np.count_nonzero(m)),
    positions=lambda m: np.flatnonzero(m),
    multiply_=lambda a, m: np.multiply(a, m, out=a),
    add_=lambda a, m: np.add(a, m, out=a),
)
_TORCH = ArrayOps(
    view=lambda t: t,
    compare_=lambda a, op, value: getattr(a, op + "_")(value),
    count=lambda m: int(torch.count_nonzero(m)),
    positions=lambda m: torch.nonzero(m.reshape(-1)).squeeze(1),
    multiply_=lambda a, m: a.mul_(m),
    add_=lambda a, m: a.add_(m),
)


def array_ops(tensor: torch.Tensor) -> ArrayOps:
    return _NUMPY if tensor.device.type == "cpu" else _TORCH


def keep_count(numel: int, density: float) -> int:
    """Number of entries a density keeps: ``floor(density * n)``, at least one of a non-empty tensor."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


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

    def take(self, equal: Any, keep: Any, xp: ArrayOps) -> None:
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
    until ``done`` (exact selection, ``ops.quantile``: 2 passes, rarely more). It finds the
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
        xp = array_ops(magnitudes)
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

    def whole(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """The boolean mask of a whole tensor (both passes over one block; overwrites ``magnitudes``)."""
        while not self.done:
            self.feed(magnitudes)
            self.end_pass()
        return self.mask(magnitudes).bool()


def magnitude_window(numel: int, density: float) -> RankWindow:
    """TIES "trim": the ``density`` fraction of entries with the largest magnitude (``keep_count``), entries
    tied at the threshold taken in position order, as a stable descending sort would."""
    return RankWindow(numel, 0, numel if density >= 1.0 else keep_count(numel, density), descending=True)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of ``magnitude_window`` on a whole tensor.

    Selection, not a sort: the k-th largest magnitude is found exactly by histogram selection (linear time, no
    index tensor); entries tied with it are taken in position order, so the mask is deterministic.
    """
    return magnitude_window(delta.numel(), density).whole(delta.abs())


def outlier_window(numel: int, density: float, gamma: float) -> RankWindow:
    """Model Breadcrumbs ([Davari2024] sec. 3): drop the ``gamma`` fraction of largest-magnitude
    entries (outliers), then the smallest, so that a ``density`` fraction stays; ranks as a stable ascending
    sort gives them. If ``density + gamma > 1`` fewer outliers are dropped so that the density is still met."""
    if density >= 1.0:
        return RankWindow(numel, 0, numel, descending=False)
    kept = int(density * numel)
    n_small = max(0, numel - kept - int(gamma * numel))
    return RankWindow(numel, n_small, n_small + kept, descending=False)


def bernoulli_mask(delta: torch.Tensor, keep_prob: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Random mask keeping each entry independently with probability ``keep_prob`` (DARE, [Yu2024])."""
    probs = torch.as_tensor(keep_prob, dtype=delta.dtype, device=delta.device).expand(delta.shape)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities ([Deep2024] eq. 1-2): within each row, entries ranked by
    magnitude get probabilities spread linearly over ``[density - epsilon, density + epsilon]``, larger
    magnitude kept more often. A 1-D tensor is one row.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    width = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / width) * (2 * epsilon)
    return probs.reshape(delta.shape)


class L1Norm:
    """The L1 norm of a tensor fed in blocks, exactly, correctly rounded to float64.

    A float's magnitude is an integer mantissa times a power of two; mantissas are summed per exponent as
    exact integers (``bincount`` sums of at most 2^24 values below 2^29, exact in float64), so the norm does not
    depend on how the tensor is split into blocks, or their order, as a floating-point sum would.
    """

    _FORMATS = {torch.float32: (torch.int32, 23, 127, 8), torch.float64: (torch.int64, 52, 1023, 11)}
    _UNIT = 1074  # every float32/float64 value is an integer multiple of 2^-1074
    _CHUNK = 1 << 24

    def __init__(self) -> None:
        self._total = 0  # in units of 2^-1074
        self._infinite = False

    def add(self, values: torch.Tensor) -> None:
        int_dtype, mantissa_bits, bias, exponent_bits = self._FORMATS[values.dtype]
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), self._CHUNK):
            bits = flat[start : start + self._CHUNK].abs().view(int_dtype).to(torch.int64)
            exponent = bits >> mantissa_bits
            mantissa = (bits & ((1 << mantissa_bits) - 1)) | ((exponent > 0).to(torch.int64) << mantissa_bits)
            pieces = [(mantissa, 0)] if mantissa_bits < 29 else [(mantissa >> 26, 26), (mantissa & ((1 << 26) - 1), 0)]
            for piece, shift in pieces:
                sums = torch.bincount(exponent, weights=piece.to(torch.float64), minlength=1 << exponent_bits)
                for e, total in enumerate(sums.tolist()):
                    if total and e == (1 << exponent_bits) - 1:
                        self._infinite = True
                    elif total:
                        self._total += int(total) << (max(e, 1) - bias - mantissa_bits + self._UNIT + shift)

    @property
    def value(self) -> float:
        return math.inf if self._infinite else self._total / (1 << self._UNIT)


def l1_scale(before: float, after: float, eps: float = 1e-7) -> float:
    """Factor that gives a masked task vector (L1 norm ``after``) the L1 norm of the whole one (``before``),
    mergekit's ``rescale``; 1 where either norm is below ``eps``."""
    if before < eps or after < eps:
        return 1.0
    return before / after
