"""The few mask steps of per-tensor sparsifiers and sign consensus, on numpy (CPU) or torch (other devices)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class MaskOps:
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
_NUMPY = MaskOps(
    view=lambda t: t.numpy(),
    compare_=lambda a, op, value: _UFUNCS[op](a, value, out=a, casting="unsafe"),
    count=lambda m: int(np.count_nonzero(m)),
    positions=lambda m: np.flatnonzero(m),
    multiply_=lambda a, m: np.multiply(a, m, out=a),
    add_=lambda a, m: np.add(a, m, out=a),
)
_TORCH = MaskOps(
    view=lambda t: t,
    compare_=lambda a, op, value: getattr(a, op + "_")(value),
    count=lambda m: int(torch.count_nonzero(m)),
    positions=lambda m: torch.nonzero(m.reshape(-1)).squeeze(1),
    multiply_=lambda a, m: a.mul_(m),
    add_=lambda a, m: a.add_(m),
)


def mask_ops(tensor: torch.Tensor) -> MaskOps:
    return _NUMPY if tensor.device.type == "cpu" else _TORCH
