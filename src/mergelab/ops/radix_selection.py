"""Exact order statistics of values streamed in passes, by MSD radix selection over chunks: no sampling, no
full sort.

The order statistics are found by radix selection on the IEEE bit patterns: one histogram pass over the values
per 16 leading bits, narrowing each wanted rank to the bucket of bit patterns that holds it, until a bucket is
small enough to gather and sort (or its bits are all fixed). All wanted ranks share each pass. Histograms count
raw bit digits (no per-element transform); float order is restored on the 65536 bins (negative values order by
descending bits). Work memory is a few chunks plus the gathered buckets (at most ``gather_limit`` elements
each), whatever the number of values; CPU (numpy kernels on the tensor's memory) and CUDA (torch) alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergelab.ops.selection_ops import BIT_DTYPES, DIGIT_BITS, DIGITS, SelectionOps, selection_ops, working_dtype

_CPU_CHUNK = 1 << 16
_CUDA_CHUNK = 1 << 24


@dataclass
class _Bucket:
    """Elements whose bit pattern starts with ``prefix`` (its ``bits`` leading bits, read as a signed integer;
    0 bits: every element). ``below`` counts the elements of smaller value outside the bucket, so wanted rank
    ``r`` is at position ``r − below`` inside it.
    """

    prefix: int
    bits: int
    below: int
    count: int
    ranks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Rank:
    """One order statistic: the value at that rank, and how many values are smaller than it and equal to it."""

    value: float
    below: int
    equal: int


class Selection:
    """Exact order statistics of ``numel`` values that are streamed, possibly in several passes.

    Each pass, ``feed`` every value once (in chunks of any size, in any order; nothing fed is referenced after
    ``feed`` returns), then call ``end_pass``; repeat
    until ``done``. A pass is one level of the radix selection: small buckets are gathered and sorted, large
    ones get a histogram of their next 16 bits. float32 needs at most 2 passes, float64 at most 4. ``found``
    then maps each wanted rank to a ``Rank``; ``nan`` is True (and ``found`` incomplete) if a NaN was fed.
    Counts of equal values compare bit patterns where a histogram fixes every bit, so values must not mix
    -0.0 and +0.0 if ``Rank.below``/``Rank.equal`` are used (magnitudes never do).
    """

    def __init__(self, numel: int, ranks: Sequence[int], chunk_elements: int | None = None,
                 gather_limit: int = 1 << 22):
        self.chunk_elements, self.gather_limit = chunk_elements, gather_limit
        self.found: dict[int, Rank] = {}
        self.nan = False
        self._buckets = [_Bucket(prefix=0, bits=0, below=0, count=numel, ranks=sorted(set(ranks)))]
        self._check_nan = False
        self._xp: SelectionOps | None = None
        self._dtype = torch.float32
        self._start_level()

    @property
    def done(self) -> bool:
        return self.nan or not self._buckets

    def _start_level(self) -> None:
        self._gathered = [b for b in self._buckets if b.count <= self.gather_limit]
        self._split = [b for b in self._buckets if b.count > self.gather_limit]
        self._parts: list[Any] = []
        self._hists = [np.zeros(DIGITS, dtype=np.int64) for _ in self._split]

    def feed(self, values: torch.Tensor) -> None:
        """Some of the values (any shape, float dtype) for the current pass."""
        if self._xp is None:
            self._xp = selection_ops(values.device)
            self._dtype = working_dtype(values.dtype)
            if self.chunk_elements is None:
                self.chunk_elements = _CPU_CHUNK if values.device.type == "cpu" else _CUDA_CHUNK
        xp, dtype = self._xp, self._dtype
        width = torch.finfo(dtype).bits
        level = self._buckets[0].bits
        for chunk in _chunks(values.reshape(-1), self.chunk_elements):
            array = xp.values(chunk, dtype)
            if self._check_nan and not self.nan and xp.has_nan(array):
                self.nan = True
            bits = xp.bits(array)
            leading = bits >> (width - level) if level else bits
            if self._gathered:  # copies: the caller may reuse the memory it fed
                self._parts.append(array[_any_member(leading, self._gathered)] if level else xp.copy(array))
            for bucket, hist in zip(self._split, self._hists):
                inside = bits[leading == bucket.prefix] if level else bits
                hist += xp.bincount(_raw_digit(inside, bucket, width))

    def end_pass(self) -> None:
        """Narrow every wanted rank to a child bucket (or its value) after all values were fed once."""
        xp, dtype = self._xp, self._dtype
        if xp is None:  # nothing fed: no values
            raise ValueError("a selection pass was ended before any values were fed")
        width = torch.finfo(dtype).bits
        level = self._buckets[0].bits
        if self._gathered:
            values = xp.concatenate(self._parts)
            self._parts = []
            if level == 0 and xp.has_nan(values):
                self.nan = True
            if not self.nan:
                self.found.update(_select_gathered(values, self._gathered, width, xp))
        # a NaN shares its leading 16 bits with +-inf only if its top mantissa bits are zero: look in the next pass
        self._check_nan = level == 0 and bool(self._split) and _may_hold_nan(self._hists[0], dtype)
        if self.nan:
            return
        self._buckets = []
        for child in (child for bucket, hist in zip(self._split, self._hists) for child in _narrow(bucket, hist)):
            if child.bits == width:  # every bit fixed: the value itself
                value = float(torch.tensor([child.prefix], dtype=BIT_DTYPES[dtype]).view(dtype))
                self.found.update(dict.fromkeys(child.ranks, Rank(value, child.below, child.count)))
            else:
                self._buckets.append(child)
        self._start_level()


def _narrow(bucket: _Bucket, hist: np.ndarray) -> list[_Bucket]:
    """The child buckets (16 more leading bits fixed) that hold ``bucket``'s wanted ranks.

    ``hist`` counts raw digits; it is put in value order first: at the leading digit the negative half
    (offset indices 0..32767) reversed, then the positive half; inside a negative bucket, reversed.
    """
    half = DIGITS // 2
    if bucket.bits == 0:
        order = np.concatenate([np.arange(half - 1, -1, -1), np.arange(half, DIGITS)])
    elif bucket.prefix < 0:
        order = np.arange(DIGITS - 1, -1, -1)
    else:
        order = np.arange(DIGITS)
    counts = hist[order]
    cumulative = np.cumsum(counts)
    children: dict[int, _Bucket] = {}
    for rank in bucket.ranks:
        position = int(np.searchsorted(cumulative, rank - bucket.below, side="right"))
        if position not in children:
            digit = int(order[position])
            prefix = digit - half if bucket.bits == 0 else (bucket.prefix << DIGIT_BITS) | digit
            before = int(cumulative[position - 1]) if position else 0
            children[position] = _Bucket(prefix, bucket.bits + DIGIT_BITS, bucket.below + before,
                                         int(counts[position]))
        children[position].ranks.append(rank)
    return list(children.values())


def _any_member(leading: Any, buckets: list[_Bucket]) -> Any:
    """Mask of the elements (given by their leading bits) inside any of ``buckets``."""
    wanted = leading == buckets[0].prefix
    for bucket in buckets[1:]:
        wanted |= leading == bucket.prefix
    return wanted


def _select_gathered(values: Any, buckets: list[_Bucket], width: int, xp: SelectionOps) -> dict[int, Rank]:
    """Wanted ranks of the small ``buckets``, whose elements (all of them, in any order) are ``values``."""
    level = buckets[0].bits
    leading = xp.bits(values) >> (width - level) if level else None
    found: dict[int, Rank] = {}
    for bucket in buckets:
        ordered = xp.sort(values if leading is None else values[leading == bucket.prefix])
        for rank in bucket.ranks:
            value = ordered[rank - bucket.below]
            first, stop = xp.run(ordered, value)
            found[rank] = Rank(float(value), bucket.below + first, stop - first)
    return found


def _raw_digit(bits: Any, bucket: _Bucket, width: int) -> Any:
    """The 16 bits after the bucket's prefix as a histogram index in [0, 65536); the leading digit is signed,
    so it is offset by 32768 (index = signed digit + 32768) instead of masked."""
    shifted = bits >> (width - bucket.bits - DIGIT_BITS)
    if bucket.bits == 0:
        return shifted + DIGITS // 2
    return shifted & (DIGITS - 1)


def _may_hold_nan(leading_hist: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether any element's leading digit is that of ±inf or a NaN (exponent bits all ones)."""
    inf_bits = int(torch.tensor([math.inf], dtype=dtype).view(BIT_DTYPES[dtype]))
    inf_digit = inf_bits >> (torch.finfo(dtype).bits - DIGIT_BITS)
    half = DIGITS // 2
    negative = leading_hist[inf_digit:half]  # offset index of -inf's digit is inf_digit (sign bit folded)
    positive = leading_hist[half + inf_digit :]
    return bool(negative.any() or positive.any())


def _chunks(flat: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]
