"""SCE: Select, Calculate, Erase ([Wan2024] FuseChat, sec. 3.3), for task vectors ``δ_i = θ_i − θ_0``.

1. Select: keep the ``select_topk`` fraction of entries (of those whose variance is not zero) with the largest
   variance across the models' task vectors.
2. Calculate: model weights ``η_i = mean(δ_i²) / Σ_j mean(δ_j²)`` on the selected entries (equal weights if
   every selected entry is zero).
3. Erase: elect each entry's sign from the summed task vectors, drop entries of the other sign, and take the
   ``η``-weighted mean of what is left: ``θ = θ_0 + Σ_i η_i m_i δ_i / Σ_i η_i m_i``.

``variant: mergekit`` (default) is mergekit's ``sce``: the selection mask also zeroes the task vectors, so
sign election and the mean use only selected entries. ``variant: fusechat`` is the FuseChat authors' released
code: the selection only decides the weights, and election and the mean use the full task vectors.

Deliberate difference from mergekit: mergekit falls back to equal weights when ``Σ_j mean(δ_j²) < 1e-6``,
which real fine-tunes (|δ| around 1e-3) can fall under; here the fallback is only for an exact zero.
"""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param
from mergelab.methods.task_arithmetic import INT8_MASK
from mergelab.ops.consensus import disjoint_sum, elect_sign


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``floor(fraction · n)`` entries with the largest variance across the stacked
    ``deltas`` (population variance over dim 0), n counting entries of non-zero variance (SCE "select").

    The threshold comes from ``kthvalue`` (linear time) rather than a sort; entries tied at the threshold are
    taken in position order, so the mask is deterministic and equals a stable descending sort's.
    """
    if fraction >= 1.0:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    mean = deltas.sum(dim=0) / deltas.shape[0]
    variance = (sum((d - mean).square() for d in deltas) / deltas.shape[0]).reshape(-1)
    keep = int(fraction * int(torch.count_nonzero(variance)))
    if keep == 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    threshold = torch.kthvalue(variance, variance.numel() - keep + 1).values
    above = variance > threshold
    tied = variance == threshold
    mask = above | (tied & (torch.cumsum(tied, dim=0) <= keep - above.sum()))
    return mask.reshape(deltas.shape[1:])


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """SCE "calculate": each model's mean squared task-vector entry over their sum (equal if all zero)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    energy = torch.linalg.vector_norm(flat, dim=1).square() / flat.shape[1]
    total = energy.sum()
    if total == 0:
        return torch.full_like(energy, 1.0 / energy.numel())
    return energy / total


def sce(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """SCE merge of one tensor (see the module docstring for the steps and the two variants)."""
    deltas = torch.stack([e - call.base for e in call.experts])
    selected = variance_mask(deltas, call.params["select_topk"])
    selected_deltas = deltas * selected
    weights = sce_weights(selected_deltas)
    merged_from = selected_deltas if call.params["variant"] == "mergekit" else deltas
    update = disjoint_sum(merged_from, weights, elect_sign(merged_from, "sum"), normalize=True)
    stats = {"sce_selected_fraction": float(selected.float().mean())}
    stats.update({f"sce_weight_{i}": float(w) for i, w in enumerate(weights)})
    return call.base + update, stats


SPECS = (
    MethodSpec(
        name="sce",
        fn=sce,
        params=(
            Param("select_topk", float, default=1.0, low=0.0, high=1.0,
                  help="fraction of entries, by variance across models, that decide the weights"),
            Param("variant", str, default="mergekit", choices=("mergekit", "fusechat"),
                  help="mergekit: selection also masks the task vectors; fusechat: it only sets the weights"),
            INT8_MASK,
        ),
        citation="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging)",
        base="required",
        min_experts=1,
    ),
)
