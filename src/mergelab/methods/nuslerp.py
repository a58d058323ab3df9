"""NuSLERP: SLERP between two models, per row, per column or over the whole tensor, with or without a base
(mergekit 0.1.5's ``nuslerp``, Goddard 2024; SLERP after Shoemake 1985).

With weights ``w_0, w_1`` of the two non-base models the position is ``t = w_1 / (w_0 + w_1)`` (0.5 when the
weights sum to less than 1e-6 in magnitude). Without a base the two tensors ``a, b`` are interpolated; with a
base ``θ_0`` their task vectors are, and the base is added back: ``θ = θ_0 + slerp(t, a − θ_0, b − θ_0)``.

``slerp(t, a, b)`` treats each vector on its own: the whole tensor flattened (``nuslerp_flatten``, the
default), else the vectors along the last dimension (each row of a matrix), or with ``nuslerp_row_wise``
those along the first (each column). For one pair of vectors, with ``û = u / max(‖u‖, 1e-7)``:

    cos θ = clamp(⟨â, b̂⟩, −1, 1);  slerp = (sin((1 − t) θ) a + sin(t θ) b) / sin θ

falling back to ``(1 − t) a + t b`` where ``1 − cos² θ ≤ 1e-16`` (parallel or antiparallel vectors). Unlike
``slerp``, the raw vectors (not their directions) are interpolated, so norms come through as SLERP gives them.
"""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def position(weights: list[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``, or 0.5 when the weights sum to (nearly) zero."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP of each pair of vectors along the last dimension of ``a`` and ``b`` (see the module docstring)."""
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos_theta = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


def nuslerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP of two tensors over the vectors the flags choose: all of it, rows, or (``row_wise``) columns."""
    if flatten:
        return slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise and a.dim() > 1:
        return slerp_vectors(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    return slerp_vectors(t, a, b)


def nuslerp(call: MethodCall) -> torch.Tensor:
    """NuSLERP of one tensor between the two non-base models, about the base when there is one."""
    p = call.params
    t = position(p["weight"])
    first, second = call.experts
    if call.base is None:
        return nuslerp_tensors(t, first, second, p["nuslerp_row_wise"], p["nuslerp_flatten"])
    base = call.base
    return base + nuslerp_tensors(t, first - base, second - base, p["nuslerp_row_wise"], p["nuslerp_flatten"])


SPECS = (
    MethodSpec(
        name="nuslerp",
        fn=nuslerp,
        params=(
            weight_param(default=None, required=True),
            Param("nuslerp_row_wise", bool, default=False,
                  help="interpolate the vectors along the first dimension (columns) instead of the last (rows)"),
            Param("nuslerp_flatten", bool, default=True,
                  help="interpolate the whole tensor as one vector (overrides nuslerp_row_wise)"),
        ),
        citation="Goddard 2024, NuSLERP (mergekit 0.1.5's nuslerp); SLERP after Shoemake 1985",
        base="optional",
        min_experts=2,
        max_experts=2,
    ),
)
