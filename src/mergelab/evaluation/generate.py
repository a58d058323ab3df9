"""Batched generation through transformers: left padding, KV cache, greedy or sampled.

One call generates for many prompts in batches of ``batch_size`` prompt rows; sampled generation draws
``n_samples`` continuations per prompt (``num_return_sequences``). Each continuation comes back as its text,
its token ids (up to but excluding the first end-of-sequence token), whether it hit the token limit, and the
mean entropy of the model's next-token distribution over the generated positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.errors import CheckpointError
from mergelab.evaluation.metrics import token_entropy


@dataclass(frozen=True)
class Generation:
    """One continuation of one prompt."""

    text: str
    tokens: tuple[int, ...]
    hit_limit: bool
    entropy: float


def load_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a Hugging Face folder, in eval mode, tokenizer left-padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model drowns the evaluation's own
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: give a Hugging Face model folder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{folder} has no usable tokenizer files (transformers cannot load one from it); copy the parent "
            "model's tokenizer files into it."
        ) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a generation, from the generation config and the tokenizer."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as given, or wrapped in the tokenizer's chat template as a single user turn."""
    if not chat:
        return prompt
    if tokenizer.chat_template is None:
        raise CheckpointError("the model's tokenizer has no chat template; run without --chat.")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    chat: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[Generation]]:
    """Generate ``n_samples`` continuations per prompt; ``temperature == 0`` is greedy (then n_samples is 1).

    Sampling is seeded per batch (``seed + batch index``), so results are reproducible for a fixed batch size.
    ``on_batch(n_prompts_done)`` is called after each batch (progress bars).
    """
    if temperature == 0.0 and n_samples != 1:
        raise ValueError("greedy generation (temperature 0) gives one continuation per prompt; set n_samples=1")
    stop = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    results: list[list[Generation]] = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        texts = [format_prompt(tokenizer, p, chat) for p in prompts[start : start + batch_size]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
        torch.manual_seed(seed + batch_index)
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(stop) or None,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
            **sampling,
        )
        new_tokens = out.sequences[:, encoded["input_ids"].shape[1] :].tolist()
        entropies = token_entropy(torch.stack(out.logits, dim=1))  # (rows, steps)
        rows = []
        for row, tokens in enumerate(new_tokens):
            end = next((i for i, t in enumerate(tokens) if t in stop), None)
            kept = tokens if end is None else tokens[:end]
            steps = len(tokens) if end is None else end + 1  # the step that produced EOS is a prediction too
            rows.append(
                Generation(
                    text=tokenizer.decode(kept, skip_special_tokens=True),
                    tokens=tuple(kept),
                    hit_limit=end is None,
                    entropy=float(entropies[row, :steps].mean()),
                )
            )
        results.extend(rows[i : i + n_samples] for i in range(0, len(rows), n_samples))
        if on_batch is not None:
            on_batch(len(texts))
    return results
