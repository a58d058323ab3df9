"""The array steps of exact selection (``radix_selection``, ``sampled_selection``), on numpy or torch.

Selection reads a float's IEEE bit pattern as a signed integer and histograms it 16 bits (one digit) at a time;
the constants of that digit and the integer view of each float dtype live here with the steps themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS
BIT_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class SelectionOps:
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


_NUMPY = SelectionOps(
    values=lambda chunk, dtype: chunk.detach().to(dtype).numpy(),
    bits=lambda values: values.view(np.int32 if values.dtype == np.float32 else np.int64),
    bincount=lambda digits: np.bincount(digits, minlength=DIGITS),
    sort=np.sort,
    concatenate=np.concatenate,
    has_nan=lambda values: bool(np.isnan(values).any()),
    run=lambda ordered, value: (int(np.searchsorted(ordered, value, "left")),
                                int(np.searchsorted(ordered, value, "right"))),
    copy=np.copy,
    count=lambda mask: int(np.count_nonzero(mask)),
    nth=lambda values, ranks: [float(v) for v in np.partition(values, ranks)[ranks]],
)
_TORCH = SelectionOps(
    values=lambda chunk, dtype: chunk.to(dtype),
    bits=lambda values: values.view(BIT_DTYPES[values.dtype]),
    bincount=lambda digits: torch.bincount(digits, minlength=DIGITS).cpu().numpy(),
    sort=lambda values: torch.sort(values).values,
    concatenate=torch.cat,
    has_nan=lambda values: bool(torch.isnan(values).any()),
    run=lambda ordered, value: (int(torch.searchsorted(ordered, value.reshape(1))),
                                int(torch.searchsorted(ordered, value.reshape(1), right=True))),
    copy=torch.clone,
    count=lambda mask: int(torch.count_nonzero(mask)),
    nth=lambda values, ranks: torch.sort(values).values[ranks].tolist(),
)


def selection_ops(device: torch.device) -> SelectionOps:
    """numpy's steps on the CPU, torch's elsewhere."""
    return _NUMPY if device.type == "cpu" else _TORCH


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype values are ranked in: their own for float32/float64, float32 (exact) for the others."""
    return dtype if dtype in BIT_DTYPES else torch.float32
