"""The task-arithmetic family as one composition: sparsifier x sign election x normalisation.

With task vectors ``δ_i = θ_i − θ_0`` ([InTheWild] eq. 1) every method here computes
``θ = θ_0 + λ Δ`` where ``Δ = Σ_i w_i m_i s(δ_i)`` ([InTheWild] eq. 2), optionally divided by ``Σ_i w_i m_i`` (eq. 12,
``normalize``), with ``s`` a sparsifier (TIES trim, DARE drop, DELLA MagPrune, Breadcrumbs) and ``m_i`` the TIES
sign-agreement mask (eq. 3) where the method elects signs.

Deliberate difference from mergekit (its issue 474): TIES-style methods elect the sign on the *unweighted*
trimmed task vectors, as [Yadav2023] does; ``vote: weighted`` elects on ``w_i δ_i`` as mergekit does. With
equal weights the two agree.

Every member is a ``TwoPass`` method: its per-tensor statistics (the trim threshold of TIES and Breadcrumbs,
the generator positions and L1 norms of the random drops) are gathered over row blocks, and the rest is
elementwise, so the engine streams a large tensor in blocks; on a whole tensor the same code runs on one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.methods.spec import MethodCall, MethodSpec, Param, TensorInfo, TwoPass, weight_param
from mergelab.ops.consensus import disjoint_sum, elect_sign
from mergelab.ops.l1_norm import L1Norm, l1_scale
from mergelab.ops.rank_window import RankWindow
from mergelab.ops.sparsify import bernoulli_mask, magnitude_window, magprune_keep_prob, outlier_window

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


def check_keep_range(params: dict[str, Any], where: str) -> None:
    """DELLA's keep probabilities ``density ± epsilon`` must lie inside (0, 1) for every expert that drops
    entries (density below 1); the spec's ``check_params``, run while planning."""
    for density, epsilon in zip(params["density"], params["epsilon"]):
        if density < 1.0 and (density - epsilon <= 0 or density + epsilon >= 1):
            raise RecipeError(f"{where}: DELLA needs density ± epsilon inside (0, 1), got density "
                              f"{density} and epsilon {epsilon}; lower epsilon")


