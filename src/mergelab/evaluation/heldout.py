"""Held-out text figures of one model per text domain of the smollm2 zoo: perplexity and long continuations.

For each domain (``mergelab.zoo.smollm2.TEXT_DOMAINS``) the texts are the zoo's held-out chunks of that domain
(``smollm2.heldout_texts``: ``test`` files by ``split_of``, never trained on by any zoo member). Measured:
perplexity and mean predictive entropy (``runner.text_perplexity``, texts truncated to ``ppl_tokens``) and
continuations of ``new_tokens`` tokens from each text's first 64 tokens (``runner.continuation_figures``:
repetition rate, seq-rep-4, distinct-1/2, output entropy, length), greedy and sampled at ``SAMPLING_TEMPERATURE``.
Both are kept because the converted SmolLM2-135M-Instruct base already loops in 75-100 % of its greedy
continuations of raw text (docs/ZOO.md): greedy repetition is at its ceiling there, sampled repetition is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLING_TEMPERATURE = 0.7


def domain_figures(model_dir: str | Path, size: str, domains: list[str], n_texts: int | None = None,
                   new_tokens: int = 256, continuations: bool = True,
                   device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Domain -> {"perplexity", "continuation", "continuation_sampled"} of the model folder ``model_dir`` (only
    "perplexity" without ``continuations``); the texts are those of the smollm2 zoo at ``size`` (the first
    ``n_texts`` of them when given)."""
    from mergelab.evaluation.generate import load_model
    from mergelab.evaluation.runner import continuation_figures, text_perplexity
    from mergelab.zoo.smollm2 import SIZES, heldout_texts

    settings = SIZES[size]
    model, tokenizer = load_model(model_dir, device=device)
    out = {}
    for domain in domains:
        texts = heldout_texts(domain, settings)[:n_texts]
        out[domain] = {
            "perplexity": text_perplexity(model, tokenizer, texts, max_length=settings["ppl_tokens"], batch_size=4)}
        if continuations:
            out[domain]["continuation"] = continuation_figures(model, tokenizer, texts, max_new_tokens=new_tokens)
            out[domain]["continuation_sampled"] = continuation_figures(
                model, tokenizer, texts, max_new_tokens=new_tokens, temperature=SAMPLING_TEMPERATURE)
    return out
