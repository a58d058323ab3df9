"""FIM-Merging: per-layer coefficients from a data-free diagonal Fisher ([FIMMerging] Algorithm 1, Appendix B),
applied to Task Arithmetic (``fim_ta``) and to TIES (``fim_ties``).

Prepare step (before streaming): the base's diagonal Fisher on random tokens (``mergelab.fisher``); for each
expert ``i`` and transformer layer ``l`` the importance ``F^l · ‖δ_i^l‖²`` (eq. 8, both terms means over the
layer's projection tensors, as ``mean((δ^l)²)`` in Algorithm 1), mapped to ``α_{i,l}`` by eq. 8-11
(``layer_alphas``). Each expert gets its own coefficients; with one expert (the paper's setting) this is
exactly Algorithm 1.

Rules where the paper leaves room (all recorded here and in ``mergelab.json``):

- The layer set ``T`` holds the transformer layers; a layer's score uses its projection matrices (and
  biases), not its norms. Norm vectors inside layer ``l`` take ``α_l``. Tensors outside the layer stack
  (embeddings, final norm, head) take the mean of the ``α_l`` and, in ``fim_ties``, plain magnitude trimming:
  random tokens leave most embedding rows with zero Fisher, which would make ``F ⊙ |δ|`` rank nothing.
- ``fim_ties`` trims each tensor to the top ``density`` (``r``) of ``F ⊙ |δ|`` (Algorithm 1, step 4, where
  "layer" ranges over weight matrices, as its gate-projection test shows), scales gate projections by
  ``gate_factor``, then elects signs and takes the disjoint mean as TIES does (with one expert both are
  the identity). ``r`` = 0.2 suits ~1.5B models, 0.4 ~7B ones (sec. 5.5).
- Residual norm calibration (``finish``): base and merged model run the same random-token probes, each merged
  layer fed the base's hidden states at its input (so the measure is the layer's own, not its predecessors');
  for each layer the norm of its residual update ``h_out − h_in`` over all probe tokens is compared; where the ratio
  merged/base is off by more than ``epsilon`` the layer's residual-writing projections (``o_proj`` and
  ``down_proj``, weights and biases) are multiplied by base/merged, once (Algorithm 1, step 5).
- Ablations (sec. 5.5): ``score: norm`` uses ``‖δ^l‖²`` alone, ``score: fim`` uses ``F^l`` alone.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.fisher import FisherSettings
from mergelab.methods.context import ModelContext
from mergelab.methods.fim_calibration import calibrate
from mergelab.methods.spec import MethodCall, MethodSpec, ModelPass, Param, weight_param
from mergelab.methods.task_arithmetic import LAMBDA, SIGN_ELECTION, task_arithmetic_update
from mergelab.ops.consensus import disjoint_sum, elect_sign
from mergelab.ops.sparsify import magnitude_mask

SCORES = ("fim_norm", "norm", "fim")

FISHER_PARAMS = (
    Param("fisher_samples", int, default=8, low=1, high=4096, help="random sequences N for the Fisher"),
    Param("fisher_length", int, default=64, low=2, help="tokens per random sequence"),
    Param("fisher_seed", int, default=42, low=0, help="seed of the random tokens"),
    Param("score", str, default="fim_norm", choices=SCORES,
          help="layer importance: F·‖δ‖² (eq. 8), or the sec. 5.5 ablations ‖δ‖² alone (norm), F alone (fim)"),
)


def _calibration_params(default: bool) -> tuple[Param, ...]:
    return (Param("calibrate", bool, default=default, help="residual norm calibration after the merge"),
            Param("epsilon", float, default=0.05, low=0.0, low_open=True,
                  help="relative deviation of a layer's output norm that triggers calibration"))


FIM_TA_PARAMS = (weight_param(), LAMBDA, *FISHER_PARAMS, *_calibration_params(False))
FIM_TIES_PARAMS = (
    weight_param(), LAMBDA, *FISHER_PARAMS,
    Param("density", float, default=0.2, low=0.0, high=1.0, low_open=True,
          help="fraction r of F⊙|δ| entries kept per tensor (0.2 for ~1.5B, 0.4 for ~7B models)"),
    Param("gate_factor", float, default=0.7, low=0.0, high=1.0, help="gate projections get gate_factor·α"),
    Param("normalize", bool, default=True, help="TIES disjoint mean over agreeing experts"),
    SIGN_ELECTION,
    *_calibration_params(True),
)


def layer_alphas(importance: list[float]) -> list[float]:
    """Per-layer coefficients from importances ``I_l`` (Algorithm 1, step 3; eq. 8-11):
    ``s_l = log I_l``, ``ŝ_l = s_l − median(s)``, ``θ = 1 / range(ŝ)``, ``α_l = 1 − σ(θ (ŝ_l − max ŝ))``.

    So ``α`` lies in ``[0.5, 1 − σ(−1)] ≈ [0.5, 0.731]``, the most important layer getting 0.5. When the range
    is zero (one layer, or all equal) every ``α_l`` is 0.5, the limit of the formula for any finite sharpness.
    A zero importance (a layer the expert left unchanged) is treated as the least important finite one.
    """
    logs = [torch.tensor(v, dtype=torch.float64).log().item() if v > 0 else float("-inf") for v in importance]
    finite = [s for s in logs if s != float("-inf")]
    if not finite:
        return [0.5] * len(importance)
    logs = [s if s != float("-inf") else min(finite) for s in logs]
    centred = [s - statistics.median(logs) for s in logs]
    spread = max(centred) - min(centred)
    if spread == 0:
        return [0.5] * len(importance)
    top = max(centred)
    return [1.0 - torch.sigmoid(torch.tensor((s - top) / spread, dtype=torch.float64)).item() for s in centred]


def fisher_settings(params: dict[str, Any]) -> FisherSettings:
    return FisherSettings(params["fisher_samples"], params["fisher_length"], params["fisher_seed"])


def _mean_square(tensors: list[torch.Tensor]) -> float:
    count = sum(t.numel() for t in tensors)
    return sum(float(t.double().square().sum()) for t in tensors) / count if count else 0.0


def prepare(context: ModelContext, *, method: str, elementwise_fisher: bool) -> ModelPass:
    """Fisher of the base, per-layer ``‖δ_i^l‖²`` of each expert, and the ``α_{i,l}`` of Algorithm 1;
    ``elementwise_fisher`` (FIM-TIES) also hands each layer tensor its Fisher for the trim."""
    params = context.shared_params
    if context.base is None:
        raise RecipeError(f"method '{method}' needs a base_model to take the Fisher of; add one")
    reader = context.readers[context.base]
    fisher = context.fisher(context.base, fisher_settings(params))
    by_layer: dict[int, list[Any]] = {}
    for job in context.tensors:
        if job.info.is_matrix_in_layer:
            by_layer.setdefault(job.info.layer, []).append(job)
    if not by_layer:
        raise RecipeError(f"method '{method}' found no transformer-layer tensors in {reader.folder}; "
                          "use task_arithmetic or ties")
    layers = sorted(by_layer)
    layer_fisher = fisher.layer_scores({lay: [job.name for job in by_layer[lay]] for lay in layers})
    first = context.tensors[0]
    n_experts = len(first.experts)
    delta_sq = [[0.0] * n_experts for _ in layers]
    for row, lay in enumerate(layers):
        base = [reader.get(job.name).double() for job in by_layer[lay]]
        for i in range(n_experts):
            deltas = [context.read(job.experts[i]).double() - b for job, b in zip(by_layer[lay], base)]
            delta_sq[row][i] = _mean_square(deltas)
    mode = params["score"]
    experts = []
    for i in range(n_experts):
        importance = [(layer_fisher[lay] if mode != "norm" else 1.0) * (delta_sq[row][i] if mode != "fim" else 1.0)
                      for row, lay in enumerate(layers)]
        alphas = layer_alphas(importance)
        experts.append({"model": first.experts[i].model, "delta_sq": [d[i] for d in delta_sq],
                        "importance": importance, "alpha": alphas, "outside_alpha": statistics.fmean(alphas)})
    alpha_of = {lay: [e["alpha"][row] for e in experts] for row, lay in enumerate(layers)}
    outside = [e["outside_alpha"] for e in experts]
    extras: dict[str, dict[str, Any]] = {}
    stored = fisher.names()
    for job in context.tensors:
        entry: dict[str, Any] = {"fim_alpha": alpha_of.get(job.info.layer, outside)}
        if elementwise_fisher and job.info.layer is not None and job.name in stored:
            entry["fisher"] = fisher.stored(job.name)
        extras[job.name] = entry
    record = {
        "score": mode, "layers": layers, "fisher_layer": [layer_fisher[lay] for lay in layers], "experts": experts,
        "fisher": {"samples": fisher.settings.samples, "length": fisher.settings.length,
                   "seed": fisher.settings.seed, "seconds": fisher.seconds, "cached": fisher.cached,
                   "cache_file": str(fisher.path)},
    }
    return ModelPass(extras=extras, record=record)


def fim_ta(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """FIM-TA: ``θ = θ_0 + λ Σ_i w_i α_{i,l} δ_i`` with the per-layer ``α`` of ``layer_alphas`` (sec. 4.1)."""
    alphas = call.extras["fim_alpha"]
    weights = [w * a for w, a in zip(call.params["weight"], alphas)]
    scaled = replace(call, params={**call.params, "weight": weights, "normalize": False})
    merged = task_arithmetic_update(scaled).mul_(call.params["lambda"]).add_(call.base)
    return merged, {"fim_alpha": statistics.fmean(alphas)}


def fim_ties(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """FIM-TIES (Algorithm 1, steps 4-5): keep the top ``r`` of ``F ⊙ |δ_i|``, scale by ``α_{i,l}`` (times
    ``gate_factor`` on gate projections), elect signs, disjoint mean, ``θ = θ_0 + λ Δ``."""
    p = call.params
    factor = p["gate_factor"] if call.info.kind == "mlp_gate" else 1.0
    alphas = [a * factor for a in call.extras["fim_alpha"]]
    fisher = call.extras.get("fisher")
    trimmed = []
    for expert, alpha in zip(call.experts, alphas):
        delta = expert - call.base
        importance = delta.abs() if fisher is None else fisher.to(delta) * delta.abs()
        trimmed.append(delta.mul_(magnitude_mask(importance, p["density"])).mul_(alpha))
    update = disjoint_sum(trimmed, p["weight"], elect_sign(trimmed, p["sign_election"]), p["normalize"])
    kept = sum(int(t.count_nonzero()) for t in trimmed) / max(sum(t.numel() for t in trimmed), 1)
    return update.mul_(p["lambda"]).add_(call.base), {"fim_alpha": statistics.fmean(alphas), "fim_kept": kept}


def plot_alphas(record: dict[str, Any], path: str | Path) -> Path:
    """Per-layer ``α`` of each expert (the paper's Figure 2) from a ``mergelab.json`` dict, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prepared = record["prepare"]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for expert in prepared["experts"]:
        axes.plot(prepared["layers"], expert["alpha"], marker="o", label=Path(expert["model"]).name)
    axes.set_xlabel("layer")
    axes.set_ylabel("merging coefficient α")
    axes.set_title(f"FIM-Merging per-layer α (score: {prepared['score']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


CITATION = "FIM-Merging (data-free Fisher layer coefficients), Algorithm 1, Appendix B"
SPECS = (
    MethodSpec(name="fim_ta", fn=fim_ta, params=FIM_TA_PARAMS, citation=CITATION, base="required",
               elementwise=True, prepare=partial(prepare, method="fim_ta", elementwise_fisher=False),
               finish=calibrate, fisher_of=lambda params: "base"),
    MethodSpec(name="fim_ties", fn=fim_ties, params=FIM_TIES_PARAMS, citation=CITATION, base="required",
               prepare=partial(prepare, method="fim_ties", elementwise_fisher=True), finish=calibrate,
               fisher_of=lambda params: "base"),
)
