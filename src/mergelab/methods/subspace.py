"""Subspace merges: TSV-Merge, Iso-C, Iso-CTS and Subspace Boosting after Task Arithmetic or TIES.

Equations are those of [InTheWild] (docs/PAPERS.md), section 4.1; Iso-CTS
follows [Marczak2025] ("No Task Left Behind", sec. 4.2). Task vectors are ``δ_i = θ_i − θ_0``, scaled
by the per-model ``weight`` α_i (1 by default, as in the study). The result is ``θ_0 + λ Δ``.

Rule for tensors that are not 2-D matrices in the layer stack (embeddings, output head, norms, biases, other
1-D tensors): there is no spectrum to work on, so ``tsv``, ``iso_c`` and ``iso_cts`` use the study's choice,
the task-vector mean ``Δ = Σ_i α_i δ_i / Σ_i α_i``, and the Subspace Boosting methods are the method they boost.
The mean is elementwise and Task Arithmetic and TIES run in row blocks (``TwoPass``), so the engine streams
those tensors (the embedding and LM head are the largest of a model) and takes only the in-layer matrices whole:
``spectral`` is both the engine's ``needs_whole`` and the functions' choice of rule, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergelab.methods import task_arithmetic
from mergelab.methods.gram import linear_combination
from mergelab.methods.spec import MethodCall, MethodResult, MethodSpec, Param, TensorInfo, weight_param
from mergelab.methods.task_arithmetic import LAMBDA, task_arithmetic_update, ties_update
from mergelab.methods.weights import normalised_weights, weight_sum_check
from mergelab.ops.spectral import isotropic, polar_factor, subspace_boost, top_components

BETA = Param("beta", float, default=0.2, low=0.0, high=1.0,
             help="Subspace Boosting threshold on the cumulative normalised singular-value sum (eq. 11)")
COMMON_SPACE_FRACTION = Param("common_space_fraction", float, default=0.8, low=0.0, high=1.0,
                              help="Iso-CTS: share of the rank given to the common subspace")
Stats = dict[str, float]


def spectral(info: TensorInfo, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is a 2-D matrix in the layer stack, the tensors the SVD methods operate on (whole: an
    SVD needs every row); every other tensor gets an elementwise or row-block rule (the module docstring)."""
    return info.is_matrix_in_layer and len(shape) == 2


def spectral_tensor(info: TensorInfo, shape: tuple[int, ...], params: dict[str, Any]) -> bool:
    """The engine's ``needs_whole``: ``spectral``, whatever the parameters."""
    return spectral(info, shape)


def uses_spectrum(call: MethodCall) -> bool:
    """``spectral`` for the tensor of ``call`` (which the engine hands over whole exactly when this holds)."""
    return spectral(call.info, tuple(call.base.shape))


def weighted_task_vectors(call: MethodCall) -> list[torch.Tensor]:
    """``α_i δ_i`` for every expert."""
    return [w * (e - call.base) for w, e in zip(call.params["weight"], call.experts, strict=True)]


def _mean_rule(call: MethodCall) -> tuple[torch.Tensor, Stats]:
    """The non-matrix rule: ``θ_0 + λ Σ_i w_i δ_i`` with ``w_i = α_i / Σ_j α_j`` (see the module docstring).

    Elementwise, so the engine may hand over any row block: the weights depend on the parameters alone (the same
    for every block of a tensor), and each element is summed in expert order with one rounding per product and
    per sum (``methods.gram.linear_combination``; the bits of the ``tensordot`` this replaced, which left the
    order to BLAS).
    """
    weights = normalised_weights(call, "task-vector mean").tolist()  # values of the experts' dtype
    update = linear_combination([expert - call.base for expert in call.experts], weights)
    return call.base + call.params["lambda"] * update, {}


