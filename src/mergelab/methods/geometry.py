"""Geometric merges: the spherical Karcher mean, SLERP, Multi-SLERP and Model Stock.

Every method here treats one whole tensor as one vector (``filter_wise`` Model Stock treats each output row as
one). Inputs are float32 or float64 and the result comes back in the same dtype.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, ModelPass, Param, weight_param

# SLERP falls back to linear interpolation when the two directions are this close to (anti)parallel, where
# sin θ → 0 makes the spherical coefficients ill-conditioned (the threshold mergekit uses).
SLERP_DOT_THRESHOLD = 0.9995
# Model Stock keeps the base where |1 + (N − 1) cos θ| falls below this (no finite interpolation factor).
MODEL_STOCK_GUARD = 1e-6


def normalised_weights(call: MethodCall, method: str) -> torch.Tensor:
    """The per-model ``weight`` values divided by their sum, as a tensor on the experts' device.

    Raises RecipeError when the weights sum to zero, since they cannot then be normalised.
    """
    first = call.experts[0]
    weights = torch.tensor(call.params["weight"], dtype=first.dtype, device=first.device)
    total = weights.sum()
    if total.abs() < 1e-12:
        raise RecipeError(f"{call.info.name}: the {method} weights sum to zero, so they cannot be "
                          "normalised; give the models weights with a non-zero sum")
    return weights / total


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
    ``θ = arccos⟨x, y⟩`` (the tangent field of eq. 5 of the Fisher–Rao Karcher paper).

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
    """Fisher–Rao Karcher merge under the spherical proxy (Wang et al. 2026, sec. 3.3-3.4).

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
    fisher = call.params.get("fisher")
    if call.params["fisher_precondition"] != "diagonal" or fisher is None or not bool((fisher > 0).any()):
        return None
    fisher = fisher.to(call.experts[0].device, call.experts[0].dtype).reshape(-1)
    return (fisher + 1e-8 * fisher.mean()).sqrt()


def karcher_prepare(plan, options) -> ModelPass:
    """Compute the reference model's diagonal Fisher when ``fisher_precondition: diagonal`` asks for it."""
    if not plan.jobs or plan.jobs[0].params.get("fisher_precondition") != "diagonal":
        return ModelPass()
    from mergelab.fisher import FisherSettings, diagonal_fisher

    fisher = diagonal_fisher(plan.readers[plan.reference], FisherSettings(), options.device)
    params = {job.name: {"fisher": fisher.elements[job.name]} for job in plan.jobs if job.name in fisher.elements}
    return ModelPass(params=params, record={"fisher_seconds": fisher.seconds, "fisher_model": plan.reference,
                                            "tensors_preconditioned": len(params)})


