"""Linear weight averaging (Model Soups, Wortsman et al. 2022): ``θ = Σ_i w_i θ_i`` / ``Σ_i w_i``."""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param


def linear(call: MethodCall) -> torch.Tensor:
    """Weighted sum of the models' tensors, divided by the weight sum when ``normalize`` (the default)."""
    weights = torch.tensor(call.params["weight"], dtype=call.experts[0].dtype, device=call.experts[0].device)
    total = torch.tensordot(weights, torch.stack(call.experts), dims=1)
    if not call.params["normalize"]:
        return total
    divisor = weights.sum()
    if divisor.abs() < 1e-12:
        raise RecipeError(f"{call.info.name}: linear weights sum to zero, so they cannot be normalised; "
                          "change the weights or set normalize: false")
    return total / divisor


SPECS = (
    MethodSpec(
        name="linear",
        fn=linear,
        params=(weight_param(), Param("normalize", bool, default=True, help="divide by the sum of weights"),
                Param("int8_mask", bool, default=False, help="accepted for mergekit recipes; no effect")),
        citation="Wortsman et al. 2022, Model soups",
        base="ignored",
        elementwise=True,
    ),
)
