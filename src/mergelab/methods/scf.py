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

Every method here is a ``TwoPass`` method, so the engine streams a large tensor in row blocks and memory does
not grow with the tensor: the row divergence ``D`` is per row, so each block computes its rows' ``D`` (kept,
8 bytes a row, for the later passes); the statistics passes feed the saliency to an exact streamed selection
(``ops.quantile.StreamedQuantiles``, the same machinery as TIES's trim threshold) until the three quantiles
of the whole tensor are known; the output pass recomputes each block's saliency from the kept ``D`` and
applies the mask. A whole tensor runs the same code on one block, so both paths give the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mergelab.errors import CheckpointError, CompatibilityError, RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param, TensorInfo, TwoPass
from mergelab.ops.divergence import softmax_kl_rows
from mergelab.ops.quantile import INTERPOLATIONS, StreamedQuantiles
from mergelab.ops.select import bit_mask, keep_, select
from mergelab.ops.sparsify import exact_selection

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


class _Expert:
    """One expert's part of a tensor's state: its row divergences, its streamed quantiles and then threshold,
    and the running sums of the output pass."""

    def __init__(self, rows: int, settings: Thresholding, numel: int, device: torch.device):
        self.kl = torch.empty(rows, dtype=torch.float64, device=device)
        self.quantiles = settings.quantiles(numel)
        self.threshold = math.nan
        self.selected = 0
        self.taken = 0
        self.full = 0.0  # ‖θ_i − θ_b‖² so far
        self.applied = 0.0  # ‖M ⊙ (θ_i − θ_b)‖² so far


class _Fusion:
    """One tensor's SCF state (``TwoPass``): per-row divergences and exact quantiles in the statistics passes,
    then the running counts of the output pass.

    Blocks come in row order, so a cursor (in elements, back to 0 at each pass's end) says which rows a block
    holds. The first statistics pass computes each block's row divergences and feeds its saliency; later
    passes (while a selection narrows its ranks) feed the saliency again from the kept divergences. The one
    row of a 1-D tensor may come in several pieces (the engine's tiles): the first pass copies them and
    computes the row's divergence at its end, and the saliency is fed from the next pass on.
    """

    def __init__(self, reverse: bool, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        self.reverse, self.epsilon, self.name = reverse, params["epsilon"], info.name
        self.settings = Thresholding.from_params(info.name, params)
        self.averaging = params["multi_expert"] == "mean"
        self.numel = math.prod(shape)
        self.width = shape[-1] if shape else 1
        self.experts: list[_Expert] = []
        self.passes = 0
        self.cursor = 0
        self.pieces: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None  # a 1-D row in pieces
        self.averaged = 0

    @property
    def done(self) -> bool:
        return self.numel == 0 or (self.passes > 0 and all(e.quantiles.done for e in self.experts))

    def _rows(self, call: MethodCall) -> slice:
        """The rows of the whole tensor that ``call``'s tensors hold (the one row of a 1-D tensor)."""
        first = self.cursor // self.width
        return slice(first, first + max(call.base.numel() // self.width, 1))

    def _row_kl(self, expert: _Expert, call: MethodCall) -> torch.Tensor:
        return expert.kl[self._rows(call)].reshape(call.base.shape[:-1] if call.base.dim() > 1 else ())

    def observe(self, call: MethodCall) -> None:
        if self.passes == 0 and self.cursor == 0:
            for i, expert in enumerate(call.experts):
                _check_shape(self.name, i, call.base, expert)
            self.experts = [_Expert(self.numel // self.width, self.settings, self.numel, call.base.device)
                            for _ in call.experts]
            if call.base.dim() <= 1 and call.base.numel() < self.numel:
                self.pieces = []
        if self.pieces is not None:
            self.pieces.append((call.base.clone(), [e.clone() for e in call.experts]))
        else:
            for expert, tensor in zip(self.experts, call.experts):
                if self.passes == 0:
                    expert.kl[self._rows(call)] = row_divergence(call.base, tensor, self.epsilon,
                                                                 self.reverse).reshape(-1)
                if not expert.quantiles.done:
                    expert.quantiles.feed(scores(call.base, tensor, self._row_kl(expert, call)))
        self.cursor += call.base.numel()

    def end_pass(self) -> None:
        self.cursor, self.passes = 0, self.passes + 1
        if self.pieces is not None:
            base = torch.cat([b for b, _ in self.pieces])
            for i, expert in enumerate(self.experts):
                tensor = torch.cat([experts[i] for _, experts in self.pieces])
                expert.kl[:] = row_divergence(base, tensor, self.epsilon, self.reverse)
            self.pieces = None
            return
        for i, expert in enumerate(self.experts):
            if not expert.quantiles.done:
                expert.quantiles.end_pass()
                if expert.quantiles.done:
                    expert.threshold = self.settings.threshold(*expert.quantiles.values)
                    if not math.isfinite(expert.threshold):
                        raise CheckpointError(f"{self.name}: the SCF threshold of expert {i} is not finite (NaN "
                                              "or infinite weights, or an extreme alpha); check the checkpoints "
                                              "and alpha")

    def fuse(self, call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
        """The output pass on one block: Algorithm 1's mask per expert, combined by the ``multi_expert`` rule."""
        base, experts = call.base, call.experts
        if self.numel == 0:
            return base, {}
        several = len(experts) > 1
        choice = torch.zeros(base.shape, dtype=torch.uint8, device=base.device) if several else None  # 0: base
        best = torch.full_like(base, -math.inf) if several else None  # highest passing saliency so far
        averaging = self.averaging and several
        passing = torch.zeros_like(choice) if averaging else None  # how many experts pass, per element
        delta_sum = torch.zeros_like(base) if averaging else None
        merged = base
        for i, (state, expert) in enumerate(zip(self.experts, experts)):
            delta = expert - base
            salient = scores(base, expert, self._row_kl(state, call), delta)
            mask = passes(salient, state.threshold)
            bits = bit_mask(mask, base.dtype)
            selected = int(torch.count_nonzero(mask))
            state.selected += selected
            state.full += float(torch.linalg.vecdot(delta.reshape(-1), delta.reshape(-1)))
            kept = keep_(delta, bits)
            state.applied += float(torch.linalg.vecdot(kept.reshape(-1), kept.reshape(-1)))
            if choice is None:  # one expert: the element is the expert's where it passes
                state.taken += selected
                merged = select(bits, expert, base)
                continue
            candidate = salient.masked_fill_(~mask, -math.inf)
            choice.masked_fill_(candidate > best, i + 1)  # strict: the earlier expert keeps a tie
            torch.maximum(best, candidate, out=best)
            if passing is not None and delta_sum is not None:
                passing += mask
                delta_sum += kept
        for i, (state, expert) in enumerate(zip(self.experts, experts) if choice is not None else ()):
            taken = choice == i + 1
            if passing is not None:
                taken &= passing == 1
            state.taken += int(torch.count_nonzero(taken))
            merged = select(bit_mask(taken, base.dtype), expert, merged)
        if passing is not None and delta_sum is not None:
            averaged = passing >= 2
            self.averaged += int(averaged.sum())
            merged = torch.where(averaged, base + delta_sum / passing.clamp(min=1), merged)
        self.cursor += base.numel()
        return merged, self._stats()

    def _stats(self) -> dict[str, float]:
        """The tensor's statistics over the blocks fused so far (complete after the last block)."""
        stats: dict[str, float] = {}
        n = self.numel
        for i, state in enumerate(self.experts):
            stats[f"threshold_{i}"] = state.threshold
            stats[f"selected_{i}"] = state.selected / n
            stats[f"update_norm_ratio_{i}"] = math.sqrt(state.applied / state.full) if state.full > 0 else 0.0
            stats[f"taken_{i}"] = state.taken / n
        if self.averaging and len(self.experts) > 1:
            stats["averaged"] = self.averaged / n
        stats["from_base"] = (n - sum(s.taken for s in self.experts) - self.averaged) / n
        return stats


def _check_shape(method: str, i: int, base: torch.Tensor, expert: torch.Tensor) -> None:
    if expert.shape != base.shape:
        raise CompatibilityError(f"{method}: expert {i} has shape {tuple(expert.shape)} but the base has "
                                 f"{tuple(base.shape)}; merge only models of the same architecture")


def _two_pass(reverse: bool) -> TwoPass:
    return TwoPass(start=partial(_Fusion, reverse), block=lambda call, state: state.fuse(call))


SCF_RKL = _two_pass(reverse=True)  # Algorithm 1 with the reverse KL ``Σ q log(q/p)`` of base q, secondary p
SCF_KL = _two_pass(reverse=False)  # the forward KL ``Σ p log(p/q)`` (the paper's ablation, Table 10)

SPECS = (
    MethodSpec(name="scf_rkl", fn=SCF_RKL.whole, params=PARAMS, citation=CITATION, max_experts=MAX_EXPERTS,
               two_pass=SCF_RKL, check_params=check_thresholds),
    MethodSpec(name="scf_kl", fn=SCF_KL.whole, params=PARAMS, citation=CITATION + " (forward-KL ablation, Table 10)",
               max_experts=MAX_EXPERTS, two_pass=SCF_KL, check_params=check_thresholds),
    MethodSpec(name="arcee_fusion", fn=SCF_KL.whole, params=(ALPHA, Q_LOW, Q_HIGH, Q_CENTER, EPSILON),
               citation="mergekit's arcee_fusion: " + CITATION + " (forward KL, lower quantiles)",
               max_experts=1, aliases_of="scf_kl", two_pass=SCF_KL, check_params=check_thresholds,
               fixed={"quantile_method": "lower", "multi_expert": "max_saliency"}),
)