def slerp(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """Spherical linear interpolation from the base (t = 0) to the one other model (t = 1) (Shoemake 1985):
    ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with θ the angle between the two whole tensors.

    Falls back to ``(1 − t) a + t b`` when ``|cos θ| > 0.9995`` (as mergekit does) and, unlike mergekit, also
    when either tensor is all zeros, where the angle is undefined.
    """
    t = call.params["t"]
    a, b = call.base, call.experts[0]
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * a + t * b, {"slerp_linear": 1.0}
    cos_theta = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1.0, 1.0))
    if abs(cos_theta) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b, {"slerp_angle": math.acos(cos_theta), "slerp_linear": 1.0}
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    merged = (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b
    return merged, {"slerp_angle": theta, "slerp_linear": 0.0}


def multislerp(call: MethodCall) -> torch.Tensor:
    """Multi-SLERP, barycentric interpolation on the sphere (Goddard 2025, as defined by mergekit).

    The published procedure projects the (task) vectors' directions ``u_i = x_i / (‖x_i‖ + eps)`` onto the
    tangent space at their normalised weighted mean ``m = M / ‖M‖``, ``M = Σ w_i u_i``, averages there and
    maps back with the exponential map. That tangent average is identically zero
    (``Σ w_i (u_i − ⟨u_i, m⟩ m) = M − ‖M‖ m = 0``), so the result is exactly ``m`` scaled by the weighted mean
    norm ``Σ w_i ‖x_i‖``, which is what is computed here. With a base the ``x_i`` are task vectors and the
    base is added back. Two models whose weighted directions cancel fall back to ``Σ w_i x_i``; more than two
    raise RecipeError. When every task vector is zero (experts equal to the base on this tensor, for example
    frozen embeddings) the result is the base.
    """
    p = call.params
    base = call.base
    if len(call.experts) == 1:
        return call.experts[0]
    if p["normalize_weights"]:
        weights = normalised_weights(call, "multislerp")
    else:
        weights = torch.tensor(p["weight"], dtype=call.experts[0].dtype, device=call.experts[0].device)
    vectors = torch.stack([(e if base is None else e - base).reshape(-1) for e in call.experts])
    norms = torch.linalg.vector_norm(vectors, dim=1)
    units = vectors / (norms + p["eps"])[:, None]
    mean = weights @ units
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < p["eps"]:  # antipodal directions, or nothing moved (every task vector is zero)
        if len(call.experts) != 2 and bool((norms > 0).any()):
            raise RecipeError(f"{call.info.name}: the weighted directions of the models cancel out "
                              "(antipodal tensors with balancing weights), so multislerp has no mean; "
                              "change the weights")
        merged = weights @ vectors
    else:
        merged = (weights @ norms) * (mean / mean_norm)
    merged = merged.reshape(call.experts[0].shape)
    return merged if base is None else merged + base


def model_stock(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """Model Stock (Jang et al. 2024; in-the-wild study eq. 4): ``θ = t · mean_i θ_i + (1 − t) θ_0`` with
    ``t = N cos θ / (1 + (N − 1) cos θ)`` and ``cos θ`` the mean pairwise cosine of the task vectors
    ``θ_i − θ_0``, per tensor or, with ``filter_wise``, per output row of a matrix (a 1-D tensor is one row).

    Where ``|1 + (N − 1) cos θ| < 1e-6`` there is no finite ``t`` and the base is kept (t = 0). A task vector
    of norm zero has cosine 0 with every other (mergekit instead divides by ``max(‖a‖‖b‖, 1e-6)``, which
    shrinks the cosine of very small task vectors).
    """
    base = call.base
    by_row = call.params["filter_wise"] and base.dim() >= 2
    rows = base.reshape(base.shape[0], -1) if by_row else base.reshape(1, -1)
    deltas = torch.stack([e.reshape(rows.shape) - rows for e in call.experts])  # (N, R, C)
    n = deltas.shape[0]
    norms = torch.linalg.vector_norm(deltas, dim=2, keepdim=True)  # (N, R, 1)
    units = deltas / torch.where(norms > 0, norms, torch.ones_like(norms))
    gram = torch.einsum("irc,jrc->rij", units, units)  # (R, N, N)
    pairs = torch.triu_indices(n, n, offset=1)
    cos_theta = gram[:, pairs[0], pairs[1]].clamp(-1.0, 1.0).mean(dim=1)  # (R,)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < MODEL_STOCK_GUARD
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    merged = rows + t[:, None] * deltas.mean(dim=0)
    stats = {"model_stock_t": float(t.mean()), "model_stock_cos": float(cos_theta.mean()),
             "model_stock_guarded": float(singular.float().mean())}
    return merged.reshape(base.shape), stats



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
    ),
    MethodSpec(
        name="slerp",
        fn=slerp,
        params=(Param("t", float, required=True, low=0.0, high=1.0,
                      help="interpolation position: 0 gives the base, 1 the other model"),),
        citation="Shoemake 1985, Animating rotation with quaternion curves",
        base="required",
        min_experts=1,
        max_experts=1,
    ),
    MethodSpec(
        name="multislerp",
        fn=multislerp,
        params=(
            weight_param(),
            Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
            Param("eps", float, default=1e-8, low=0.0, help="small constant that keeps divisions finite"),
        ),
        citation="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
        base="optional",
        min_experts=1,
    ),
    MethodSpec(
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", bool, default=False, help="one interpolation factor per output row"),),
        citation="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models",
        base="required",
        min_experts=2,
    ),
)
