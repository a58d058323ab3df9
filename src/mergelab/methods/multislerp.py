"""Multi-SLERP, barycentric interpolation on the sphere [Goddard2025], one whole tensor as one vector."""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param
from mergelab.methods.weights import normalised_weights, weight_sum_check


def multislerp(call: MethodCall) -> torch.Tensor:
    """Multi-SLERP, barycentric interpolation on the sphere ([Goddard2025], as defined by mergekit).

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


SPECS = (
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
        check_params=weight_sum_check("multislerp", "normalize_weights", min_models=2),
    ),
)
