"""NuSLERP: SLERP between two models, per row, per column or over the whole tensor, with or without a base
(mergekit 0.1.5's ``nuslerp``, Goddard 2024; SLERP after Shoemake 1985), streamed in row blocks.

With weights ``w_0, w_1`` of the two non-base models the position is ``t = w_1 / (w_0 + w_1)`` (0.5 when the
weights sum to less than 1e-6 in magnitude). Without a base the two tensors ``a, b`` are interpolated; with a
base ``θ_0`` their task vectors are, and the base is added back: ``θ = θ_0 + slerp(t, a − θ_0, b − θ_0)``.

``slerp(t, a, b)`` treats each vector on its own: the whole tensor flattened (``nuslerp_flatten``, the
default), else the vectors along the last dimension (each row of a matrix), or with ``nuslerp_row_wise``
those along the first (each column). For one pair of vectors, with ``‖u‖₊ = max(‖u‖, 1e-7)``:

    cos θ = clamp(⟨a, b⟩ / (‖a‖₊ ‖b‖₊), −1, 1);  slerp = sin((1 − t) θ)/sin θ · a + sin(t θ)/sin θ · b

falling back to ``(1 − t) a + t b`` where ``sin² θ = 1 − cos² θ`` is below float32's resolution, 2^-23
(parallel or antiparallel vectors, to within about 3.5e-4 rad). There the line is within a float32 step of the
arc near θ = 0, and near θ = π the spherical coefficients (about 1 / sin θ) would only amplify rounding.
mergekit's threshold, ``1e-16`` on its float32 cosine, means ``cos θ = ±1`` in float32, about the same angles;
on float64 statistics it would let through pairs that are antiparallel up to rounding. Unlike ``slerp``, the raw
vectors (not their directions) are interpolated, so norms come through as SLERP gives them.

The inner products come from the float64 Gram matrix of the two vectors (``methods.gram``), accumulated over
row blocks, so blocks and whole tensors give the same bytes. A vector along the last dimension lies within one
row block; a column spans all of them, so column mode takes its tensors whole (``needs_whole``), as do the
rows of tensors of more than two dimensions. ``--compat mergekit`` runs mergekit's own arithmetic instead
(``mergekit_arithmetic.nuslerp``: unit vectors and sums in the working dtype).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergelab.methods.gram import GramPass, gram_two_pass, linear_combination
from mergelab.methods.spec import MethodCall, MethodSpec, Param, TensorInfo, weight_param
from mergelab.ops.row_gram import RowGram

NORM_FLOOR = 1e-7
COLINEAR_SIN2 = torch.finfo(torch.float32).eps  # 2^-23


def position(weights: list[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``, or 0.5 when the weights sum to (nearly) zero."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def vector_layout(shape: tuple[int, ...], params: dict[str, Any]) -> str:
    """Which vectors are interpolated: ``tensor`` (the whole tensor, also any tensor of at most one dimension
    outside column mode), ``rows`` (along the last dimension of a matrix) or ``whole`` (columns, or the
    last-dimension vectors of a tensor of three or more dimensions: computed on the whole tensor at once)."""
    if params["nuslerp_flatten"] or len(shape) <= 1:
        return "tensor"
    if params["nuslerp_row_wise"] or len(shape) > 2:
        return "whole"
    return "rows"


def needs_whole(info: TensorInfo, shape: tuple[int, ...], params: dict[str, Any]) -> bool:
    """The tensors NuSLERP takes whole: those whose vectors cross row blocks (``vector_layout``)."""
    return vector_layout(shape, params) == "whole"


def slerp_coefficients(t: float, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients ``(c_a, c_b)`` of ``slerp = c_a a + c_b b`` for each pair of vectors, from their (..., 2, 2)
    float64 Gram matrices (the module docstring's formula and its linear fallback)."""
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt().clamp(min=NORM_FLOOR)
    cos_theta = (gram[..., 0, 1] / (norms[..., 0] * norms[..., 1])).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_SIN2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    first = torch.where(colinear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    second = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)
    return first, second


class _NuSlerp(GramPass):
    """NuSLERP of one tensor (the module docstring): the Gram matrix of the two (task) vectors, per row or over
    the whole tensor; in ``whole`` layout the vectors are the columns (``nuslerp_row_wise``) or the
    last-dimension vectors of a tensor of 3+ dimensions, laid out as the rows of a matrix, and the one block is
    the whole tensor (``shape``, as ``GramPass`` sizes its Gram, is then that matrix's)."""

    def __init__(self, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        super().__init__(info, params, shape, generator)
        self.layout = vector_layout(shape, params)
        self.t = position(params["weight"])
        if self.layout == "whole":
            self.shape = tuple(self.as_rows(torch.empty(shape, device="meta")).shape)

    def as_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ``whole`` layout's vectors of ``tensor`` as the rows of a matrix."""
        shape = tuple(tensor.shape)
        if self.params["nuslerp_row_wise"]:
            return tensor.transpose(0, -1).reshape(math.prod(shape[1:]), shape[0])
        return tensor.reshape(math.prod(shape[:-1]), shape[-1])

    def pair(self, call: MethodCall) -> list[torch.Tensor]:
        """The two experts, or their task vectors."""
        return [e - call.base for e in call.experts] if call.base is not None else list(call.experts)

    def vectors(self, call: MethodCall) -> list[torch.Tensor]:
        pair = self.pair(call)
        if self.layout != "whole":
            return pair
        rows = [self.as_rows(v) for v in pair]
        if tuple(rows[0].shape) != self.shape:
            raise ValueError(f"{self.name}: nuslerp's columns need the whole tensor, got a block of it")
        return rows

    def solve(self, gram: RowGram) -> None:
        per_vector = self.layout != "tensor"
        self.coefficients = slerp_coefficients(self.t, gram.per_row() if per_vector else gram.total()[None])

    def merge(self, call: MethodCall) -> torch.Tensor:
        pair = self.pair(call)
        block = pair[0]
        if self.layout == "tensor":
            coefficients = [c[0] for c in self.coefficients]
        elif self.layout == "rows":
            rows = slice(self.row, self.row + block.shape[0])
            self.row = rows.stop
            coefficients = [c[rows].reshape(-1, 1) for c in self.coefficients]
        else:
            coefficients = [self.spread(c, block) for c in self.coefficients]
        merged = linear_combination(pair, [c.to(block.device, block.dtype) for c in coefficients])
        return merged if call.base is None else call.base + merged

    def spread(self, values: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Per-vector ``values`` of the ``whole`` layout, shaped to broadcast over ``tensor``."""
        if self.params["nuslerp_row_wise"]:
            return values.reshape(tensor.transpose(0, -1).shape[:-1]).transpose(0, -1).unsqueeze(0)
        return values.reshape(*tensor.shape[:-1], 1)


NUSLERP = gram_two_pass(_NuSlerp)

SPECS = (
    MethodSpec(
        name="nuslerp",
        fn=NUSLERP.whole,
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
        two_pass=NUSLERP,
        needs_whole=needs_whole,
    ),
)
