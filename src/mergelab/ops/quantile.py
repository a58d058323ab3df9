"""Exact quantiles of tensors of any size, by radix selection over chunks: no sampling, no full sort.

``torch.quantile`` refuses inputs above 2^24 elements and sorts everything; embedding matrices hold 10^8-10^9.
Here the order statistics a set of quantiles needs are found by MSD radix selection on the IEEE bit patterns:
one histogram pass over the tensor per 16 leading bits, narrowing each wanted rank to the bucket of bit
patterns that holds it, until a bucket is small enough to gather and sort (or its bits are all fixed). All
wanted ranks share each pass. Histograms count raw bit digits (no per-element transform); float order is
restored on the 65536 bins (negative values order by descending bits). Work memory is a few chunks plus the
gathered buckets (at most ``gather_limit`` elements each), whatever the tensor's size; CPU (numpy kernels on
the tensor's memory) and CUDA (torch) alike.

Interpolations follow numpy's definitions (Hyndman & Fan 1996 type 7 ``linear`` and the discontinuous
``lower``, ``higher``, ``nearest``, ``midpoint``); the interpolation itself is done in float64 with numpy's
``_lerp`` formula, so the result equals ``numpy.quantile`` of the same values in float64 exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")
_DIGIT_BITS = 16
_DIGITS = 1 << _DIGIT_BITS
_CPU_CHUNK = 1 << 16
_CUDA_CHUNK = 1 << 24
_BIT_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class _ArrayOps:
    """The few steps spelled differently by numpy, used on CPU (for these memory-bound steps its kernels are
    several times faster than torch's CPU ones: masked selection ~10x, shifts ~2x, bincount ~2x), and by
    torch, used on CUDA. Shifts, comparisons and boolean indexing read the same in both."""

    values: Callable[[torch.Tensor, torch.dtype], Any]  # a chunk as an array of the working float dtype
    bits: Callable[[Any], Any]  # the same memory as signed integers
    bincount: Callable[[Any], np.ndarray]  # histogram of 16-bit digits, on the CPU
    sort: Callable[[Any], Any]
    concatenate: Callable[[list[Any]], Any]
    has_nan: Callable[[Any], bool]
    run: Callable[[Any, Any], tuple[int, int]]  # [first, stop) of ``value`` in a sorted array
    copy: Callable[[Any], Any]
    count: Callable[[Any], int]  # true entries of a boolean array
    nth: Callable[[Any, list[int]], list[float]]  # the values at these 0-based ranks of an unsorted array


_NUMPY = _ArrayOps(
    values=lambda chunk, dtype: chunk.detach().to(dtype).numpy(),
    bits=lambda values: values.view(np.int32 if values.dtype == np.float32 else np.int64),
    bincount=lambda digits: np.bincount(digits, minlength=_DIGITS),
    sort=np.sort,
    concatenate=np.concatenate,
    has_nan=lambda values: bool(np.isnan(values).any()),
    run=lambda ordered, value: (int(np.searchsorted(ordered, value, "left")),
                                int(np.searchsorted(ordered, value, "right"))),
    copy=np.copy,
    count=lambda mask: int(np.count_nonzero(mask)),
    nth=lambda values, ranks: [float(v) for v in np.partition(values, ranks)[ranks]],
)
_TORCH = _ArrayOps(
    values=lambda chunk, dtype: chunk.to(dtype),
    bits=lambda values: values.view(_BIT_DTYPES[values.dtype]),
    bincount=lambda digits: torch.bincount(digits, minlength=_DIGITS).cpu().numpy(),
    sort=lambda values: torch.sort(values).values,
    concatenate=torch.cat,
    has_nan=lambda values: bool(torch.isnan(values).any()),
    run=lambda ordered, value: (int(torch.searchsorted(ordered, value.reshape(1))),
                                int(torch.searchsorted(ordered, value.reshape(1), right=True))),
    copy=torch.clone,
    count=lambda mask: int(torch.count_nonzero(mask)),
    nth=lambda values, ranks: torch.sort(values).values[ranks].tolist(),
)


def quantiles(x: torch.Tensor, qs: Sequence[float], interpolation: str = "linear", *,
              chunk_elements: int | None = None, gather_limit: int = 1 << 22) -> list[float]:
    """The ``qs`` quantiles of all elements of ``x``, exactly, as float64 Python floats.

    Same definitions as ``numpy.quantile(x.ravel(), qs, method=interpolation)``, NaN in ``x`` included
    (every quantile is then NaN). float16/bfloat16 inputs are ranked in float32 (exactly representable).
    A non-contiguous ``x`` is copied once. ``chunk_elements`` (default: 2^16 on CPU, which keeps a chunk's
    temporaries in cache, 2^24 on CUDA) and ``gather_limit`` trade speed for work memory and never change
    the result.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantiles need a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1)
    streamed = StreamedQuantiles(flat.numel(), qs, interpolation,
                                 lambda numel, ranks: Selection(numel, ranks, chunk_elements, gather_limit))
    while not streamed.done:
        streamed.feed(flat)
        streamed.end_pass()
    return streamed.values


