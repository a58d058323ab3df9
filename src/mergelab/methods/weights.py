"""The normalised per-model mixing weights that several methods share (``weight_param`` declares them), and the
planning check that they can be normalised."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall

ZERO_SUM = 1e-12  # a weight sum this small cannot be divided by


def zero_sum_error(where: str, method: str, remedy: str = "give the models weights with a non-zero sum"
                   ) -> RecipeError:
    return RecipeError(f"{where}: the {method} weights sum to zero, so they cannot be normalised; {remedy}")


def normalised_values(weights: list[float], where: str, method: str) -> list[float]:
    """The per-model weights divided by their (correctly rounded) sum, in float64.

    Raises RecipeError naming ``where`` when the weights sum to zero, since they cannot then be normalised.
    """
    total = math.fsum(weights)
    if abs(total) < ZERO_SUM:
        raise zero_sum_error(where, method)
    return [w / total for w in weights]


def normalised_weights(call: MethodCall, method: str) -> torch.Tensor:
    """The per-model ``weight`` values divided by their sum (``normalised_values``), as a tensor of the experts'
    dtype on their device."""
    first = call.experts[0]
    return torch.tensor(normalised_values(call.params["weight"], call.info.name, method), dtype=first.dtype,
                        device=first.device)


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
