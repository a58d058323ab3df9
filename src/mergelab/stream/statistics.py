"""The output statistics: per tensor, the fraction of output elements equal to each input (and to the base:
``changed_from_base``), plus a method's own figures, accumulated piece by piece.

Inputs of the output's dtype are compared on their stored bit patterns (+0 and -0 counted equal); others in the
compute dtype (an input the output dtype holds exactly) or in the output dtype (one that rounds to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergelab.stream.schedule import Piece

_INTEGER_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MergeStats:
    """Per-tensor statistics gathered while streaming (fractions of elements, method statistics)."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_read: int = 0


def exactly_in(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Every value of ``dtype`` is a value of ``out_dtype`` (so equality can be tested in the compute dtype)."""
    if dtype == out_dtype or out_dtype == torch.float64:
        return True
    return out_dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)


def count_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.device.type == "cpu":  # numpy's comparisons are vectorised, several times faster than torch's here
        return int(np.count_nonzero(a.numpy() == b.numpy()))
    return int(torch.count_nonzero(a == b))


class SameBits:
    """Counts the elements of a tensor of ``out``'s dtype that equal ``out`` as numbers, by comparing bit patterns
    as integers (half the bytes of a float32 comparison, and no cast back). Equal numbers have equal bits except
    +0 and -0, so at the (few) positions where ``out`` holds a zero, pairs that differ only in the sign bit are
    added; neither side holds NaN (inputs and outputs are checked)."""

    def __init__(self, out: torch.Tensor):
        self.kind = _INTEGER_VIEWS[out.element_size()]
        self.magnitude = torch.iinfo(self.kind).max  # every bit but the sign
        self.out = out.view(self.kind).numpy().reshape(-1)
        self.zeros = np.flatnonzero(np.bitwise_and(self.out, self.magnitude) == 0)  # where out is +0 or -0
        self.out_zeros = self.out[self.zeros]

    def count(self, tile: torch.Tensor) -> int:
        other = tile.view(self.kind).numpy().reshape(-1)
        same = int(np.count_nonzero(self.out == other))
        if self.zeros.size:
            at_zeros = other[self.zeros]
            signed = (at_zeros != self.out_zeros) & (np.bitwise_and(at_zeros, self.magnitude) == 0)
            same += int(np.count_nonzero(signed))
        return same


def add_equal(totals: dict[str, Any], counts: dict[str, Any]) -> None:
    """Add one tile's or piece's counts (``numel``, ``equal_to`` per model, method figures: the latest wins)."""
    totals["numel"] += counts.pop("numel")
    for model, n in counts.pop("equal_to").items():
        totals["equal_to"][model] = totals["equal_to"].get(model, 0) + n
    totals.update(counts)


def add_counts(stats: MergeStats, piece: Piece, counts: dict[str, Any]) -> None:
    """Accumulate a piece's counts; turn them into fractions when its tensor is complete."""
    entry = stats.tensors.setdefault(piece.job.name, {"numel": 0, "equal_to": {}})
    add_equal(entry, counts)
    if piece.last:
        total = max(entry["numel"], 1)
        entry["equal_to"] = {m: n / total for m, n in entry["equal_to"].items()}
        if piece.job.base is not None:
            entry["changed_from_base"] = 1.0 - entry["equal_to"][piece.job.base.model]
