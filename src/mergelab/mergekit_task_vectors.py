"""mergekit 0.1.5's generalized task arithmetic (``task_arithmetic``, ``ties``, ``dare_*``, ``della*``,
``breadcrumbs*``) in the working dtype: its sparsifiers (argsort trim, sorted Breadcrumbs window, DARE/DELLA
Bernoulli masks, L1 rescale), its sign vote and its normalisation; one entry family of ``ARITHMETIC`` in
``mergekit_arithmetic``."""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall
from mergelab.ops.sparsify import bernoulli_mask, magprune_keep_prob

ELECTING = ("ties", "dare_ties", "della", "breadcrumbs_ties")  # the methods with a sign vote


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: the ``max(1, ⌊density·n⌋)`` largest magnitudes, in ``torch.argsort`` order."""
    if density >= 1:
        return delta
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[: max(1, int(density * delta.numel()))]] = 1
    return delta * mask.reshape(delta.shape)


def _outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: the window after the ``n − ⌊density·n⌋ − ⌊gamma·n⌋`` smallest magnitudes (ascending sort)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    low = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.sort(delta.abs().reshape(-1).float()).indices[low: low + keep]] = 1
    return delta * mask.reshape(delta.shape)


def _l1_rescaled(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def _sparsified(method: str, i: int, delta: torch.Tensor, call: MethodCall) -> torch.Tensor:
    p = call.params
    if method == "ties":
        masked = _trim(delta, p["density"][i])
    elif method.startswith("breadcrumbs"):
        masked = _outliers(delta, p["density"][i], p["gamma"][i])
    elif method.startswith(("dare", "della")) and p["density"][i] < 1:
        wide = delta.float()
        keep = (p["density"][i] if method.startswith("dare")
                else magprune_keep_prob(wide, p["density"][i], p["epsilon"][i]))
        masked = (wide * bernoulli_mask(wide, keep, call.generator)).to(delta.dtype)
    else:
        return delta
    return _l1_rescaled(delta, masked) if p.get("rescale") else masked


def task_family(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall, method: str) -> torch.Tensor:
    """mergekit's generalized task arithmetic (see the module docstring), in the working dtype."""
    p = call.params
    deltas = torch.stack([_sparsified(method, i, e - base, call) for i, e in enumerate(experts)])
    weights = torch.tensor(p["weight"], dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if method in ELECTING:
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if p["normalize"]:
        mixed /= divisor
    if p["lambda"] != 1:
        mixed *= p["lambda"]
    return (base + mixed).to(base.dtype)
