"""Function-space diagnostics of a merge on probe inputs (seeded random tokens, or tokenised prompts).

For the merged model and each parent, from forward hooks on the decoder layers (the residual stream after
each layer, padding excluded):

* activation variance per layer: the mean over features of the per-feature variance across probe tokens;
* effective rank of the activation covariance (Roy and Vetterli 2007, as in [Wang2026] Fig. 2):
  ``exp(-sum p_i log p_i)`` with ``p_i = lambda_i / sum lambda`` its eigenvalues;
* numerical rank: eigenvalues above ``rtol * lambda_max``, ``rtol = max(tokens, features) * eps(float32)``
  by default (numpy's matrix_rank rule on the centred activations, in the dtype the model ran in);
* next-token entropy of each model, and KL between the merged and each parent's next-token distribution
  in both directions ([Lin2026] Theorem 3.1 bounds ``KL(base || merged)``);
* the NL score per layer ([FIMMerging] eq. 19): with ``delta^l`` a task vector restricted to layer l and
  ``alpha = 0.5``, ``||f(theta0 + alpha delta^l) - [f(theta0) + alpha (f(theta0 + delta^l) - f(theta0))]||_2
  / ||f(theta0 + delta^l) - f(theta0)||_2`` with f the output logits of one probe sequence, averaged over
  the probes; computed for each expert's task vector and for the merge's own update;
* optionally the same score of the whole task vector at several strengths ``alpha``: how far Task
  Arithmetic's output is from linear in its coefficient.

Models are loaded one at a time; only the probe logits of the merged model are kept across models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.checkpoint.layout import layer_index
from mergelab.checkpoint.reader import open_model
from mergelab.diagnostics.weights import model_labels
from mergelab.errors import CompatibilityError
from mergelab.evaluation.metrics import kl_divergence, token_entropy

ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised non-negative eigenvalues (Roy and Vetterli 2007)."""
    positive = eigenvalues.double().clamp(min=0.0)
    p = positive / positive.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def numerical_rank(eigenvalues: torch.Tensor, rtol: float) -> int:
    """Number of eigenvalues above ``rtol`` times the largest."""
    return int((eigenvalues > rtol * eigenvalues.max()).sum())


