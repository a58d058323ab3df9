"""SCF-RKL and SCF-KL: sparse complementary fusion ([Lin2026], sec. 2 and Algorithm 1).

Per tensor, with base ``θ_b`` and secondary ``θ_s``:

- ``Δ = |θ_s − θ_b|``; ``q = softmax(θ_b) + ε``, ``p = softmax(θ_s) + ε`` per row (last dimension);
- saliency ``I = Δ ⊙ D``, with ``D`` the row's reverse KL ``Σ q log(q/p)`` (SCF-RKL) or forward KL
  ``Σ p log(p/q)`` (SCF-KL, the paper's ablation in Table 10), broadcast over the row;
- threshold ``τ = quantile(I, q_center) + α (quantile(I, q_high) − quantile(I, q_low))`` over the whole
  tensor, exactly (``mergelab.ops.quantile``, any size); mask ``M = 1[I ≥ τ]``;
- result ``θ_b + M ⊙ (θ_s − θ_b)``, taken element by element from ``θ_b`` or ``θ_s`` (bit-identical).

``arcee_fusion`` is mergekit's name for SCF-KL with the ``lower`` quantile interpolation (mergekit samples
10^6 elements on larger tensors; here every quantile is exact).

More than one secondary model (the paper fuses seven vision experts but gives no rule): every expert gets
its own saliency, threshold and mask against the base. ``multi_expert: max_saliency`` (default) keeps the
discrete composition: where several experts pass their thresholds, the element comes from the one with the
highest saliency (the first in recipe order on a tie). ``multi_expert: mean`` instead averages the task
vectors of all experts that pass there: ``θ_b + mean_i(θ_i − θ_b)`` over the passing ``i`` (elements where
one expert passes are still that expert's element).

Statistics per tensor, for each expert ``i`` (recipe order of the non-base models, from 0):
``threshold_i`` (τ), ``selected_i`` (fraction with ``I ≥ τ``; the paper reports 5-15 % per layer at
α = 1.5), ``update_norm_ratio_i`` (``‖M ⊙ (θ_i − θ_b)‖ / ‖θ_i − θ_b‖``, 0 where the delta is 0) and
``taken_i`` (fraction of output elements that are expert ``i``'s); ``from_base`` (fraction left at the base)
and, with ``mean`` and several experts, ``averaged`` (fraction averaged over two or more experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergelab.errors import CheckpointError, CompatibilityError, RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param
from mergelab.ops.divergence import softmax_kl_rows
from mergelab.ops.quantile import INTERPOLATIONS, quantiles

CITATION = "Lin et al. 2026, Sparse Complementary Fusion with Reverse KL (SCF-RKL), Algorithm 1"
MAX_EXPERTS = 255  # expert choice per element is stored in a uint8 (0 = base)
MULTI_EXPERT_RULES = ("max_saliency", "mean")

ALPHA = Param("alpha", float, default=1.5,
              help="IQR scale α of the threshold τ = median + α IQR; negative values select more than half")
Q_LOW = Param("q_low", float, default=0.25, low=0.0, high=1.0, help="lower quantile of the IQR (Q1)")
Q_HIGH = Param("q_high", float, default=0.75, low=0.0, high=1.0, help="upper quantile of the IQR (Q3)")
Q_CENTER = Param("q_center", float, default=0.5, low=0.0, high=1.0, help="centre quantile of τ (the median)")
EPSILON = Param("epsilon", float, default=1e-8, low=0.0, low_open=True,
                help="smoothing ε added to each softmax probability")
QUANTILE_METHOD = Param("quantile_method", str, default="linear", choices=INTERPOLATIONS,
                        help="quantile interpolation, as numpy.quantile's method")
MULTI_EXPERT = Param("multi_expert", str, default="max_saliency", choices=MULTI_EXPERT_RULES,
                     help="with several experts: take the most salient passing one, or average the passing ones")
PARAMS = (ALPHA, Q_LOW, Q_HIGH, Q_CENTER, EPSILON, QUANTILE_METHOD, MULTI_EXPERT)


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
    def from_call(cls, call: MethodCall) -> Thresholding:
        p = call.params
        check_thresholds(p, call.info.name)
        return cls(p["alpha"], p["q_low"], p["q_center"], p["q_high"], p["quantile_method"])

    def threshold(self, saliency: torch.Tensor) -> float:
        """``τ = quantile(I, q_center) + α (quantile(I, q_high) − quantile(I, q_low))``, in float64."""
        low, center, high = quantiles(saliency, (self.q_low, self.q_center, self.q_high), self.interpolation)
        return center + self.alpha * (high - low)


def saliency(base: torch.Tensor, expert: torch.Tensor, epsilon: float, reverse: bool) -> torch.Tensor:
    """``I = |θ_s − θ_b| ⊙ D`` with ``D`` the per-row reverse (``reverse``) or forward KL, broadcast over rows.

    In the inputs' dtype; the KL itself is computed in float64 (``ops.divergence``).
    """
    first, second = (base, expert) if reverse else (expert, base)
    row_kl = softmax_kl_rows(first, second, epsilon)  # KL(first ‖ second) per row
    delta = (expert - base).abs_()
    return delta.mul_(row_kl.to(delta.dtype).unsqueeze(-1) if base.dim() else row_kl.to(delta.dtype))


def passes(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``scores ≥ threshold`` exactly for a float64 ``threshold``: compare with the smallest value of the
    scores' dtype that is ``≥ threshold`` (a plain comparison would round the threshold to that dtype)."""
    bound = torch.tensor(threshold, dtype=scores.dtype)
    if float(bound) < threshold:
        bound = torch.nextafter(bound, torch.tensor(math.inf, dtype=scores.dtype))
    return scores >= bound.item()


