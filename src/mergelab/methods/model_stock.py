"""Model Stock [Jang2024]: per tensor (or per output row with ``filter_wise``), streamed in row blocks: the
cosines come from the task vectors' Gram matrix (``methods.gram``), the output is elementwise."""

from __future__ import annotations

import torch

from mergelab.methods.gram import GramPass, gram_two_pass
from mergelab.methods.spec import MethodCall, MethodSpec, Param
from mergelab.ops.row_gram import RowGram

# Model Stock keeps the base where |1 + (N − 1) cos θ| falls below this (no finite interpolation factor).
MODEL_STOCK_GUARD = 1e-6


class _ModelStock(GramPass):
    """Model Stock ([Jang2024]; [InTheWild] eq. 4): ``θ = t · mean_i θ_i + (1 − t) θ_0``, computed as
    ``θ_0 + t · mean_i (θ_i − θ_0)``, with ``t = N cos θ / (1 + (N − 1) cos θ)`` and ``cos θ`` the mean pairwise
    cosine ``G_ij / √(G_ii G_jj)`` of the task vectors ``θ_i − θ_0`` (their Gram matrix ``G``, float64), per
    tensor or, with ``filter_wise``, per output row of a matrix (a 1-D tensor is one row).

    Where ``|1 + (N − 1) cos θ| < 1e-6`` there is no finite ``t`` and the base is kept (t = 0). A task vector
    of norm zero has cosine 0 with every other (mergekit instead divides by ``max(‖a‖‖b‖, 1e-6)``, which
    shrinks the cosine of very small task vectors).
    """

    def vectors(self, call: MethodCall) -> list[torch.Tensor]:
        return [expert - call.base for expert in call.experts]

    def solve(self, gram: RowGram) -> None:
        self.by_row = self.params["filter_wise"] and len(self.shape) >= 2
        g = gram.per_row() if self.by_row else gram.total()[None]  # (R, N, N)
        n = g.shape[-1]
        norms = g.diagonal(dim1=-2, dim2=-1).sqrt()  # (R, N)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero task vector's row of G is 0
        cosines = g / norms[:, :, None] / norms[:, None, :]
        pairs = torch.triu_indices(n, n, offset=1)
        cos_theta = cosines[:, pairs[0], pairs[1]].clamp(-1.0, 1.0).mean(dim=1)  # (R,)
        denominator = 1 + (n - 1) * cos_theta
        singular = denominator.abs() < MODEL_STOCK_GUARD
        self.t = torch.where(singular, torch.zeros_like(cos_theta),
                             n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
        self.stats = {"model_stock_t": float(self.t.mean()), "model_stock_cos": float(cos_theta.mean()),
                      "model_stock_guarded": float(singular.double().mean())}

    def merge(self, call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
        deltas = self.vectors(call)
        mean = deltas[0]
        for delta in deltas[1:]:
            mean += delta
        mean /= len(deltas)
        t = self.rows_of(call, self.t) if self.by_row else self.t[0].to(call.base.device, call.base.dtype)
        return call.base + t * mean, self.stats


MODEL_STOCK = gram_two_pass(_ModelStock)

SPECS = (
    MethodSpec(
        name="model_stock",
        fn=MODEL_STOCK.whole,
        params=(Param("filter_wise", bool, default=False, help="one interpolation factor per output row"),),
        citation="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models",
        base="required",
        min_experts=2,
        two_pass=MODEL_STOCK,
    ),
)
