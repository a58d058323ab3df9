"""Sign election and disjoint merging of stacked task vectors (TIES-Merging, Yadav et al. 2023, sec. 3).

``deltas`` is always a stack of shape ``(n_models, *tensor_shape)``.
"""

from __future__ import annotations

import torch


def elect_sign(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Elected sign per entry, +1 or -1 (TIES step 2, "elect").

    ``sum``: the sign of the summed (trimmed) task vectors, i.e. the direction with the larger total mass,
    as in the TIES paper. ``count``: the sign most models agree on. A tie elects +1.
    """
    if method == "sum":
        total = deltas.sum(dim=0)
    elif method == "count":
        total = deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign election method {method!r}")
    return torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)


def agreement_mask(deltas: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Entries whose sign equals the elected sign (zeros never agree, so they never count in a mean)."""
    return deltas.sign() == elected.unsqueeze(0)


def weighted_disjoint_sum(deltas: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                          normalize: bool) -> torch.Tensor:
    """``Σ_i w_i m_i δ_i``, divided by ``Σ_i w_i m_i`` where ``normalize`` (TIES step 3, disjoint mean).

    Entries where no model agrees keep a divisor of 1 (the update there is zero anyway).
    """
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    masked = deltas * mask
    total = (masked * w).sum(dim=0)
    if not normalize:
        return total
    divisor = (w * mask).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor
