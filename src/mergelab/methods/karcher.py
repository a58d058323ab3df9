"""The Fisher–Rao Karcher mean under the spherical proxy [Wang2026] (sec. 3.3-3.4, eq. 4-5): each tensor
treated as one vector; float32 or float64 in, the same dtype out.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergelab.fisher import FisherSettings
from mergelab.methods.context import ModelContext
from mergelab.methods.spec import MethodCall, MethodSpec, ModelPass, Param, weight_param
from mergelab.methods.weights import normalised_weights, weight_sum_check


def precise_dots(rows: torch.Tensor, vector: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``rows @ vector`` for an (N, d) stack, accumulated in float64 chunk by chunk.

    A float32 dot product over millions of entries is off by around 1e-5, which would put a floor under the
    Karcher residual above its tolerance; chunks keep the float64 copies small.
    """
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, vector.numel(), chunk):
        total += rows[:, start : start + chunk].double() @ vector[start : start + chunk].double()
    return total


def precise_norms(rows: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Euclidean norm of each row of an (N, d) stack, accumulated in float64 (see ``precise_dots``)."""
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], chunk):
        total += rows[:, start : start + chunk].double().square().sum(dim=1)
    return total.sqrt()


def sphere_log(point: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i Log_x(y_i)`` on the unit sphere, with ``Log_x(y) = θ / sin θ · (y − cos θ · x)`` and
    ``θ = arccos⟨x, y⟩`` (the tangent field of [Wang2026] eq. 5).

    ``point`` is a unit vector of length d, ``targets`` an (N, d) stack of unit vectors.
    """
    cosines = precise_dots(targets, point).clamp(-1.0, 1.0).to(targets.dtype)
    angles = torch.arccos(cosines)
    sines = torch.sin(angles)
    factors = torch.where(sines > 1e-12, angles / sines.clamp_min(1e-12), torch.ones_like(angles))
    coefficients = weights * factors
    return coefficients @ targets - (coefficients @ cosines) * point


def sphere_exp(point: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``Exp_x(v) = cos‖v‖ · x + sin‖v‖ · v / ‖v‖`` on the unit sphere, renormalised against rounding."""
    length = torch.linalg.vector_norm(tangent)
    if length == 0:
        return point
    moved = torch.cos(length) * point + torch.sin(length) * (tangent / length)
    return moved / precise_norms(moved[None]).to(moved.dtype)


def karcher_direction(units: torch.Tensor, weights: torch.Tensor, step_size: float, max_iter: int,
                      tol: float) -> tuple[torch.Tensor, int, float]:
    """Weighted Karcher mean of the (N, d) unit vectors ``units`` by the fixed-point iteration of eq. 5:
    ``v = Σ α_i Log_θ(θ_i)``, ``θ ← Exp_θ(η v)``, until ``‖v‖ < tol`` or ``max_iter`` steps.

    It starts at the normalised weighted extrinsic mean (at the heaviest input if that vanishes) and returns
    the mean, the number of steps taken and ``‖v‖`` at the returned point (the first-order condition, eq. 4).
    """
    start = weights @ units
    start_norm = precise_norms(start[None]).to(units.dtype)
    mean = start / start_norm if start_norm > 0 else units[int(torch.argmax(weights))]
    steps = 0
    while True:
        tangent = sphere_log(mean, units, weights)
        residual = float(torch.linalg.vector_norm(tangent))
        if residual < tol or steps == max_iter:
            return mean, steps, residual
        mean = sphere_exp(mean, step_size * tangent)
        steps += 1


def karcher(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """Fisher–Rao Karcher merge under the spherical proxy ([Wang2026], sec. 3.3-3.4).

    Each model's tensor is normalised to the unit sphere; the weighted Karcher mean of the directions
    (weights normalised to sum 1) is found by ``karcher_direction``; the result is rescaled by the weighted
    mean norm of the sources (norm preservation, sec. 3.4). A tensor of norm zero has no direction: it takes
    no part in the mean (the others' weights are renormalised) but still counts in the norm. With two models
    of equal weight this is SLERP at t = 0.5 between the two directions (sec. 3.3).

    Unlike mergekit's ``karcher``, per-model ``weight`` is honoured (mergekit always uses equal weights).

    ``fisher_precondition: diagonal`` is our reading of sec. 3.4: the sphere is taken under the diagonal metric
    ``⟨a, b⟩_F = Σ f a b`` with ``f`` the random-token diagonal Fisher of the reference model (``fisher.py``,
    computed by this method's ``prepare`` pass): coordinates are scaled by ``√(f + 10⁻⁸ mean f)`` before
    normalising, the Karcher mean is found there, scaled back and renormalised, then given the weighted mean
    norm of the (unscaled) sources. Tensors without Fisher information keep the plain spherical path.
    """
    p = call.params
    weights = normalised_weights(call, "karcher")
    vectors = torch.stack([e.reshape(-1) for e in call.experts])
    norms = precise_norms(vectors).to(vectors.dtype)
    metric = fisher_metric(call)
    if metric is not None:
        vectors = vectors * metric
    scale = weights @ norms
    has_direction = norms > 0
    direction_weights = weights[has_direction]
    if direction_weights.sum() == 0:  # every model with weight is all zeros
        return torch.zeros_like(call.experts[0]), {"karcher_iterations": 0.0, "karcher_residual": 0.0,
                                                   "karcher_converged": 1.0}
    lengths = norms if metric is None else precise_norms(vectors).to(vectors.dtype)
    units = vectors.div_(torch.where(has_direction, lengths, torch.ones_like(lengths))[:, None])  # in place
    if not has_direction.all():
        units = units[has_direction]
    mean, steps, residual = karcher_direction(units, direction_weights / direction_weights.sum(),
                                              p["step_size"], p["max_iter"], p["tol"])
    stats = {"karcher_iterations": float(steps), "karcher_residual": residual,
             "karcher_converged": float(residual < p["tol"])}
    if metric is not None:
        mean = mean / metric
        mean = mean / precise_norms(mean[None]).to(mean.dtype)
    return (scale * mean).reshape(call.experts[0].shape), stats


def fisher_metric(call: MethodCall) -> torch.Tensor | None:
    """``√(f + 10⁻⁸ mean f)`` flattened, from the Fisher the prepare pass attached, or None (plain sphere)."""
    fisher = call.extras.get("fisher")
    if call.params["fisher_precondition"] != "diagonal" or fisher is None or not bool((fisher > 0).any()):
        return None
    fisher = fisher.to(call.experts[0].device, call.experts[0].dtype).reshape(-1)
    return (fisher + 1e-8 * fisher.mean()).sqrt()


def karcher_prepare(context: ModelContext) -> ModelPass:
    """Compute the reference model's diagonal Fisher when ``fisher_precondition: diagonal`` asks for it."""
    if context.shared_params.get("fisher_precondition") != "diagonal":
        return ModelPass()
    fisher = context.fisher(context.reference, FisherSettings())
    extras = {job.name: {"fisher": fisher.elements[job.name]} for job in context.tensors
              if job.name in fisher.elements}
    return ModelPass(extras=extras, record={"fisher_seconds": fisher.seconds, "fisher_model": context.reference,
                                            "tensors_preconditioned": len(extras)})


SPECS = (
    MethodSpec(
        name="karcher",
        fn=karcher,
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
        check_params=weight_sum_check("karcher"),
    ),
)
