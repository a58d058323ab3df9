"""The task-arithmetic family as one composition: sparsifier x sign election x normalisation.

With task vectors ``δ_i = θ_i − θ_0`` (in-the-wild study, eq. 1) every method here computes
``θ = θ_0 + λ Δ`` where ``Δ = Σ_i w_i m_i s(δ_i)`` (eq. 2), optionally divided by ``Σ_i w_i m_i`` (eq. 12,
``normalize``), with ``s`` a sparsifier (TIES trim, DARE drop, DELLA MagPrune, Breadcrumbs) and ``m_i`` the TIES
sign-agreement mask (eq. 3) where the method elects signs.

Deliberate difference from mergekit (its issue 474): TIES-style methods elect the sign on the *unweighted*
trimmed task vectors, as the TIES paper does; ``vote: weighted`` elects on ``w_i δ_i`` as mergekit does. With
equal weights the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param, weight_param
from mergelab.ops.consensus import disjoint_sum, elect_sign
from mergelab.ops.sparsify import (
    bernoulli_mask,
    magnitude_mask,
    magprune_keep_prob,
    outlier_mask,
    rescale_l1,
)

LAMBDA = Param("lambda", float, default=1.0, help="global scale of the merged update (λ, eq. 2)")
INT8_MASK = Param("int8_mask", bool, default=False, help="accepted for mergekit recipes; masks are boolean here")
DENSITY = Param("density", float, default=1.0, per_model=True, low=0.0, high=1.0, low_open=True,
                help="fraction of task-vector entries kept")
SIGN_ELECTION = Param("sign_election", str, default="sum", choices=("sum", "count"),
                      help="TIES sign election: total mass (sum) or majority count")
VOTE = Param("vote", str, default="raw", choices=("raw", "weighted"),
             help="elect signs on raw trimmed task vectors (TIES paper) or weighted ones (mergekit)")
RESCALE_MODE = Param("rescale_mode", str, default="l1", choices=("l1", "inverse_density"),
                     help="after random drops: match the L1 norm (mergekit) or divide by the keep rate (DARE)")
GAMMA = Param("gamma", float, default=0.01, per_model=True, low=0.0, high=1.0,
              help="Breadcrumbs: fraction of largest-magnitude entries dropped as outliers")
EPSILON = Param("epsilon", float, default=0.15, per_model=True, low=0.0, high=1.0,
                help="DELLA: half-width of the keep-probability range around density")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default=default, help="divide the update by the sum of weights (eq. 12)")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default=default, help="rescale kept entries after a random drop")


@dataclass(frozen=True)
class Family:
    """One member of the family: which sparsifier, whether signs are elected, and its defaults."""

    name: str
    sparsifier: str | None  # None, "magnitude", "random", "magprune", "outliers"
    elect: bool
    normalize: bool
    rescale: bool
    citation: str

    @property
    def params(self) -> tuple[Param, ...]:
        params = [weight_param(), LAMBDA, _normalize(self.normalize), INT8_MASK]
        if self.sparsifier is not None:
            params.append(DENSITY)
        if self.sparsifier in ("random", "magprune"):
            params += [_rescale(self.rescale), RESCALE_MODE]
        if self.sparsifier == "outliers":
            params.append(GAMMA)
        if self.sparsifier == "magprune":
            params.append(EPSILON)
        if self.elect:
            params += [SIGN_ELECTION, VOTE]
        return tuple(params)


def _sparsify(family: Family, delta: torch.Tensor, call: MethodCall, i: int) -> torch.Tensor:
    """Apply the family's sparsifier to expert ``i``'s task vector."""
    p = call.params
    if family.sparsifier is None or p["density"][i] >= 1.0:
        return delta
    density = p["density"][i]
    if family.sparsifier == "magnitude":
        return delta * magnitude_mask(delta, density)
    if family.sparsifier == "outliers":
        return delta * outlier_mask(delta, density, p["gamma"][i])
    if family.sparsifier == "random":
        keep_prob: torch.Tensor | float = density
    else:  # magprune
        epsilon = p["epsilon"][i]
        if density - epsilon <= 0 or density + epsilon >= 1:
            raise RecipeError(f"{call.info.name}: DELLA needs density ± epsilon inside (0, 1), got density "
                              f"{density} and epsilon {epsilon}; lower epsilon")
        keep_prob = magprune_keep_prob(delta, density, epsilon)
    kept = delta * bernoulli_mask(delta, keep_prob, call.generator)
    if not p["rescale"]:
        return kept
    if p["rescale_mode"] == "l1":
        return rescale_l1(delta, kept)
    return kept / keep_prob


def merged_update(family: Family, call: MethodCall) -> torch.Tensor:
    """The merged task vector ``Δ`` before ``λ`` (eq. 2, or eq. 3 with sign election)."""
    base, weights = call.base, call.params["weight"]
    deltas = [_sparsify(family, expert - base, call, i) for i, expert in enumerate(call.experts)]
    if family.elect:
        voter_weights = weights if call.params["vote"] == "weighted" else None
        elected = elect_sign(deltas, call.params["sign_election"], voter_weights)
        return disjoint_sum(deltas, weights, elected, call.params["normalize"])
    total = deltas[0].mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        total.add_(delta, alpha=weight)
    divisor = sum(weights)
    if call.params["normalize"] and abs(divisor) >= 1e-8:
        total.div_(divisor)
    return total


def _merge(family: Family):
    def merge(call: MethodCall) -> torch.Tensor:
        return merged_update(family, call).mul_(call.params["lambda"]).add_(call.base)

    merge.__name__ = family.name
    merge.__doc__ = f"{family.name}: θ_0 + λ Δ (see module docstring). {family.citation}"
    return merge


FAMILY = (
    Family("task_arithmetic", None, False, False, False, "Ilharco et al. 2023, Editing models with task arithmetic"),
    Family("ties", "magnitude", True, True, False, "Yadav et al. 2023, TIES-Merging"),
    Family("dare_linear", "random", False, False, True, "Yu et al. 2024, DARE (Language models are Super Mario)"),
    Family("dare_ties", "random", True, False, True, "Yu et al. 2024, DARE, with TIES sign election"),
    Family("della", "magprune", True, True, True, "Deep et al. 2024, DELLA-Merging"),
    Family("della_linear", "magprune", False, False, True, "Deep et al. 2024, DELLA-Merging without election"),
    Family("breadcrumbs", "outliers", False, False, False, "Davari & Belilovsky 2024, Model Breadcrumbs"),
    Family("breadcrumbs_ties", "outliers", True, False, False, "Davari & Belilovsky 2024, with TIES election"),
)
_BY_NAME = {f.name: f for f in FAMILY}
TASK_ARITHMETIC_PARAMS = _BY_NAME["task_arithmetic"].params
TIES_PARAMS = _BY_NAME["ties"].params


def task_arithmetic_update(call: MethodCall) -> torch.Tensor:
    """Task Arithmetic's merged update ``Δ`` before ``λ`` (eq. 2 / eq. 12)."""
    return merged_update(_BY_NAME["task_arithmetic"], call)


def ties_update(call: MethodCall) -> torch.Tensor:
    """TIES-Merging's merged update ``Δ`` before ``λ`` (eq. 3)."""
    return merged_update(_BY_NAME["ties"], call)


SPECS = tuple(
    MethodSpec(name=f.name, fn=_merge(f), params=f.params, citation=f.citation, base="required",
               random=f.sparsifier in ("random", "magprune"), elementwise=f.sparsifier is None and not f.elect)
    for f in FAMILY
)
