"""The Fisher–Rao Karcher mean under the spherical proxy [Wang2026] (sec. 3.3-3.4, eq. 4-5): each tensor
treated as one vector; float32 or float64 in, the same dtype out.

The fixed-point mean stays in the span of the unit inputs ``u_i``: a point ``x = Σ β_i u_i`` has cosines
``⟨u_i, x⟩ = (K β)_i``, eq. 5's tangent ``Σ α_i Log_x(u_i)`` is again such a combination and the exponential map
mixes ``x`` with it. So the iteration runs on coefficient vectors and the N x N Gram matrix ``K`` of the unit
inputs alone (in the Fisher metric with ``fisher_precondition: diagonal``), which one statistics pass
accumulates over row blocks (``methods.gram``); the output pass is the linear combination ``Σ κ_i θ_i``,
elementwise, so the method streams like TIES, and any block size gives the bits of the whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from mergelab.fisher import FisherSettings
from mergelab.methods.context import ModelContext
from mergelab.methods.gram import GramPass, gram_two_pass, linear_combination
from mergelab.methods.spec import MethodCall, MethodSpec, ModelPass, Param, weight_param
from mergelab.methods.weights import normalised_values, weight_sum_check
from mergelab.ops.l1_norm import L1Norm
from mergelab.ops.row_gram import RowGram


def _norm(beta: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖Σ β_i u_i‖ = √(βᵀ K β)``."""
    return math.sqrt(max(float(beta @ gram @ beta), 0.0))


def karcher_coefficients(gram: torch.Tensor, weights: torch.Tensor, step_size: float, max_iter: int,
                         tol: float) -> tuple[torch.Tensor, int, float]:
    """Weighted Karcher mean of N unit vectors with Gram matrix ``gram`` (float64), as the coefficients ``β`` of
    the mean ``x = Σ β_i u_i``, by the fixed-point iteration of eq. 5: ``v = Σ α_i Log_x(u_i)``,
    ``x ← Exp_x(η v)``, until ``‖v‖ < tol`` or ``max_iter`` steps.

    On the sphere ``Log_x(u) = θ / sin θ · (u − cos θ · x)`` with ``cos θ = ⟨u, x⟩`` (the tangent field of
    eq. 5) and ``Exp_x(v) = cos‖v‖ · x + sin‖v‖ · v / ‖v‖``, renormalised against rounding; in coefficients,
    ``v = c − (c · cos) β`` with ``c_i = α_i θ_i / sin θ_i``, and ``‖v‖² = vᵀ K v``. It starts at the
    normalised weighted extrinsic mean (at the heaviest input if that vanishes) and returns ``β``, the number
    of steps taken and ``‖v‖`` at the returned point (the first-order condition, eq. 4).
    """
    start_norm = _norm(weights, gram)
    beta = weights / start_norm if start_norm > 0 else torch.eye(len(weights), dtype=torch.float64)[
        int(torch.argmax(weights))]
    steps = 0
    while True:
        cosines = (gram @ beta).clamp(-1.0, 1.0)
        angles = torch.arccos(cosines)
        sines = torch.sin(angles)
        coefficients = weights * torch.where(sines > 1e-12, angles / sines.clamp_min(1e-12), torch.ones_like(angles))
        tangent = coefficients - (coefficients @ cosines) * beta
        residual = _norm(tangent, gram)
        if residual < tol or steps == max_iter:
            return beta, steps, residual
        length = step_size * residual
        moved = math.cos(length) * beta + (math.sin(length) * step_size / length) * tangent
        beta = moved / _norm(moved, gram)
        steps += 1


