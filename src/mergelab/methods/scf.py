"""SCF-RKL and SCF-KL: sparse complementary fusion ([Lin2026], sec. 2 and Algorithm 1).

Per tensor, with base ``θ_b`` and secondary ``θ_s``:

- ``Δ = |θ_s − θ_b|``; ``q = softmax(θ_b) + ε``, ``p = softmax(θ_s) + ε`` per row (last dimension);
- saliency ``I = Δ ⊙ D``, with ``D`` the row's reverse KL ``Σ q log(q/p)`` (SCF-RKL) or forward KL
  ``Σ p log(p/q)`` (SCF-KL, the paper's ablation in Table 10), broadcast over the row;
- threshold ``τ = quantile(I, q_center) + α (quantile(I, q_high) − quantile(I, q_low))`` over the whole
  tensor, exactly (``mergelab.ops.quantile``, any size); mask ``M = 1[I ≥ τ]``;
- result ``θ_b + M ⊙ (θ_s − θ_b)``, taken element by element from ``θ_b`` or ``θ_s`` (bit-identical).

``arcee_fusion`` is mergekit's name for SCF-KL with the ``lower`` quantile interpolation (mergekit samples
10^6 elements on larger tensors; here every quantile is exact).

More than one secondary model (the paper fuses seven vision experts but gives no rule): every expert gets
its own saliency, threshold and mask against the base. ``multi_expert: max_saliency`` (default) keeps the
discrete composition: where several experts pass their thresholds, the element comes from the one with the
highest saliency (the first in recipe order on a tie). ``multi_expert: mean`` instead averages the task
vectors of all experts that pass there: ``θ_b + mean_i(θ_i − θ_b)`` over the passing ``i`` (elements where
one expert passes are still that expert's element).

Statistics per tensor, for each expert ``i`` (recipe order of the non-base models, from 0):
``threshold_i`` (τ), ``selected_i`` (fraction with ``I ≥ τ``; the paper reports 5-15 % per layer at
α = 1.5), ``update_norm_ratio_i`` (``‖M ⊙ (θ_i − θ_b)‖ / ‖θ_i − θ_b‖``, 0 where the delta is 0) and
``taken_i`` (fraction of output elements that are expert ``i``'s); ``from_base`` (fraction left at the base)
and, with ``mean`` and several experts, ``averaged`` (fraction averaged over two or more experts).

Every method here is a ``TwoPass`` method, so the engine streams a large tensor in row blocks and memory does
not grow with the tensor: the row divergence ``D`` is per row, so each block computes its rows' ``D`` (kept,
8 bytes a row, for the later passes); the statistics passes feed the saliency to an exact streamed selection
(``ops.quantile.StreamedQuantiles``, the same machinery as TIES's trim threshold) until the three quantiles
of the whole tensor are known; the output pass recomputes each block's saliency from the kept ``D`` and
applies the mask. A whole tensor runs the same code on one block, so both paths give the same bits.

The maths of Algorithm 1 is in ``scf_saliency``, the per-tensor streaming state in ``scf_streaming``; this
module declares the methods and their parameters.
"""

from __future__ import annotations

from functools import partial

from mergelab.methods.scf_saliency import check_thresholds
from mergelab.methods.scf_streaming import Fusion
from mergelab.methods.spec import MethodSpec, Param, TwoPass
from mergelab.ops.quantile import INTERPOLATIONS

CITATION = "Lin et al. 2026, Sparse Complementary Fusion with Reverse KL (SCF-RKL), Algorithm 1"
MAX_EXPERTS = 255  # expert choice per element is stored in a uint8 (0 = base)
MULTI_EXPERT_RULES = ("max_saliency", "mean")

ALPHA = Param("alpha", float, default=1.5,
              help="IQR scale α of the threshold τ = median + α IQR; negative values select more than half")
Q_LOW = Param("q_low", float, default=0.25, low=0.0, high=1.0, help="lower quantile of the IQR (Q1)")
Q_HIGH = Param("q_high", float, default=0.75, low=0.0, high=1.0, help="upper quantile of the IQR (Q3)")
Q_CENTER = Param("q_center", float, default=0.5, low=0.0, high=1.0, help="centre quantile of τ (the median)")
EPSILON = Param("epsilon", float, default=1e-8, low=0.0, low_open=True,
                help="smoothing ε added to each softmax probability")
QUANTILE_METHOD = Param("quantile_method", str, default="linear", choices=INTERPOLATIONS,
                        help="quantile interpolation, as numpy.quantile's method")
MULTI_EXPERT = Param("multi_expert", str, default="max_saliency", choices=MULTI_EXPERT_RULES,
                     help="with several experts: take the most salient passing one, or average the passing ones")
PARAMS = (ALPHA, Q_LOW, Q_HIGH, Q_CENTER, EPSILON, QUANTILE_METHOD, MULTI_EXPERT)


def _two_pass(reverse: bool) -> TwoPass:
    return TwoPass(start=partial(Fusion, reverse), block=lambda call, state: state.fuse(call))


SCF_RKL = _two_pass(reverse=True)  # Algorithm 1 with the reverse KL ``Σ q log(q/p)`` of base q, secondary p
SCF_KL = _two_pass(reverse=False)  # the forward KL ``Σ p log(p/q)`` (the paper's ablation, Table 10)

SPECS = (
    MethodSpec(name="scf_rkl", fn=SCF_RKL.whole, params=PARAMS, citation=CITATION, max_experts=MAX_EXPERTS,
               two_pass=SCF_RKL, check_params=check_thresholds),
    MethodSpec(name="scf_kl", fn=SCF_KL.whole, params=PARAMS, citation=CITATION + " (forward-KL ablation, Table 10)",
               max_experts=MAX_EXPERTS, two_pass=SCF_KL, check_params=check_thresholds),
    MethodSpec(name="arcee_fusion", fn=SCF_KL.whole, params=(ALPHA, Q_LOW, Q_HIGH, Q_CENTER, EPSILON),
               citation="mergekit's arcee_fusion: " + CITATION + " (forward KL, lower quantiles)",
               max_experts=1, aliases_of="scf_kl", two_pass=SCF_KL, check_params=check_thresholds,
               fixed={"quantile_method": "lower", "multi_expert": "max_saliency"}),
)
