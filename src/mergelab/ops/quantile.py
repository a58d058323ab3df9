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


_NUMPY = _ArrayOps(
    values=lambda chunk, dtype: chunk.detach().to(dtype).numpy(),
    bits=lambda values: values.view(np.int32 if values.dtype == np.float32 else np.int64),
    bincount=lambda digits: np.bincount(digits, minlength=_DIGITS),
    sort=np.sort,
    concatenate=np.concatenate,
    has_nan=lambda values: bool(np.isnan(values).any()),
)
_TORCH = _ArrayOps(
    values=lambda chunk, dtype: chunk.to(dtype),
    bits=lambda values: values.view(_BIT_DTYPES[values.dtype]),
    bincount=lambda digits: torch.bincount(digits, minlength=_DIGITS).cpu().numpy(),
    sort=lambda values: torch.sort(values).values,
    concatenate=torch.cat,
    has_nan=lambda values: bool(torch.isnan(values).any()),
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
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown quantile interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")
    if not x.is_floating_point():
        raise TypeError(f"quantiles need a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("quantiles of an empty tensor are undefined")
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(qs)}")
    flat = x.reshape(-1)
    plans = [_plan(flat.numel(), q, interpolation) for q in qs]
    ranks = sorted({rank for lo, hi, _ in plans for rank in (lo, hi)})
    if chunk_elements is None:
        chunk_elements = _CPU_CHUNK if x.device.type == "cpu" else _CUDA_CHUNK
    values = _order_statistics(flat, ranks, chunk_elements, gather_limit)
    if values is None:
        return [math.nan] * len(qs)
    return [values[lo] if gamma == 0.0 else _lerp(values[lo], values[hi], gamma) for lo, hi, gamma in plans]


def order_statistic(x: torch.Tensor, rank: int) -> float:
    """``sorted(x.ravel())[rank]`` (0-based), exactly, by the same selection as ``quantiles`` (no sort, no copy
    of ``x``); NaN if ``x`` holds a NaN."""
    if not 0 <= rank < x.numel():
        raise ValueError(f"rank {rank} is outside a tensor of {x.numel()} elements")
    chunk = _CPU_CHUNK if x.device.type == "cpu" else _CUDA_CHUNK
    values = _order_statistics(x.reshape(-1), [rank], chunk, 1 << 22)
    return math.nan if values is None else values[rank]


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


def _order_statistics(flat: torch.Tensor, ranks: Sequence[int], chunk_elements: int,
                      gather_limit: int) -> dict[int, float] | None:
    """``{r: sorted(flat)[r]}`` for each wanted 0-based rank of the 1-D ``flat``; None if it holds a NaN.

    Each loop is one pass over ``flat`` at one level (as many leading bits fixed in every bucket): small
    buckets are gathered with one mask and sorted, large ones get a histogram of their next 16 bits.
    """
    dtype = flat.dtype if flat.dtype in _BIT_DTYPES else torch.float32
    width = torch.finfo(dtype).bits
    xp = _NUMPY if flat.device.type == "cpu" else _TORCH
    found: dict[int, float] = {}
    buckets = [_Bucket(prefix=0, bits=0, below=0, count=flat.numel(), ranks=sorted(set(ranks)))]
    while buckets:
        level = buckets[0].bits
        gathered = [b for b in buckets if b.count <= gather_limit]
        split = [b for b in buckets if b.count > gather_limit]
        parts = []
        hists = [np.zeros(_DIGITS, dtype=np.int64) for _ in split]
        for chunk in _chunks(flat, chunk_elements):
            values = xp.values(chunk, dtype)
            bits = xp.bits(values)
            leading = bits >> (width - level) if level else bits
            if gathered:
                parts.append(values[_any_member(leading, gathered)] if level else values)
            for bucket, hist in zip(split, hists):
                inside = bits[leading == bucket.prefix] if level else bits
                hist += xp.bincount(_raw_digit(inside, bucket, width))
        if gathered:
            values = xp.concatenate(parts)
            if level == 0 and xp.has_nan(values):
                return None
            found.update(_select_gathered(values, gathered, width, xp))
        if level == 0 and split and _may_hold_nan(hists[0], dtype) and _has_nan(flat, chunk_elements, xp, dtype):
            return None
        buckets = []
        for child in (child for bucket, hist in zip(split, hists) for child in _narrow(bucket, hist)):
            if child.bits == width:  # every bit fixed: the value itself
                value = float(torch.tensor([child.prefix], dtype=_BIT_DTYPES[dtype]).view(dtype))
                found.update(dict.fromkeys(child.ranks, value))
            else:
                buckets.append(child)
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


def _select_gathered(values: Any, buckets: list[_Bucket], width: int, xp: _ArrayOps) -> dict[int, float]:
    """Wanted ranks of the small ``buckets``, whose elements (all of them, in any order) are ``values``."""
    level = buckets[0].bits
    leading = xp.bits(values) >> (width - level) if level else None
    found: dict[int, float] = {}
    for bucket in buckets:
        ordered = xp.sort(values if leading is None else values[leading == bucket.prefix])
        for rank in bucket.ranks:
            found[rank] = float(ordered[rank - bucket.below])
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


def _has_nan(flat: torch.Tensor, chunk_elements: int, xp: _ArrayOps, dtype: torch.dtype) -> bool:
    return any(xp.has_nan(xp.values(chunk, dtype)) for chunk in _chunks(flat, chunk_elements))


def _chunks(flat: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]
