"""Sign election and disjoint merging of task vectors (TIES-Merging, Yadav et al. 2023, sec. 3).

``deltas`` is a sequence of same-shape task vectors (a list, or a stacked tensor iterated along its first
dimension). Both functions walk the sequence with running sums, so memory stays at a few tensors whatever the
number of models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def elect_sign(deltas: Sequence[torch.Tensor], method: str = "sum",
               weights: Sequence[float] | None = None) -> torch.Tensor:
    """Elected sign per entry, +1 or -1 (TIES step 2, "elect").

    ``sum``: the sign of the summed (trimmed) task vectors, the direction with the larger total mass, as in the
    TIES paper. ``count``: the sign most models agree on. With ``weights`` each vote is ``w_i δ_i`` (mergekit's
    weighted vote). A tie elects +1.
    """
    if method not in ("sum", "count"):
        raise ValueError(f"unknown sign election method {method!r}")
    total = torch.zeros_like(deltas[0])
    for i, delta in enumerate(deltas):
        vote = delta if weights is None else delta * float(weights[i])
        total.add_(vote if method == "sum" else vote.sign())
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], elected: torch.Tensor,
                 normalize: bool) -> torch.Tensor:
    """``Σ_i w_i m_i δ_i`` with ``m_i`` = (sign δ_i = elected sign), divided by ``Σ_i w_i m_i`` where
    ``normalize`` (TIES step 3, disjoint mean). Zeros never agree, so they never count in a mean; entries where
    no model agrees keep a divisor of 1 (their update is zero anyway)."""
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for i, delta in enumerate(deltas):
        agree = delta.sign() == elected
        weight = float(weights[i])
        total.add_(torch.where(agree, delta, 0.0), alpha=weight)
        if divisor is not None:
            divisor.add_(agree.to(divisor.dtype), alpha=weight)
    if divisor is None:
        return total
    return total.div_(torch.where(divisor == 0, torch.ones_like(divisor), divisor))
