"""``evaluate``: accuracy, repetition, pass@k, self-consistency, length, entropy and perplexity of a model.

For every task: a greedy pass (accuracy, repetition rate, seq-rep-4, mean response length in tokens, mean
output entropy, and the answer-format rate where the task defines one) and, with ``n_samples > 1``, a sampled
pass (unbiased pass@k for k = 1, 2, 4, ... <= n, self-consistency majority vote over the n samples, and the
same stability figures). Optionally perplexity and mean predictive entropy on held-out text. The results are a
JSON-ready dict; ``format_table`` renders them for a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.errors import MergelabError
from mergelab.evaluation import answer_format, metrics
from mergelab.evaluation.generate import Generation, generate, load_model


def resolve_tasks(tasks: Sequence[Any]) -> list[Any]:
    """Task objects from names (looked up in ``mergelab.tasks.TASKS``, and ``gsm8k``: the held-out GSM8K
    questions, ``mergelab.evaluation.gsm8k.GSM8K``) or Task objects passed through."""
    names = [t for t in tasks if isinstance(t, str)]
    table: dict[str, Any] = {}
    if names:
        from mergelab.evaluation.gsm8k import GSM8K
        from mergelab.tasks import TASKS

        table = {**TASKS, GSM8K.name: GSM8K}
        unknown = [n for n in names if n not in table]
        if unknown:
            raise MergelabError(
                f"unknown task {', '.join(map(repr, unknown))}; valid tasks are: {', '.join(sorted(table))}."
            )
    return [table[t] if isinstance(t, str) else t for t in tasks]


def stability(task, generations: Sequence[Generation], examples: Sequence[Any]) -> dict[str, float]:
    """Accuracy and the stability figures of a flat list of generations aligned with ``examples``, and the share
    in the task's answer format ("format_rate") for a task that has one (``answer_format.FORMATS``: GSM8K)."""
    figures = {
        "accuracy": metrics.mean([float(task.score(g.text, e)) for g, e in zip(generations, examples, strict=True)]),
        **generation_figures(generations),
    }
    if task.name in answer_format.FORMATS:
        figures["format_rate"] = metrics.mean([float(answer_format.formatted(task.name, g.text))
                                               for g in generations])
    return figures


def generation_figures(generations: Sequence[Generation]) -> dict[str, float]:
    """The stability figures of a list of generations: repetition rate (``metrics.is_repetitive``), seq-rep-4,
    distinct-1 and distinct-2 (pooled), mean length in tokens, mean output entropy, share that hit the limit."""
    return {
        "repetition_rate": metrics.mean([float(metrics.is_repetitive(g.tokens, g.hit_limit)) for g in generations]),
        "seq_rep_4": metrics.mean([metrics.seq_rep_n(g.tokens, 4) for g in generations]),
        "distinct_1": metrics.distinct_n([g.tokens for g in generations], 1),
        "distinct_2": metrics.distinct_n([g.tokens for g in generations], 2),
        "mean_length": metrics.mean([float(len(g.tokens)) for g in generations]),
        "output_entropy": metrics.mean([g.entropy for g in generations]),
        "hit_limit_rate": metrics.mean([float(g.hit_limit) for g in generations]),
    }


def sampled_figures(task, samples: Sequence[Sequence[Generation]], examples: Sequence[Any]) -> dict[str, float]:
    """pass@k (Chen et al. 2021) and self-consistency accuracy (majority vote over the first k samples) for
    k = 1, 2, 4, ... <= n and k = n."""
    n = len(samples[0])
    correct = [sum(task.score(g.text, e) for g in gens) for gens, e in zip(samples, examples, strict=True)]
    ks = sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})
    figures = {f"pass@{k}": metrics.mean([metrics.pass_at_k(n, c, k) for c in correct]) for k in ks}
    for k in ks:
        figures[f"self_consistency@{k}"] = metrics.mean(
            [majority_correct(task, gens[:k], e) for gens, e in zip(samples, examples, strict=True)])
    return figures


def majority_correct(task, generations: Sequence[Generation], example: Any) -> float:
    """1.0 when the majority answer of ``generations`` (ties: the earliest) scores on ``example``."""
    answers = [task.extract(g.text) for g in generations]
    voted = metrics.majority_vote(answers)
    winner = next((g for g, a in zip(generations, answers, strict=True) if a == voted), generations[0])
    return float(task.score(winner.text, example))


@torch.no_grad()
def text_perplexity(
    model, tokenizer, texts: Sequence[str], max_length: int = 512, batch_size: int = 8
) -> dict[str, float]:
    """Perplexity and mean next-token entropy (nats) of the model on held-out ``texts``.

    Each text is truncated to ``max_length`` tokens; every token after the first is predicted from its
    prefix; padding is excluded. Perplexity = exp(total NLL / predicted tokens).
    """
    device = next(model.parameters()).device
    nll_sum, entropy_sum, n_tokens = 0.0, 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**enc, position_ids=positions).logits[:, :-1].double()
        targets = enc["input_ids"][:, 1:]
        mask = (enc["attention_mask"][:, 1:] * enc["attention_mask"][:, :-1]).bool()
        nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_sum += float(nll[mask].sum())
        entropy_sum += float(metrics.token_entropy(logits)[mask].sum())
        n_tokens += int(mask.sum())
    return {
        "perplexity": metrics.perplexity(nll_sum, n_tokens),
        "entropy": entropy_sum / n_tokens if n_tokens else math.nan,
        "n_tokens": n_tokens,
    }


