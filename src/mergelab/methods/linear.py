"""Linear weight averaging (Model Soups, [Wortsman2022]): ``θ = Σ_i w_i θ_i`` / ``Σ_i w_i``."""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param
from mergelab.methods.weights import ZERO_SUM, weight_sum_check, zero_sum_error

REMEDY = "change the weights or set normalize: false"


def linear(call: MethodCall) -> torch.Tensor:
    """Weighted sum of the models' tensors, divided by the weight sum when ``normalize`` (the default)."""
    weights = torch.tensor(call.params["weight"], dtype=call.experts[0].dtype, device=call.experts[0].device)
    total = torch.tensordot(weights, torch.stack(call.experts), dims=1)
    if not call.params["normalize"]:
        return total
    divisor = weights.sum()
    if divisor.abs() < ZERO_SUM:
        raise zero_sum_error(call.info.name, "linear", REMEDY)
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
        check_params=weight_sum_check("linear", "normalize", REMEDY),
    ),
)
