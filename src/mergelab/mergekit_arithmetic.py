"""mergekit 0.1.5's formulas for the methods both tools have, computed in the working dtype (the ``ARITHMETIC``
table that ``mergekit_compat.compat_spec`` runs under ``--compat mergekit``; see that module's doc for what each
reproduces). Each function takes the inputs already cast to the working dtype and the tensor's ``MethodCall``."""

from __future__ import annotations

from functools import partial

import torch

from mergelab.errors import RecipeError
from mergelab.mergekit_task_vectors import task_family
from mergelab.methods.nuslerp import NORM_FLOOR, position
from mergelab.methods.spec import MethodCall

NUSLERP_COLINEAR_EPS = 1e-8  # mergekit's nuslerp: linear where 1 − cos² θ ≤ eps²


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """``Σ_i w_i θ_i`` (``/ Σ_i w_i``) accumulated in float32, rounded to the working dtype."""
    acc = _accumulation(experts[0].dtype)
    weights = torch.tensor(call.params["weight"], dtype=acc)
    result = torch.zeros_like(experts[0], dtype=acc)
    for tensor, weight in zip(experts, weights):
        result.addcmul_(tensor, weight)
    if call.params["normalize"]:
        result.div_(weights.sum())
    return result.to(experts[0].dtype)


def slerp(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """Whole-tensor SLERP from the base (t = 0), accumulated in float32 per 2^20-element chunk, linear where
    ``|cos θ| > 0.9995``."""
    t, chunk = call.params["t"], 1 << 20
    acc = _accumulation(base.dtype)
    a, b = base.reshape(1, -1), experts[0].reshape(1, -1)
    starts = range(0, a.shape[1], chunk)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s: s + chunk].to(acc), dim=1,
                                                                            keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s: s + chunk].to(acc), dim=1,
                                                                            keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = torch.stack([((a[:, s: s + chunk].to(acc) / norm_a) * (b[:, s: s + chunk].to(acc) / norm_b))
                       .sum(dim=1, keepdim=True) for s in starts]).sum(dim=0).clamp(-1, 1)
    straight = dot.abs() > 0.9995
    theta = torch.acos(torch.where(straight, 0, dot))
    t_tensor = torch.tensor([[t]], dtype=acc)
    coef_a = torch.where(straight, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / torch.sin(theta))
    coef_b = torch.where(straight, t_tensor, torch.sin(t_tensor * theta) / torch.sin(theta))
    out = torch.empty_like(a)
    for s in starts:
        out[:, s: s + chunk] = coef_a * a[:, s: s + chunk].to(acc) + coef_b * b[:, s: s + chunk].to(acc)
    return out.reshape(base.shape)


def slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's NuSLERP of each pair of vectors along the last dimension of ``a`` and ``b``, in their dtype: unit
    vectors ``u / max(‖u‖, 1e-7)``, ``cos θ`` their clamped inner product,
    ``(sin((1 − t) θ) a + sin(t θ) b) / sin θ``, linear where ``1 − cos² θ ≤ 1e-16``."""
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos_theta = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


def nuslerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """mergekit's SLERP of two tensors over the vectors the flags choose: all of it, rows, or (``row_wise``)
    columns."""
    if flatten:
        return slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise and a.dim() > 1:
        return slerp_vectors(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    return slerp_vectors(t, a, b)


def nuslerp(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """NuSLERP as mergekit computes it, in the working dtype, about the base when there is one."""
    p = call.params
    t, (first, second) = position(p["weight"]), experts
    if base is None:
        return nuslerp_tensors(t, first, second, p["nuslerp_row_wise"], p["nuslerp_flatten"])
    return base + nuslerp_tensors(t, first - base, second - base, p["nuslerp_row_wise"], p["nuslerp_flatten"])


def multislerp(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """Multi-SLERP as mergekit computes it: tangent-space mean at the normalised weighted mean direction."""
    p = call.params
    if len(experts) == 1:
        return experts[0]
    stacked = torch.stack(experts)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(p["weight"], dtype=stacked.dtype)
    if p["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + p["eps"])
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < p["eps"]:
        if stacked.shape[0] != 2:
            raise RecipeError(f"{call.info.name}: the weighted directions of the models cancel out, so multislerp "
                              "has no mean; change the weights")
        merged = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return merged if base is None else merged + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + p["eps"]
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """Equal-weight Karcher mean on the sphere, mergekit's iteration (directions in the working dtype, norms and
    stopping tests in float32), scaled by the mean norm."""
    max_iter, tol = call.params["max_iter"], call.params["tol"]
    tensors = experts
    if len(tensors) == 1:
        return tensors[0]
    acc = _accumulation(tensors[0].dtype)
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t.to(acc)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    directions = [units[i] for i in valid]
    mean = torch.zeros_like(directions[0])
    for alpha, unit in zip(weights, directions):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(acc))
    mean = directions[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, directions):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        length = torch.linalg.vector_norm(tangent.to(acc))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(acc))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def model_stock(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """Model Stock with mergekit's cosine (``⟨a, b⟩ / max(‖a‖‖b‖, 1e-6)``), in the working dtype."""
    shape = base.shape
    if call.params["filter_wise"]:
        w0, ws = (base[None], [e[None] for e in experts]) if base.dim() == 1 else (base, experts)
    else:
        w0, ws = base.reshape(-1), [e.reshape(-1) for e in experts]
    offsets = [w - w0 for w in ws]
    cosines = [((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def sce(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """SCE as mergekit computes it: variance top-k by ``torch.topk``, weights from the selected task vectors
    (equal below a 1e-6 total), sign election, divisor clamped at 1e-6."""
    vectors = torch.stack([e - base for e in experts])
    fraction = call.params["select_topk"]
    if fraction < 1:
        variance = torch.var(vectors, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * fraction)
        mask = torch.zeros_like(variance)
        if k > 0:
            mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
        vectors = vectors * mask.unsqueeze(0)
    majority = (vectors.sum(dim=0) >= 0).to(vectors.dtype) * 2 - 1
    erase = vectors.sign() == majority
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim())) * erase
    return base + (vectors * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def arcee_fusion(base: torch.Tensor | None, experts: list[torch.Tensor], call: MethodCall) -> torch.Tensor:
    """Forward-KL saliency in the working dtype, threshold ``Q2 + 1.5 (Q3 − Q1)`` from sorted-index quantiles,
    a float32 mask (so a float32 result)."""
    expert = experts[0]
    p = torch.softmax(expert, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    saliency = (expert - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = saliency.reshape(-1)
    if flat.numel() > 1_000_000:  # mergekit samples with replacement here (at random)
        flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=call.generator)]
    ordered = torch.sort(flat).values
    low, mid, high = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (saliency >= mid + 1.5 * (high - low)).float()
    return base + (expert - base) * mask


ARITHMETIC = {
    "linear": linear, "slerp": slerp, "nuslerp": nuslerp, "multislerp": multislerp, "karcher": karcher,
    "model_stock": model_stock, "sce": sce, "arcee_fusion": arcee_fusion,
    **{name: partial(task_family, method=name) for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties",
                                                            "della", "della_linear", "breadcrumbs",
                                                            "breadcrumbs_ties")},
}