class StreamedQuantiles:
    """The ``qs`` quantiles of ``numel`` values streamed in blocks, exactly as ``quantiles`` defines them.

    The order statistics the quantiles need come from ``selection(numel, ranks)``: a ``Selection`` (the
    default) or a ``SampledSelection``. Feed every value once per pass, then ``end_pass``, until ``done``;
    ``values`` then holds the quantiles (all NaN if a NaN was fed).
    """

    def __init__(self, numel: int, qs: Sequence[float], interpolation: str = "linear",
                 selection: Callable[[int, list[int]], Selection | SampledSelection] | None = None):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown quantile interpolation {interpolation!r}; use one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if numel == 0:
            raise ValueError("quantiles of an empty tensor are undefined")
        if any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"quantiles must lie in [0, 1], got {list(qs)}")
        self._plans = [_plan(numel, q, interpolation) for q in qs]
        ranks = sorted({rank for lo, hi, _ in self._plans for rank in (lo, hi)})
        self._selection = (selection or Selection)(numel, ranks)

    @property
    def done(self) -> bool:
        return self._selection.done

    def feed(self, values: torch.Tensor) -> None:
        self._selection.feed(values)

    def end_pass(self) -> None:
        self._selection.end_pass()

    @property
    def values(self) -> list[float]:
        if self._selection.nan:
            return [math.nan] * len(self._plans)
        found = self._selection.found
        return [found[lo].value if gamma == 0.0 else _lerp(found[lo].value, found[hi].value, gamma)
                for lo, hi, gamma in self._plans]


def _plan(n: int, q: float, interpolation: str) -> tuple[int, int, float]:
    """(lower rank, upper rank, weight of the upper one) for quantile ``q`` of ``n`` values, as numpy has it:
    virtual index ``(n − 1) q``, floor / ceil / round-half-to-even / midpoint of the two for the others."""
    virtual = (n - 1) * q
    lower, upper = math.floor(virtual), math.ceil(virtual)
    if interpolation == "lower":
        return lower, lower, 0.0
    if interpolation == "higher":
        return upper, upper, 0.0
    if interpolation == "nearest":
        rank = round(virtual)  # half to even, as numpy.around
        return rank, rank, 0.0
    if interpolation == "midpoint":
        return lower, upper, 0.0 if lower == upper else 0.5
    return lower, upper, virtual - lower


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's ``_lerp``: ``a + (b − a) t``, or ``b − (b − a)(1 − t)`` for ``t ≥ 0.5`` (monotone, exact ends)."""
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


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
        self._xp: _ArrayOps | None = None
        self._dtype = torch.float32
        self._start_level()

    @property
    def done(self) -> bool:
        return self.nan or not self._buckets

    def _start_level(self) -> None:
        self._gathered = [b for b in self._buckets if b.count <= self.gather_limit]
        self._split = [b for b in self._buckets if b.count > self.gather_limit]
        self._parts: list[Any] = []
        self._hists = [np.zeros(_DIGITS, dtype=np.int64) for _ in self._split]

    def feed(self, values: torch.Tensor) -> None:
        """Some of the values (any shape, float dtype) for the current pass."""
        if self._xp is None:
            self._xp = _NUMPY if values.device.type == "cpu" else _TORCH
            self._dtype = values.dtype if values.dtype in _BIT_DTYPES else torch.float32
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
                value = float(torch.tensor([child.prefix], dtype=_BIT_DTYPES[dtype]).view(dtype))
                self.found.update(dict.fromkeys(child.ranks, Rank(value, child.below, child.count)))
            else:
                self._buckets.append(child)
        self._start_level()


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
        self._xp: _ArrayOps | None = None
        self._offset = 0

    @property
    def done(self) -> bool:
        return self.nan or len(self.found) == len(self.ranks)

    def feed(self, values: torch.Tensor) -> None:
        if self._fallback is not None:
            self._fallback.feed(values)
            return
        if self._xp is None:
            self._xp = _NUMPY if values.device.type == "cpu" else _TORCH
        xp = self._xp
        flat = xp.values(values.reshape(-1), values.dtype if values.dtype in _BIT_DTYPES else torch.float32)
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

    def _bracket(self, sample: Any, xp: _ArrayOps) -> list[_Bracket]:
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


