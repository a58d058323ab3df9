"""Sparsifiers for task vectors: keep some entries, zero the rest, optionally rescale.

Each function takes one task vector and returns a tensor of the same shape; none knows about models.
"""

from __future__ import annotations

import torch

from mergelab.ops.quantile import order_statistic


def keep_count(numel: int, density: float) -> int:
    """Number of entries a density keeps: ``floor(density * n)``, at least one of a non-empty tensor."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``density`` fraction of entries with the largest magnitude (TIES "trim").

    Selection, not a sort: the k-th largest magnitude is found exactly by ``order_statistic`` (histogram
    selection, linear time, no index tensor); entries tied with it are taken in position order, as a stable
    descending sort would, so the mask is deterministic.
    """
    n = delta.numel()
    k = keep_count(n, density)
    if density >= 1.0 or k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    flat = delta.abs().reshape(-1)
    threshold = order_statistic(flat, n - k)
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:  # the first ``missing`` entries equal to the threshold, in position order
        mask[torch.nonzero(flat == threshold).squeeze(1)[:missing]] = True
    return mask.reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs mask: drop the ``gamma`` fraction of largest-magnitude entries (outliers), then the
    smallest, so that a ``density`` fraction stays (Davari & Belilovsky 2024, sec. 3).

    If ``density + gamma > 1`` fewer outliers are dropped so that the density is still met.
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    kept = int(density * n)
    n_small = max(0, n - kept - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_small : n_small + kept]] = True
    return mask.reshape(delta.shape)


def bernoulli_mask(delta: torch.Tensor, keep_prob: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Random mask keeping each entry independently with probability ``keep_prob`` (DARE, Yu et al. 2024)."""
    probs = torch.as_tensor(keep_prob, dtype=delta.dtype, device=delta.device).expand(delta.shape)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities (Deep et al. 2024, eq. 1-2): within each row, entries ranked by
    magnitude get probabilities spread linearly over ``[density - epsilon, density + epsilon]``, larger
    magnitude kept more often. A 1-D tensor is one row.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    width = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / width) * (2 * epsilon)
    return probs.reshape(delta.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` (a masked ``delta``) so its L1 norm equals that of ``delta`` (mergekit's ``rescale``).

    Left unscaled where either norm is below ``eps``.
    """
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)