class _Karcher(GramPass):
    """Fisher–Rao Karcher merge under the spherical proxy ([Wang2026], sec. 3.3-3.4).

    Each model's tensor is normalised to the unit sphere; the weighted Karcher mean of the directions
    (weights normalised to sum 1) is found by ``karcher_coefficients``; the result is rescaled by the weighted
    mean norm of the sources (norm preservation, sec. 3.4). A tensor of norm zero has no direction: it takes
    no part in the mean (the others' weights are renormalised) but still counts in the norm. With two models
    of equal weight this is SLERP at t = 0.5 between the two directions (sec. 3.3).

    Unlike mergekit's ``karcher``, per-model ``weight`` is honoured (mergekit always uses equal weights).

    ``fisher_precondition: diagonal`` is our reading of sec. 3.4: the sphere is taken under the diagonal metric
    ``⟨a, b⟩_F = Σ f a b`` with ``f`` the random-token diagonal Fisher of the reference model (``fisher.py``,
    computed by this method's ``prepare`` pass): coordinates are scaled by ``√(f + 10⁻⁸ mean f)`` before
    normalising (a second Gram matrix, of the scaled tensors), the Karcher mean is found there, scaled back and
    renormalised, then given the weighted mean norm of the (unscaled) sources: scaled back, the mean is
    ``Σ (β_i / ‖θ_i‖_F) θ_i``, whose plain norm comes from the plain Gram matrix. Tensors without Fisher
    information keep the plain spherical path.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.fisher_gram: RowGram | None = None
        self.fisher_mean: torch.Tensor | bool | None = None  # False: the plain sphere
        self.fisher_row = 0

    def vectors(self, call: MethodCall) -> list[torch.Tensor]:
        return call.experts

    def observe(self, call: MethodCall) -> None:
        metric = self._metric(call)
        if metric is not None:
            scaled = [expert * metric for expert in call.experts]
            if self.fisher_gram is None:
                self.fisher_gram = RowGram(len(scaled), self.shape, metric.device)
            self.fisher_gram.add(scaled)
        super().observe(call)

    def _metric(self, call: MethodCall) -> torch.Tensor | None:
        """``√(f + 10⁻⁸ mean f)`` on the block's rows, from the Fisher the prepare pass attached, or None (plain
        sphere). ``mean f`` is exact (``L1Norm``: the Fisher is non-negative), so the same in any blocks."""
        first, fisher = call.experts[0], call.extras.get("fisher")
        if self.fisher_mean is None:  # the first block: decide once for the tensor
            if self.params["fisher_precondition"] != "diagonal" or fisher is None or not bool((fisher > 0).any()):
                self.fisher_mean = False
            else:
                total = L1Norm()
                total.add(fisher if fisher.dtype == torch.float64 else fisher.float())
                self.fisher_mean = torch.tensor(total.value / fisher.numel(), dtype=first.dtype, device=first.device)
        if self.fisher_mean is False:
            return None
        rows = first.shape[0] if first.dim() else 1
        block = fisher.reshape(self.shape)[self.fisher_row : self.fisher_row + rows] if first.dim() else fisher
        self.fisher_row += rows
        return (block.to(first.device, first.dtype) + 1e-8 * self.fisher_mean).sqrt()

    def solve(self, gram: RowGram) -> None:
        p = self.params
        weights = torch.tensor(normalised_values(p["weight"], self.name, "karcher"), dtype=torch.float64)
        plain = gram.total()
        norms = plain.diagonal().sqrt()
        scale = math.fsum((weights * norms).tolist())
        has_direction = norms > 0
        direction_weights = weights[has_direction]
        self.coefficients = None
        if direction_weights.sum() == 0:  # every model with weight is all zeros
            self.stats = {"karcher_iterations": 0.0, "karcher_residual": 0.0, "karcher_converged": 1.0}
            return
        metric = plain if self.fisher_gram is None else self.fisher_gram.total()
        lengths = metric.diagonal().sqrt()[has_direction]
        units = metric[has_direction][:, has_direction] / lengths[:, None] / lengths[None, :]
        beta, steps, residual = karcher_coefficients(units, direction_weights / direction_weights.sum(),
                                                     p["step_size"], p["max_iter"], p["tol"])
        self.stats = {"karcher_iterations": float(steps), "karcher_residual": residual,
                      "karcher_converged": float(residual < p["tol"])}
        on_inputs = torch.zeros_like(weights)  # the mean's coefficients on the (unscaled) tensors
        on_inputs[has_direction] = beta / lengths
        if self.fisher_gram is not None:
            on_inputs /= _norm(on_inputs, plain)
        self.coefficients = (scale * on_inputs).tolist()

    def merge(self, call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
        if self.coefficients is None:
            return torch.zeros_like(call.experts[0]), self.stats
        return linear_combination(call.experts, self.coefficients), self.stats


KARCHER = gram_two_pass(_Karcher)


def karcher_prepare(context: ModelContext) -> ModelPass:
    """Compute the reference model's diagonal Fisher when ``fisher_precondition: diagonal`` asks for it."""
    if context.shared_params.get("fisher_precondition") != "diagonal":
        return ModelPass()
    fisher = context.fisher(context.reference, FisherSettings())
    stored = fisher.names()
    extras = {job.name: {"fisher": fisher.stored(job.name)} for job in context.tensors if job.name in stored}
    return ModelPass(extras=extras, record={"fisher_seconds": fisher.seconds, "fisher_model": context.reference,
                                            "tensors_preconditioned": len(extras)})


SPECS = (
    MethodSpec(
        name="karcher",
        fn=KARCHER.whole,
        params=(
            replace(weight_param(), low=0.0, help="mixing weight α_i ≥ 0 (normalised to sum 1)"),
            Param("step_size", float, default=1.0, low=0.0, high=1.0, low_open=True,
                  help="fixed-point step η in (0, 1] (eq. 5)"),
            Param("max_iter", int, default=10, low=0, help="most fixed-point steps"),
            Param("tol", float, default=1e-5, low=0.0, low_open=True,
                  help="stop when ‖Σ α_i Log(θ_i)‖ falls below this (eq. 4)"),
            Param("fisher_precondition", str, default="none", choices=("none", "diagonal"),
                  help="diagonal: Karcher mean under the random-token diagonal Fisher metric (sec. 3.4)"),
        ),
        citation="Wang, Ye & Yin 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold",
        base="ignored",
        min_experts=2,
        prepare=karcher_prepare,
        fisher_of=lambda params: "reference" if params.get("fisher_precondition") == "diagonal" else None,
        check_params=weight_sum_check("karcher"),
        two_pass=KARCHER,
    ),
)
