"""Model Stock [Jang2024]: per tensor (or per output row with ``filter_wise``)."""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param

# Model Stock keeps the base where |1 + (N − 1) cos θ| falls below this (no finite interpolation factor).
MODEL_STOCK_GUARD = 1e-6


def model_stock(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """Model Stock ([Jang2024]; [InTheWild] eq. 4): ``θ = t · mean_i θ_i + (1 − t) θ_0`` with
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
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", bool, default=False, help="one interpolation factor per output row"),),
        citation="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models",
        base="required",
        min_experts=2,
    ),
)
