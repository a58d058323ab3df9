"""Exact quantiles of tensors of any size: no sampling, no full sort.

``torch.quantile`` refuses inputs above 2^24 elements and sorts everything; embedding matrices hold 10^8-10^9.
Here the order statistics a set of quantiles needs come from an exact streamed selection
(``radix_selection.Selection``, or ``sampled_selection.SampledSelection``); this module turns quantiles into
ranks and the ranks' values back into quantiles.

Interpolations follow numpy's definitions (Hyndman & Fan 1996 type 7 ``linear`` and the discontinuous
``lower``, ``higher``, ``nearest``, ``midpoint``); the interpolation itself is done in float64 with numpy's
``_lerp`` formula, so the result equals ``numpy.quantile`` of the same values in float64 exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mergelab.ops.radix_selection import Selection
from mergelab.ops.sampled_selection import SampledSelection

INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")


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
