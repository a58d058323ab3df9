"""The normalised per-model mixing weights that several methods share (``weight_param`` declares them), and the
planning check that they can be normalised."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall

ZERO_SUM = 1e-12  # a weight sum this small cannot be divided by


def zero_sum_error(where: str, method: str, remedy: str = "give the models weights with a non-zero sum"
                   ) -> RecipeError:
    return RecipeError(f"{where}: the {method} weights sum to zero, so they cannot be normalised; {remedy}")


def normalised_weights(call: MethodCall, method: str) -> torch.Tensor:
    """The per-model ``weight`` values divided by their sum, as a tensor on the experts' device.

    Raises RecipeError when the weights sum to zero, since they cannot then be normalised.
    """
    first = call.experts[0]
    weights = torch.tensor(call.params["weight"], dtype=first.dtype, device=first.device)
    total = weights.sum()
    if total.abs() < ZERO_SUM:
        raise zero_sum_error(call.info.name, method)
    return weights / total


def weight_sum_check(method: str, switch: str | None = None, remedy: str = "give the models weights with a "
                     "non-zero sum", min_models: int = 1) -> Callable[[dict[str, Any], str], None]:
    """A ``check_params`` that refuses weights summing to zero where the method normalises them (always, or when
    the boolean parameter ``switch`` is on; with at least ``min_models`` models), so the error comes while
    planning rather than mid-stream."""

    def check(params: dict[str, Any], where: str) -> None:
        weights = params["weight"]
        normalised = (switch is None or params[switch]) and len(weights) >= min_models
        if normalised and abs(sum(weights)) < ZERO_SUM:
            raise zero_sum_error(where, method, remedy)

    return check