def _resolve(bracket: _Bracket, inside: Any, numel: int, xp: _ArrayOps) -> dict[int, Rank | None]:
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


def _narrow(bucket: _Bucket, hist: np.ndarray) -> list[_Bucket]:
    """The child buckets (16 more leading bits fixed) that hold ``bucket``'s wanted ranks.

    ``hist`` counts raw digits; it is put in value order first: at the leading digit the negative half
    (offset indices 0..32767) reversed, then the positive half; inside a negative bucket, reversed.
    """
    half = _DIGITS // 2
    if bucket.bits == 0:
        order = np.concatenate([np.arange(half - 1, -1, -1), np.arange(half, _DIGITS)])
    elif bucket.prefix < 0:
        order = np.arange(_DIGITS - 1, -1, -1)
    else:
        order = np.arange(_DIGITS)
    counts = hist[order]
    cumulative = np.cumsum(counts)
    children: dict[int, _Bucket] = {}
    for rank in bucket.ranks:
        position = int(np.searchsorted(cumulative, rank - bucket.below, side="right"))
        if position not in children:
            digit = int(order[position])
            prefix = digit - half if bucket.bits == 0 else (bucket.prefix << _DIGIT_BITS) | digit
            before = int(cumulative[position - 1]) if position else 0
            children[position] = _Bucket(prefix, bucket.bits + _DIGIT_BITS, bucket.below + before,
                                         int(counts[position]))
        children[position].ranks.append(rank)
    return list(children.values())


def _any_member(leading: Any, buckets: list[_Bucket]) -> Any:
    """Mask of the elements (given by their leading bits) inside any of ``buckets``."""
    wanted = leading == buckets[0].prefix
    for bucket in buckets[1:]:
        wanted |= leading == bucket.prefix
    return wanted


def _select_gathered(values: Any, buckets: list[_Bucket], width: int, xp: _ArrayOps) -> dict[int, Rank]:
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
    shifted = bits >> (width - bucket.bits - _DIGIT_BITS)
    if bucket.bits == 0:
        return shifted + _DIGITS // 2
    return shifted & (_DIGITS - 1)


def _may_hold_nan(leading_hist: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether any element's leading digit is that of ±inf or a NaN (exponent bits all ones)."""
    inf_bits = int(torch.tensor([math.inf], dtype=dtype).view(_BIT_DTYPES[dtype]))
    inf_digit = inf_bits >> (torch.finfo(dtype).bits - _DIGIT_BITS)
    half = _DIGITS // 2
    negative = leading_hist[inf_digit:half]  # offset index of -inf's digit is inf_digit (sign bit folded)
    positive = leading_hist[half + inf_digit :]
    return bool(negative.any() or positive.any())


def _chunks(flat: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]
