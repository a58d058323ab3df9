"""Layer blocking ([Lin2026] Appendix A.4, Fig. 11): restore one layer of the merge to the base at a time
and report the change of a task score relative to the unmodified merge (negative: the merged layer helped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.checkpoint.layout import layer_index
from mergelab.checkpoint.reader import open_model
from mergelab.evaluation.generate import load_model
from mergelab.evaluation.runner import evaluate_loaded, resolve_tasks


@torch.no_grad()
def layer_blocking(
    merged: str | Path,
    base: str | Path,
    task: Any,
    *,
    layers: Sequence[int] | None = None,
    n_items: int = 20,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **eval_options: Any,
) -> dict[str, Any]:
    """Greedy accuracy of the merge on ``task`` and its change with each layer in ``layers`` (default all)
    restored to ``base``. ``eval_options`` go to ``evaluate_loaded`` (batch_size, max_new_tokens, chat...)."""
    (resolved,) = resolve_tasks([task])
    model, tokenizer = load_model(merged, device=device, dtype=dtype)
    base_reader = open_model(base)
    params = dict(model.named_parameters())

    def score() -> float:
        result = evaluate_loaded(model, tokenizer, [resolved], n_items=n_items, progress=False, **eval_options)
        return result["tasks"][resolved.name]["greedy"]["accuracy"]

    merged_score = score()
    depth = model.config.num_hidden_layers
    changes: dict[str, float] = {}
    for layer in tqdm(
        list(range(depth)) if layers is None else list(layers), desc="layer blocking", disable=not progress
    ):
        names = [n for n in params if layer_index(n) == layer]
        fused = {n: params[n].detach().clone() for n in names}
        for n in names:
            params[n].copy_(base_reader.get(n).to(params[n]))
        changes[str(layer)] = score() - merged_score
        for n in names:
            params[n].copy_(fused[n])
    return {"task": resolved.name, "n_items": n_items, "merged_score": merged_score, "score_change": changes}
