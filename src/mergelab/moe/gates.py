"""Router rows of a Mixtral-style MoE: one row per expert and layer, so that ``logits = W_gate h`` is largest for
the expert whose prompts look most like ``h``.

For each expert ``e`` and layer ``l``, ``mu_e`` is the mean, over every token of the expert's positive prompts,
of a representation of the token at the router's input; ``nu_e`` the same over its negative prompts. With
``c = mean_e mu_e`` (what all experts' prompts share, which would otherwise dominate every row), the row is

    w_e = unit(unit(mu_e - c) - unit(nu_e - c))       (the negative term only when negatives are given)

so ``w_e . h`` ranks experts by how far ``h`` lies on the side of the expert's prompt mean (a nearest-class-mean
discriminant). The representation is, per ``gate_mode``:

- ``hidden``: the real router input, the output of layer ``l``'s ``post_attention_layernorm`` with the base
  model run on the prompt (captured with a forward pre-hook on the layer's MLP);
- ``cheap_embed``: the token's input embedding, RMS-normalised and scaled by layer ``l``'s
  ``post_attention_layernorm`` weight (no forward pass);
- ``random``: rows drawn from N(0, 1/hidden) with the config's seed (prompts unused).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab.checkpoint.reader import ModelReader
from mergelab.errors import CheckpointError

NORM_NAME = "model.layers.{}.post_attention_layernorm.weight"


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise CheckpointError(f"{folder} has no tokenizer, which the prompts of gate_mode 'hidden' and "
                              "'cheap_embed' need; add tokenizer files to the base or use gate_mode: random") from None


def hidden_means(base_folder: Path, prompt_sets: list[list[str]], layers: int) -> torch.Tensor:
    """``[sets, layers, hidden]``: the mean router input of every token of each prompt set, base model run."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0].double()))
             for layer in model.model.layers[:layers]]
    try:
        means = []
        for prompts in prompt_sets:
            sums = None
            tokens = 0
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                captured.clear()
                with torch.no_grad():
                    model(ids)
                per_layer = torch.stack([c.sum(0) for c in captured])
                sums = per_layer if sums is None else sums + per_layer
                tokens += ids.shape[1]
            means.append(sums / tokens)
        return torch.stack(means)
    finally:
        for hook in hooks:
            hook.remove()


def embed_means(base_folder: Path, base: ModelReader, prompt_sets: list[list[str]], layers: int,
                eps: float) -> torch.Tensor:
    """``[sets, layers, hidden]``: the mean RMS-normalised embedding of each set's tokens times each layer's
    ``post_attention_layernorm`` weight."""
    tokenizer = _tokenizer(base_folder)
    embeddings = base.get("model.embed_tokens.weight")
    norms = torch.stack([base.get(NORM_NAME.format(lay)).double() for lay in range(layers)])
    means = []
    for prompts in prompt_sets:
        ids = torch.cat([tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts])
        rows = embeddings[ids].double()
        normalised = rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + eps)
        means.append(normalised.mean(0)[None, :] * norms)
    return torch.stack(means)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def discriminant_rows(positive: torch.Tensor, negative: list[torch.Tensor | None]) -> torch.Tensor:
    """``[layers, experts, hidden]`` router rows from each expert's ``[layers, hidden]`` prompt means
    (``positive`` stacked as ``[experts, layers, hidden]``; ``negative[e]`` None without negative prompts)."""
    centre = positive.mean(0)
    axis = _unit(centre)
    rows = []
    for e, mean in enumerate(positive):
        row = _unit(mean - centre)
        if negative[e] is not None:
            row = _unit(row - _unit(negative[e] - centre))
        rows.append(_unit(row - (row * axis).sum(-1, keepdim=True) * axis))
    return torch.stack(rows, 1)


def random_rows(layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    """``[layers, experts, hidden]`` rows from N(0, 1/hidden), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, experts, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5
