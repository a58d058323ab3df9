"""Multi-SLERP, barycentric interpolation on the sphere [Goddard2025], one whole tensor as one vector, streamed in
row blocks: the norms and the mean direction come from the Gram matrix (``methods.gram``), the output is
elementwise."""

from __future__ import annotations

import math

import torch

from mergelab.errors import RecipeError
from mergelab.methods.gram import GramPass, gram_two_pass, linear_combination
from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param
from mergelab.methods.weights import normalised_values, weight_sum_check
from mergelab.ops.row_gram import RowGram


class _MultiSlerp(GramPass):
    """Multi-SLERP, barycentric interpolation on the sphere ([Goddard2025], as defined by mergekit).

    The published procedure projects the (task) vectors' directions ``u_i = x_i / (‖x_i‖ + eps)`` onto the
    tangent space at their normalised weighted mean ``m = M / ‖M‖``, ``M = Σ w_i u_i``, averages there and
    maps back with the exponential map. That tangent average is identically zero
    (``Σ w_i (u_i − ⟨u_i, m⟩ m) = M − ‖M‖ m = 0``), so the result is exactly ``m`` scaled by the weighted mean
    norm ``Σ w_i ‖x_i‖``, which is what is computed here: with ``a_i = w_i / (‖x_i‖ + eps)``,
    ``‖M‖² = Σ_ij a_i a_j G_ij`` from the Gram matrix ``G`` of the ``x_i`` (float64), and the output
    ``Σ_i (Σ_k w_k ‖x_k‖) a_i / ‖M‖ · x_i``. With a base the ``x_i`` are task vectors and the base is added
    back. Two models whose weighted directions cancel fall back to ``Σ w_i x_i``; more than two raise
    RecipeError. When every task vector is zero (experts equal to the base on this tensor, for example frozen
    embeddings) the result is the base. One model is returned as it is.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.passes = int(len(self.params["weight"]) == 1)  # one model: nothing to measure

    def vectors(self, call: MethodCall) -> list[torch.Tensor]:
        return [e if call.base is None else e - call.base for e in call.experts]

    def solve(self, gram: RowGram) -> None:
        p = self.params
        weights = normalised_values(p["weight"], self.name, "multislerp") if p["normalize_weights"] else p["weight"]
        g = gram.total().tolist()
        norms = [math.sqrt(g[i][i]) for i in range(len(weights))]
        scaled = [w / (norm + p["eps"]) for w, norm in zip(weights, norms)]
        mean_norm = math.sqrt(max(0.0, sum(a * b * g[i][j] for i, a in enumerate(scaled)
                                            for j, b in enumerate(scaled))))
        if mean_norm < p["eps"]:  # antipodal directions, or nothing moved (every task vector is zero)
            if len(weights) != 2 and any(norm > 0 for norm in norms):
                raise RecipeError(f"{self.name}: the weighted directions of the models cancel out "
                                  "(antipodal tensors with balancing weights), so multislerp has no mean; "
                                  "change the weights")
            self.coefficients = list(weights)
            return
        scale = math.fsum(w * norm for w, norm in zip(weights, norms))
        self.coefficients = [scale * a / mean_norm for a in scaled]

    def merge(self, call: MethodCall) -> torch.Tensor:
        if len(call.experts) == 1:
            return call.experts[0]
        merged = linear_combination(self.vectors(call), self.coefficients)
        return merged if call.base is None else merged.add_(call.base)


MULTISLERP = gram_two_pass(_MultiSlerp)

SPECS = (
    MethodSpec(
        name="multislerp",
        fn=MULTISLERP.whole,
        params=(
            weight_param(),
            Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
            Param("eps", float, default=1e-8, low=0.0, help="small constant that keeps divisions finite"),
        ),
        citation="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
        base="optional",
        min_experts=1,
        check_params=weight_sum_check("multislerp", "normalize_weights", min_models=2),
        two_pass=MULTISLERP,
    ),
)
