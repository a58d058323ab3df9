"""Algorithm 1 of SCF ([Lin2026], sec. 2): the row divergence ``D``, the saliency ``I = |θ_s − θ_b| ⊙ D``, the
threshold ``τ = quantile(I, q_center) + α (quantile(I, q_high) − quantile(I, q_low))`` and the mask ``I ≥ τ``.

Stateless tensor maths on one block or a whole tensor; ``scf_streaming`` runs them over a tensor's row blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.ops.divergence import softmax_kl_rows
from mergelab.ops.quantile import StreamedQuantiles
from mergelab.ops.rank_window import exact_selection


def check_thresholds(params: dict, where: str) -> None:
    """The threshold settings checked together (the spec's ``check_params``, run while planning)."""
    if not 0.0 <= params["q_low"] <= params["q_center"] <= params["q_high"] <= 1.0:
        raise RecipeError(f"{where}: SCF needs 0 <= q_low <= q_center <= q_high <= 1, got q_low="
                          f"{params['q_low']}, q_center={params['q_center']}, q_high={params['q_high']}; "
                          "reorder these parameters")
    if not math.isfinite(params["alpha"]):
        raise RecipeError(f"{where}: SCF parameter alpha must be a finite number, got "
                          f"{params['alpha']}; set alpha to a number such as 1.5")


@dataclass(frozen=True)
class Thresholding:
    """The threshold settings of Algorithm 1, checked together."""

    alpha: float
    q_low: float
    q_center: float
    q_high: float
    interpolation: str

    @classmethod
    def from_params(cls, method: str, p: dict[str, Any]) -> Thresholding:
        check_thresholds(p, method)
        return cls(p["alpha"], p["q_low"], p["q_center"], p["q_high"], p["quantile_method"])

    def quantiles(self, numel: int) -> StreamedQuantiles:
        """The streamed exact ``quantile(I, q_low)``, ``quantile(I, q_center)``, ``quantile(I, q_high)``."""
        return StreamedQuantiles(numel, (self.q_low, self.q_center, self.q_high), self.interpolation,
                                 exact_selection)

    def threshold(self, low: float, center: float, high: float) -> float:
        """``τ = quantile(I, q_center) + α (quantile(I, q_high) − quantile(I, q_low))``, in float64."""
        return center + self.alpha * (high - low)


def row_divergence(base: torch.Tensor, expert: torch.Tensor, epsilon: float, reverse: bool) -> torch.Tensor:
    """``D`` per row (last dimension): the reverse KL ``Σ q log(q/p)`` (``reverse``) or the forward KL, float64."""
    first, second = (base, expert) if reverse else (expert, base)
    return softmax_kl_rows(first, second, epsilon)  # KL(first ‖ second) per row


def scores(base: torch.Tensor, expert: torch.Tensor, row_kl: torch.Tensor,
           delta: torch.Tensor | None = None) -> torch.Tensor:
    """``I = |θ_s − θ_b| ⊙ D`` in the inputs' dtype, ``row_kl`` (float64, one per row of these tensors)
    broadcast over each row; ``delta``: ``θ_s − θ_b`` where the caller has it already."""
    magnitude = (expert - base).abs_() if delta is None else delta.abs()
    kl = row_kl.to(magnitude.dtype)
    return magnitude.mul_(kl.unsqueeze(-1) if base.dim() and kl.dim() else kl)


def saliency(base: torch.Tensor, expert: torch.Tensor, epsilon: float, reverse: bool) -> torch.Tensor:
    """``I = |θ_s − θ_b| ⊙ D`` of a whole tensor, with ``D`` the per-row reverse (``reverse``) or forward KL."""
    return scores(base, expert, row_divergence(base, expert, epsilon, reverse))


def passes(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``scores ≥ threshold`` exactly for a float64 ``threshold``: compare with the smallest value of the
    scores' dtype that is ``≥ threshold`` (a plain comparison would round the threshold to that dtype)."""
    bound = torch.tensor(threshold, dtype=scores.dtype)
    if float(bound) < threshold:
        bound = torch.nextafter(bound, torch.tensor(math.inf, dtype=scores.dtype))
    return scores >= bound.item()
