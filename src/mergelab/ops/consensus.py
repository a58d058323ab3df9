"""Sign election and disjoint merging of task vectors (TIES-Merging, [Yadav2023] sec. 3).

``deltas`` is a sequence of same-shape task vectors (a list, or a stacked tensor iterated along its first
dimension). Both functions walk the sequence with running sums, so memory stays at a few tensors whatever the
number of models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.ops.mask_ops import mask_ops


def elect_sign(deltas: Sequence[torch.Tensor], method: str = "sum",
               weights: Sequence[float] | None = None) -> torch.Tensor:
    """Elected sign per entry, +1 or -1 (TIES step 2, "elect").

    ``sum``: the sign of the summed (trimmed) task vectors, the direction with the larger total mass, as in the
    TIES paper. ``count``: the sign most models agree on. With ``weights`` each vote is ``w_i δ_i`` (mergekit's
    weighted vote). A tie elects +1: the running sum starts at +0 and a sum that cancels is +0, so
    ``copysign(1, total)`` is ``+1`` exactly where ``total >= 0``.
    """
    if method not in ("sum", "count"):
        raise ValueError(f"unknown sign election method {method!r}")
    total = torch.zeros_like(deltas[0])
    for i, delta in enumerate(deltas):
        vote = delta if weights is None else delta * float(weights[i])
        total.add_(vote if method == "sum" else vote.sign())
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)


def disjoint_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], elected: torch.Tensor,
                 normalize: bool) -> torch.Tensor:
    """``Σ_i w_i m_i δ_i`` with ``m_i`` = (sign δ_i = elected sign), divided by ``Σ_i w_i m_i`` where
    ``normalize`` (TIES step 3, disjoint mean). Zeros never agree, so they never count in a mean; entries where
    no model agrees keep a divisor of 1 (their update is zero anyway).

    ``m_i`` is computed as the float ``δ_i · elected > 0`` in one reused buffer, so each model costs five
    in-place passes and no allocation; ``m_i δ_i`` differs from ``δ_i`` masked to +0 only in the sign of some
    zeros, which a running sum that starts at +0 never shows.
    """
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    agree = torch.empty_like(elected)
    for i, delta in enumerate(deltas):
        weight = float(weights[i])
        torch.mul(delta, elected, out=agree).gt_(0)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
        total.add_(agree.mul_(delta), alpha=weight)
    if divisor is None:
        return total
    xp = mask_ops(divisor)
    counts = xp.view(divisor)
    xp.add_(counts, counts == 0)  # a divisor of 0 becomes 1, exactly
    return total.div_(divisor)