class _Statistics:
    """One tensor's statistics for a family member (its ``TwoPass`` state).

    Trim sparsifiers (TIES magnitude, Breadcrumbs outliers) keep a ``RankWindow`` per expert. Random drops
    (DARE, DELLA) draw from one generator, expert after expert, as on a whole tensor; pass 1 takes one pass per
    drawing expert, drawing that expert's masks to find where the next expert's draws start and, for the L1
    rescale, to sum the task vector's L1 norm before and after the drop. Pass 2 replays each expert's draws
    from its start. Experts with density 1 are left as they are and draw nothing.
    """

    def __init__(self, family: Family, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        self.family, self.params = family, params
        numel = math.prod(shape)
        densities = params["density"] if family.sparsifier is not None else []
        sparse = [i for i, density in enumerate(densities) if density < 1.0]
        self.windows: dict[int, RankWindow] = {}
        if family.sparsifier == "magnitude":
            self.windows = {i: magnitude_window(numel, params["density"][i]) for i in sparse}
        elif family.sparsifier == "outliers":
            self.windows = {i: outlier_window(numel, params["density"][i], params["gamma"][i]) for i in sparse}
        self.drawing = sparse if family.sparsifier in ("random", "magprune") else []
        if family.sparsifier == "magprune":
            check_keep_range(params, info.name)
        self.l1 = bool(self.drawing) and params["rescale"] and params["rescale_mode"] == "l1"
        self.generator = generator
        self.starts = {self.drawing[0]: generator.get_state()} if self.drawing else {}
        self.norms = {i: (L1Norm(), L1Norm()) for i in self.drawing} if self.l1 else {}
        self.scales: dict[int, float] = {}
        # the last expert's draws need a pass only to sum its L1 norms
        self.draw_passes = len(self.drawing) if self.l1 else max(len(self.drawing) - 1, 0)
        self.passes = 0
        self.replay: dict[int, torch.Generator] = {}

    @property
    def done(self) -> bool:
        return self.passes >= self.draw_passes and all(w.done for w in self.windows.values())

    def observe(self, call: MethodCall) -> None:
        for i, window in self.windows.items():
            if not window.done:
                window.feed((call.experts[i] - call.base).abs_())
        if self.passes < self.draw_passes:  # the same draws as pass 2 makes, so the generator ends where it will
            i = self.drawing[self.passes]
            delta = call.experts[i] - call.base
            kept = self._drop(i, delta, self.generator)[0]
            if self.l1:
                self.norms[i][0].add(delta)
                self.norms[i][1].add(kept)

    def end_pass(self) -> None:
        for window in self.windows.values():
            if not window.done:
                window.end_pass()
        if self.passes < self.draw_passes:
            self.passes += 1
            if self.passes < len(self.drawing):
                self.starts[self.drawing[self.passes]] = self.generator.get_state()
        if self.done:
            self.scales = {i: l1_scale(before.value, after.value) for i, (before, after) in self.norms.items()}

    def _drop(self, i: int, delta: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Expert ``i``'s task vector after its random drop (before any rescale), and the keep probabilities."""
        density = self.params["density"][i]
        keep_prob: torch.Tensor | float = density
        if self.family.sparsifier == "magprune":
            keep_prob = magprune_keep_prob(delta, density, self.params["epsilon"][i])
        return delta * bernoulli_mask(delta, keep_prob, generator), keep_prob

    def sparsify(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        """Pass 2: expert ``i``'s sparsified task vector on this block (consumes ``delta``)."""
        if i in self.windows:
            return delta.mul_(self.windows[i].mask(delta.abs()))
        if i not in self.starts:
            return delta
        if i not in self.replay:
            self.replay[i] = torch.Generator(device=self.generator.device)
            self.replay[i].set_state(self.starts[i])
        kept, keep_prob = self._drop(i, delta, self.replay[i])
        if not self.params["rescale"]:
            return kept
        if self.l1:
            return kept if self.scales[i] == 1.0 else kept.mul_(self.scales[i])
        return kept.div_(keep_prob)


def _update(family: Family, call: MethodCall, state: _Statistics) -> torch.Tensor:
    """The merged task vector ``Δ`` before ``λ`` (eq. 2, or eq. 3 with sign election), on one block."""
    base, weights = call.base, call.params["weight"]
    deltas = [state.sparsify(i, expert - base) for i, expert in enumerate(call.experts)]
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


def _merged(family: Family, call: MethodCall, state: _Statistics) -> torch.Tensor:
    """``θ_0 + λ Δ`` on one block."""
    return _update(family, call, state).mul_(call.params["lambda"]).add_(call.base)


def _two_pass(family: Family, block) -> TwoPass:
    return TwoPass(start=partial(_Statistics, family), block=partial(block, family))


def merged_update(family: Family, call: MethodCall) -> torch.Tensor:
    """The merged task vector ``Δ`` before ``λ`` of a whole tensor."""
    return _two_pass(family, _update).whole(call)


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


def task_arithmetic_update(call: MethodCall) -> torch.Tensor:
    """Task Arithmetic's merged update ``Δ`` before ``λ`` (eq. 2 / eq. 12)."""
    return merged_update(_BY_NAME["task_arithmetic"], call)


def ties_update(call: MethodCall) -> torch.Tensor:
    """TIES-Merging's merged update ``Δ`` before ``λ`` (eq. 3)."""
    return merged_update(_BY_NAME["ties"], call)


def _spec(family: Family) -> MethodSpec:
    two_pass = _two_pass(family, _merged)
    return MethodSpec(name=family.name, fn=two_pass.whole, params=family.params, citation=family.citation,
                      base="required", random=family.sparsifier in ("random", "magprune"),
                      elementwise=family.sparsifier is None and not family.elect, two_pass=two_pass,
                      check_params=check_keep_range if family.sparsifier == "magprune" else None)


SPECS = tuple(_spec(f) for f in FAMILY)