def activation_statistics(activations: torch.Tensor, rtol: float | None = None) -> dict[str, float]:
    """Variance, effective rank and numerical rank of ``activations`` (tokens x features), see module doc."""
    x = activations.double()
    centred = x - x.mean(dim=0)
    covariance = centred.T @ centred / max(x.shape[0] - 1, 1)
    eigenvalues = torch.linalg.eigvalsh(covariance)
    if rtol is None:
        rtol = max(x.shape) * torch.finfo(activations.dtype).eps
    return {
        "variance": float(x.var(dim=0).mean()),
        "effective_rank": effective_rank(eigenvalues),
        "numerical_rank": numerical_rank(eigenvalues, rtol),
    }


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of transformer layers (the one whose length is the config's layer count)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise CompatibilityError(f"cannot find the {count} decoder layers of {type(model).__name__}.")


def random_probes(vocab_size: int, n_probes: int, length: int, seed: int) -> torch.Tensor:
    """Seeded uniform random token ids, ``n_probes x length`` (the data-free probes of [FIMMerging] sec. 3.2, eq. 7)."""
    return torch.randint(0, vocab_size, (n_probes, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_probes(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the probes and each decoder layer's output at the non-padding positions."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in decoder_layers(model)
    ]
    try:
        device = next(model.parameters()).device
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=positions.to(device),
            )
            .logits.float()
            .cpu()
        )
    finally:
        for hook in hooks:
            hook.remove()
    keep = attention_mask.bool()
    return logits, [h.float().cpu()[keep] for h in captured]


def load_causal_lm(folder: str | Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def check_same_architecture(folders: Sequence[str | Path]) -> None:
    """CompatibilityError when the configs of the models differ in architecture."""
    configs = [open_model(f).config for f in folders]
    for folder, config in zip(folders[1:], configs[1:], strict=True):
        for key in ARCH_KEYS:
            if config.get(key) != configs[0].get(key):
                raise CompatibilityError(
                    f"{folder} has {key}={config.get(key)!r} but {folders[0]} has "
                    f"{configs[0].get(key)!r}: diagnose needs models of one architecture."
                )


@torch.no_grad()
def nl_score(base_model, deltas: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
             alpha: float, base_logits: torch.Tensor) -> float:
    """NL score ([FIMMerging] eq. 19) of one update ``deltas`` (parameter name -> tensor) added to the base at
    strength ``alpha``, averaged over the probes; ``base_logits`` are the base's probe logits. The base's
    parameters are restored afterwards."""
    params = dict(base_model.named_parameters())
    names = [n for n in deltas if n in params]
    original = {n: params[n].detach().clone() for n in names}
    outputs = []
    try:
        for scale in (1.0, alpha):
            for n in names:
                params[n].copy_(original[n] + scale * deltas[n].to(params[n]))
            outputs.append(run_probes(base_model, input_ids, attention_mask)[0])
    finally:
        for n in names:
            params[n].copy_(original[n])
    f1, fa = (o.double().flatten(1) for o in outputs)
    base_out = base_logits.double().flatten(1)
    residual = torch.linalg.vector_norm(fa - (base_out + alpha * (f1 - base_out)), dim=1)
    spread = torch.linalg.vector_norm(f1 - base_out, dim=1)
    ratio = residual / spread
    return float(ratio[spread > 0].mean()) if bool((spread > 0).any()) else math.nan


@torch.no_grad()
def nl_scores(
    base_model,
    layer_deltas: Callable[[int], dict[str, torch.Tensor]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    alpha: float = 0.5,
) -> dict[str, float]:
    """NL score ([FIMMerging] eq. 19) per layer of a task vector on the base; ``layer_deltas(l)`` gives the task
    vector's tensors of layer ``l`` (name -> tensor), so only one layer's delta is held at a time."""
    f0, _ = run_probes(base_model, input_ids, attention_mask)
    return {str(layer): nl_score(base_model, layer_deltas(layer), input_ids, attention_mask, alpha, f0)
            for layer in layers}


def whole_model_nl(base_model, deltas: dict[str, torch.Tensor], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, alphas: Sequence[float]) -> dict[str, float]:
    """The NL score ([FIMMerging] eq. 19) of the whole task vector at each strength of ``alphas``: how far Task
    Arithmetic's output at ``theta0 + alpha delta`` is from the linear interpolation of the base's and the
    expert's outputs."""
    f0, _ = run_probes(base_model, input_ids, attention_mask)
    return {str(alpha): nl_score(base_model, deltas, input_ids, attention_mask, alpha, f0) for alpha in alphas}


def activation_diagnostics(
    merged: str | Path,
    base: str | Path,
    experts: Sequence[str | Path],
    *,
    n_probes: int = 8,
    probe_length: int = 32,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    nl_layers: Sequence[int] | None = None,
    alpha: float = 0.5,
    whole_alphas: Sequence[float] = (),
    rtol: float | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, Any]:
    """All function-space diagnostics (see the module doc). Probes are ``n_probes`` random sequences of
    ``probe_length`` tokens, or ``prompts`` tokenised with the merged model's tokenizer (right padding,
    truncated to ``probe_length``). ``nl_layers``: layers for the NL score (default all; [] skips it);
    ``whole_alphas``: strengths at which the whole task vector's NL score is also computed (none by default)."""
    folders = {"merged": merged, "base": base, **dict(zip(model_labels(experts), experts, strict=True))}
    check_same_architecture(list(folders.values()))
    config = open_model(merged).config
    if prompts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=probe_length)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    else:
        input_ids = random_probes(config["vocab_size"], n_probes, probe_length, seed)
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()

    per_model: dict[str, Any] = {}
    merged_logits: torch.Tensor | None = None
    for label, folder in tqdm(folders.items(), desc="activations", disable=not progress):
        model = load_causal_lm(folder, device, dtype)
        logits, hidden = run_probes(model, input_ids, attention_mask)
        stats = [activation_statistics(h, rtol) for h in hidden]
        entry: dict[str, Any] = {
            "next_token_entropy": float(token_entropy(logits[keep]).mean()),
            "per_layer": {key: [s[key] for s in stats] for key in ("variance", "effective_rank", "numerical_rank")},
        }
        if merged_logits is None:
            merged_logits = logits[keep]
        else:
            entry["kl_parent_to_merged"] = float(kl_divergence(logits[keep], merged_logits).mean())
            entry["kl_merged_to_parent"] = float(kl_divergence(merged_logits, logits[keep]).mean())
        per_model[label] = entry
        del model

    nl: dict[str, Any] = {}
    whole: dict[str, Any] = {}
    layers = list(range(config["num_hidden_layers"])) if nl_layers is None else list(nl_layers)
    if layers or whole_alphas:
        base_model = load_causal_lm(base, device, dtype)
        base_reader = open_model(base)
        for label, folder in tqdm(
            [(k, v) for k, v in folders.items() if k != "base"], desc="NL score", disable=not progress
        ):
            reader = open_model(folder)

            def deltas(keep: Callable[[str], bool], reader=reader) -> dict[str, torch.Tensor]:
                return {n: reader.get(n).double() - base_reader.get(n).double() for n in base_reader.names
                        if keep(n)}

            if layers:
                nl[label] = nl_scores(base_model, lambda layer: deltas(lambda n: layer_index(n) == layer),
                                      input_ids, attention_mask, layers, alpha)
            if whole_alphas:
                whole[label] = whole_model_nl(base_model, deltas(lambda n: True), input_ids, attention_mask,
                                              whole_alphas)
    return {
        "probes": {
            "kind": "prompts" if prompts else "random",
            "n": int(input_ids.shape[0]),
            "length": int(input_ids.shape[1]),
            "tokens": int(keep.sum()),
            "seed": seed,
        },
        "models": per_model,
        "nl_score": nl,
        "nl_score_whole": whole,
        "settings": {"alpha": alpha, "nl_layers": layers, "whole_alphas": list(whole_alphas), "rtol": rtol},
    }