def continuation_figures(model, tokenizer, texts: Sequence[str], prefix_tokens: int = 64,
                         max_new_tokens: int = 256, batch_size: int = 4, temperature: float = 0.0,
                         seed: int = 0) -> dict[str, float]:
    """Long continuations of held-out text: the first ``prefix_tokens`` tokens of each text are the prompt (no
    chat template), ``max_new_tokens`` are generated, greedily (``temperature`` 0) or sampled (seeded), and
    ``generation_figures`` summarises them (the setting where a merge's repetition collapse, SCF-RKL paper
    Fig. 1, would show)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:prefix_tokens] for t in texts]
    prompts = [tokenizer.decode(i) for i in ids]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        temperature=temperature, seed=seed)
    finally:
        tokenizer.padding_side = side
    return {**generation_figures([g[0] for g in gens]), "n_texts": len(texts), "max_new_tokens": max_new_tokens,
            "temperature": temperature}


def evaluate_loaded(
    model,
    tokenizer,
    tasks: Sequence[Any],
    *,
    n_items: int = 50,
    n_samples: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    split: str = "test",
    batch_size: int = 16,
    seed: int = 0,
    max_new_tokens: int | None = None,
    chat: bool = False,
    ppl_texts: Sequence[str] | None = None,
    keep_generations: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``evaluate`` on a model already in memory (used by the layer-blocking diagnostic)."""
    resolved = resolve_tasks(tasks)
    results: dict[str, Any] = {"tasks": {}}
    for task in resolved:
        examples = task.examples(split, n_items)
        prompts = [e.prompt for e in examples]
        limit = max_new_tokens or task.max_new_tokens
        passes = [("greedy", 1, 0.0)] + ([("sampled", n_samples, temperature)] if n_samples > 1 else [])
        task_result: dict[str, Any] = {"n_items": len(examples), "max_new_tokens": limit}
        for label, n, temp in passes:
            with tqdm(total=len(prompts), desc=f"{task.name} {label}", disable=not progress, leave=False) as bar:
                samples = generate(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=limit,
                    n_samples=n,
                    temperature=temp,
                    top_p=top_p,
                    batch_size=max(1, batch_size // n),
                    seed=seed,
                    chat=chat,
                    on_batch=bar.update,
                )
            flat = [g for gens in samples for g in gens]
            figures = stability(task, flat, [e for e in examples for _ in range(n)])
            if n > 1:
                figures.update(sampled_figures(task, samples, examples))
            if keep_generations:
                figures["generations"] = [
                    {"prompt": e.prompt, "answer": e.answer, "completions": [g.text for g in gens]}
                    for gens, e in zip(samples, examples, strict=True)
                ]
            task_result[label] = figures
        results["tasks"][task.name] = task_result
    if ppl_texts:
        results["heldout_text"] = text_perplexity(model, tokenizer, ppl_texts, batch_size=batch_size)
    return results


def evaluate(
    model_dir: str | Path,
    tasks: Sequence[Any],
    *,
    n_items: int = 50,
    n_samples: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate the model folder ``model_dir`` on ``tasks`` (names or Task objects); see the module doc.

    ``options`` go to ``evaluate_loaded``: temperature, top_p, split, batch_size, seed, max_new_tokens, chat,
    ppl_texts, keep_generations, progress.
    """
    resolved = resolve_tasks(tasks)  # bad task names fail before the model is loaded
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    results = evaluate_loaded(model, tokenizer, resolved, n_items=n_items, n_samples=n_samples, **options)
    settings = {
        "n_items": n_items,
        "n_samples": n_samples,
        "device": device,
        "dtype": str(dtype).split(".")[-1],
    }
    settings.update({k: v for k, v in options.items() if k not in ("ppl_texts", "progress")})
    return {"model": str(model_dir), "settings": settings, **results}


def format_table(results: dict[str, Any]) -> str:
    """A fixed-width table of the headline figures: one row per task and pass."""
    header = ["task", "pass", "n", "acc", "format", "rep", "seq-rep-4", "len", "entropy", "pass@1", "pass@n",
              "maj@n"]
    rows = [header]
    for name, task in results["tasks"].items():
        for label in ("greedy", "sampled"):
            if label not in task:
                continue
            f = task[label]
            n_key = max((k for k in f if k.startswith("pass@")), key=lambda k: int(k[5:]), default=None)
            maj = f.get(f"self_consistency@{n_key[5:]}") if n_key else None
            rows.append(
                [
                    name,
                    label,
                    str(task["n_items"]),
                    _fmt(f["accuracy"]),
                    _fmt(f.get("format_rate")),
                    _fmt(f["repetition_rate"]),
                    _fmt(f["seq_rep_4"]),
                    f"{f['mean_length']:.1f}",
                    _fmt(f["output_entropy"]),
                    _fmt(f.get("pass@1")),
                    _fmt(f.get(n_key) if n_key else None),
                    _fmt(maj),
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "heldout_text" in results:
        h = results["heldout_text"]
        lines.append(
            f"held-out text: perplexity {h['perplexity']:.3f}, entropy {h['entropy']:.3f} nats, {h['n_tokens']} tokens"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