def tsv(call: MethodCall) -> tuple[torch.Tensor, Stats]:
    """TSV-Merge ([Gargiulo2025]; [InTheWild] eq. 5-8) of one matrix.

    Each task vector keeps its top ``floor(r / T)`` singular triplets (r = min(m, n), T tasks; at least one,
    so with more tasks than r the orthogonalised bases have orthonormal rows rather than columns). The kept
    ``U_i`` and ``V_i`` are concatenated and replaced by their closest orthogonal factors ``U_⊥``, ``V_⊥``
    (eq. 7), and ``Δ = U_⊥ Σ V_⊥^T`` with the concatenated singular values.
    """
    if not uses_spectrum(call):
        return _mean_rule(call)
    deltas = weighted_task_vectors(call)
    rank = max(1, min(call.base.shape) // len(deltas))
    parts = [top_components(d, rank) for d in deltas]
    left = polar_factor(torch.cat([u for u, _, _ in parts], dim=1))
    right_t = polar_factor(torch.cat([vh for _, _, vh in parts], dim=0))
    values = torch.cat([s for _, s, _ in parts])
    update = ((left * values) @ right_t).to(call.base.dtype)
    return call.base + call.params["lambda"] * update, {"tsv_rank_per_task": float(rank)}


def iso_c(call: MethodCall) -> tuple[torch.Tensor, Stats]:
    """Iso-C ([Marczak2025]; [InTheWild] eq. 9-10): the summed task vector ``Σ_i α_i δ_i`` with every singular
    value replaced by their mean, ``Δ = σ̄ U V^T``."""
    if not uses_spectrum(call):
        return _mean_rule(call)
    update, mean_value = isotropic(torch.stack(weighted_task_vectors(call)).sum(dim=0))
    return call.base + call.params["lambda"] * update, {"iso_mean_singular_value": mean_value}


def iso_cts_dimensions(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """Sizes of the common subspace and of each task-specific subspace, summing to ``rank``.

    As in the authors' code: ``per_task = round((r − floor(r f)) / T)``, capped at ``floor(r / T)`` so the
    common part is never negative, and the common part takes the rest, ``r − T · per_task``.
    """
    per_task = min(rank // tasks, round((rank - int(rank * common_fraction)) / tasks))
    return rank - tasks * per_task, per_task


def iso_cts(call: MethodCall) -> tuple[torch.Tensor, Stats]:
    """Iso-CTS ([Marczak2025], Algorithm 1) of one matrix.

    The common subspace is the top ``k`` singular triplets of the summed task vector ``Σ_i α_i δ_i``. Each
    task vector, with the common left subspace projected out (``(I − U_k U_k^T) α_i δ_i``), contributes its
    top ``s`` triplets (``k`` and ``s`` from ``iso_cts_dimensions``). The concatenated left and right bases
    are orthogonalised by their polar factors and every direction gets the mean of the concatenated singular
    values: ``Δ = σ̄ U_⊥ V_⊥^T``. With ``common_space_fraction: 1`` this is Iso-C.
    """
    if not uses_spectrum(call):
        return _mean_rule(call)
    deltas = weighted_task_vectors(call)
    fraction = call.params["common_space_fraction"]
    common, per_task = iso_cts_dimensions(min(call.base.shape), len(deltas), fraction)
    common_left, common_values, common_right_t = top_components(torch.stack(deltas).sum(dim=0), common)
    parts = [(common_left, common_values, common_right_t)]
    if per_task > 0:
        for delta in deltas:
            specific = delta - common_left @ (common_left.T @ delta)
            parts.append(top_components(specific, per_task))
    left = polar_factor(torch.cat([u for u, _, _ in parts], dim=1))
    right_t = polar_factor(torch.cat([vh for _, _, vh in parts], dim=0))
    mean_value = torch.cat([s for _, s, _ in parts]).mean()
    update = (mean_value * (left @ right_t)).to(call.base.dtype)
    stats = {"iso_mean_singular_value": float(mean_value), "iso_cts_common_rank": float(common),
             "iso_cts_rank_per_task": float(per_task)}
    return call.base + call.params["lambda"] * update, stats


def _boosted(method: str, update_fn: Callable[[MethodCall], torch.Tensor], after: str) -> MethodSpec:
    """``{method}_sb``, Subspace Boosting on top of ``update_fn``, the merged update of ``method`` (Task Arithmetic
    or TIES): that method itself (its elementwise or ``TwoPass`` declaration too) on every tensor but the spectral
    ones."""
    name, unboosted = f"{method}_sb", {spec.name: spec for spec in task_arithmetic.SPECS}[method]

    def merge(call: MethodCall) -> tuple[torch.Tensor, Stats]:
        if not uses_spectrum(call):
            return unboosted.fn(call), {}  # θ_0 + λ Δ, as the unboosted method computes it block by block
        update, stats = subspace_boost(update_fn(call), call.params["beta"])
        return call.base + call.params["lambda"] * update, stats

    merge.__name__ = name
    merge.__doc__ = (f"{name}: ``θ_0 + λ boost(Δ)`` ([InTheWild] eq. 11) with ``Δ`` from ``{update_fn.__name__}``"
                     " and ``boost`` = ``ops.spectral.subspace_boost`` on 2-D matrices of the layer stack; "
                     f"``{unboosted.name}`` on every other tensor.")
    return MethodSpec(name=name, fn=merge, params=(*unboosted.params, BETA),
                      citation=f"Skorobogat et al. 2025, Subspace Boosting, after {after}", base="required",
                      random=unboosted.random, elementwise=unboosted.elementwise, two_pass=unboosted.two_pass,
                      needs_whole=spectral_tensor, check_params=unboosted.check_params)


def _svd_spec(name: str, fn: Callable[[MethodCall], MethodResult], citation: str, *params: Param) -> MethodSpec:
    """TSV-Merge or Iso-C(TS): the SVD rule on spectral tensors, the elementwise task-vector mean elsewhere."""
    return MethodSpec(name=name, fn=fn, params=(weight_param(), LAMBDA, *params), citation=citation,
                      base="required", elementwise=True, needs_whole=spectral_tensor,
                      check_params=weight_sum_check("task-vector mean"))


SPECS = (
    _svd_spec("tsv", tsv, "Gargiulo et al. 2025, Task Singular Vectors (TSV-Merge)"),
    _svd_spec("iso_c", iso_c, "Marczak et al. 2025, No Task Left Behind (Iso-C)"),
    _svd_spec("iso_cts", iso_cts, "Marczak et al. 2025, No Task Left Behind (Iso-CTS)", COMMON_SPACE_FRACTION),
    _boosted("task_arithmetic", task_arithmetic_update, "Task Arithmetic"),
    _boosted("ties", ties_update, "TIES-Merging"),
)
