"""Sparsifiers for task vectors: keep some entries, zero the rest, optionally rescale.

Each function takes one task vector (or its size) and returns a mask, a rank window or keep probabilities of
the same shape; none knows about models. The streamed statistics they need live in their own modules:
``rank_window.RankWindow`` (magnitude ranks over row blocks) and ``l1_norm.L1Norm`` (the L1 norm of a rescale).
"""

from __future__ import annotations

import torch

from mergelab.ops.rank_window import RankWindow


def keep_count(numel: int, density: float) -> int:
    """Number of entries a density keeps: ``floor(density * n)``, at least one of a non-empty tensor."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_window(numel: int, density: float) -> RankWindow:
    """TIES "trim": the ``density`` fraction of entries with the largest magnitude (``keep_count``), entries
    tied at the threshold taken in position order, as a stable descending sort would."""
    return RankWindow(numel, 0, numel if density >= 1.0 else keep_count(numel, density), descending=True)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of ``magnitude_window`` on a whole tensor.

    Selection, not a sort: the k-th largest magnitude is found exactly by histogram selection (linear time, no
    index tensor); entries tied with it are taken in position order, so the mask is deterministic.
    """
    return magnitude_window(delta.numel(), density).whole(delta.abs())


def outlier_window(numel: int, density: float, gamma: float) -> RankWindow:
    """Model Breadcrumbs ([Davari2024] sec. 3): drop the ``gamma`` fraction of largest-magnitude
    entries (outliers), then the smallest, so that a ``density`` fraction stays; ranks as a stable ascending
    sort gives them. If ``density + gamma > 1`` fewer outliers are dropped so that the density is still met."""
    if density >= 1.0:
        return RankWindow(numel, 0, numel, descending=False)
    kept = int(density * numel)
    n_small = max(0, numel - kept - int(gamma * numel))
    return RankWindow(numel, n_small, n_small + kept, descending=False)


def bernoulli_mask(delta: torch.Tensor, keep_prob: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Random mask keeping each entry independently with probability ``keep_prob`` (DARE, [Yu2024])."""
    probs = torch.as_tensor(keep_prob, dtype=delta.dtype, device=delta.device).expand(delta.shape)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities ([Deep2024] eq. 1-2): within each row, entries ranked by
    magnitude get probabilities spread linearly over ``[density - epsilon, density + epsilon]``, larger
    magnitude kept more often. A 1-D tensor is one row.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    width = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / width) * (2 * epsilon)
    return probs.reshape(delta.shape)
