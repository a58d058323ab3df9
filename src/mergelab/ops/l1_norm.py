"""The exact L1 norm of a tensor fed in blocks, and the rescale factor built from two of them."""

from __future__ import annotations

import math

import torch


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