def _fuse(call: MethodCall, reverse: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Algorithm 1 against the base for every expert, combined by the ``multi_expert`` rule."""
    settings = Thresholding.from_call(call)
    base, experts, name = call.base, call.experts, call.info.name
    for i, expert in enumerate(experts):
        if expert.shape != base.shape:
            raise CompatibilityError(f"{name}: expert {i} has shape {tuple(expert.shape)} but the base has "
                                     f"{tuple(base.shape)}; merge only models of the same architecture")
    n = base.numel()
    stats: dict[str, float] = {}
    choice = torch.zeros(base.shape, dtype=torch.uint8, device=base.device)  # 0: base, i + 1: expert i
    best = torch.full_like(base, -math.inf) if len(experts) > 1 else None  # highest passing saliency so far
    averaging = call.params["multi_expert"] == "mean" and len(experts) > 1
    passing = torch.zeros_like(choice) if averaging else None  # how many experts pass, per element
    delta_sum = torch.zeros_like(base) if averaging else None
    for i, expert in enumerate(experts):
        full = float(torch.linalg.vector_norm(expert - base))  # before the scores: a smaller memory peak
        scores = saliency(base, expert, call.params["epsilon"], reverse)
        threshold = settings.threshold(scores)
        if not math.isfinite(threshold):
            raise CheckpointError(f"{name}: the SCF threshold of expert {i} is not finite (NaN or infinite "
                                  "weights, or an extreme alpha); check the checkpoints and alpha")
        mask = passes(scores, threshold)
        selected = int(mask.sum())
        applied = float(torch.linalg.vector_norm(expert[mask] - base[mask])) if selected else 0.0
        stats[f"threshold_{i}"] = threshold
        stats[f"selected_{i}"] = selected / n
        stats[f"update_norm_ratio_{i}"] = applied / full if full > 0 else 0.0
        if best is None:
            choice.masked_fill_(mask, i + 1)
        else:
            candidate = scores.masked_fill_(~mask, -math.inf)
            choice.masked_fill_(candidate > best, i + 1)  # strict: the earlier expert keeps a tie
            torch.maximum(best, candidate, out=best)
        if passing is not None and delta_sum is not None:
            passing += mask
            delta_sum += torch.where(mask, expert - base, 0.0)
        del scores, mask
    merged = base
    for i, expert in enumerate(experts):
        taken = choice == i + 1
        if passing is not None:
            taken &= passing == 1
        stats[f"taken_{i}"] = int(taken.sum()) / n
        merged = torch.where(taken, expert, merged)
    if passing is not None and delta_sum is not None:
        averaged = passing >= 2
        stats["averaged"] = int(averaged.sum()) / n
        merged = torch.where(averaged, base + delta_sum / passing.clamp(min=1), merged)
    stats["from_base"] = int((choice == 0).sum()) / n
    return merged, stats


def scf_rkl(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """SCF-RKL: Algorithm 1 with the reverse KL ``Σ q log(q/p)`` of base ``q`` and secondary ``p``."""
    return _fuse(call, reverse=True)


def scf_kl(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """SCF-KL: Algorithm 1 with the forward KL ``Σ p log(p/q)`` (the paper's ablation, Table 10)."""
    return _fuse(call, reverse=False)


SPECS = (
    MethodSpec(name="scf_rkl", fn=scf_rkl, params=PARAMS, citation=CITATION, max_experts=MAX_EXPERTS,
               check_params=check_thresholds),
    MethodSpec(name="scf_kl", fn=scf_kl, params=PARAMS, citation=CITATION + " (forward-KL ablation, Table 10)",
               max_experts=MAX_EXPERTS, check_params=check_thresholds),
    MethodSpec(name="arcee_fusion", fn=scf_kl, params=(ALPHA, Q_LOW, Q_HIGH, Q_CENTER, EPSILON),
               citation="mergekit's arcee_fusion: " + CITATION + " (forward KL, lower quantiles)",
               max_experts=1, aliases_of="scf_kl", check_params=check_thresholds,
               fixed={"quantile_method": "lower", "multi_expert": "max_saliency"}),
)
