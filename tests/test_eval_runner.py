"""Batched generation and the evaluate runner on a tiny random Llama with a character-level tokenizer.

The reference is a plain greedy loop written here: one prompt at a time, no padding, no KV cache, the whole
sequence re-run at every step. Models are float64 so that batched and unbatched arithmetic agree exactly.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tinymodels import make_base

from mergelab.errors import CheckpointError, MergelabError
from mergelab.evaluation import metrics
from mergelab.evaluation.generate import generate, load_model
from mergelab.evaluation.runner import evaluate, evaluate_loaded, format_table, resolve_tasks, text_perplexity

SPECIALS = ["<pad>", "<eos>", "<unk>"]


def save_char_tokenizer(folder: Path) -> Path:
    """A character-level tokenizer over printable ASCII (98 ids) saved into ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def make_char_model(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float64) -> Path:
    """A tiny random Llama (vocab 100) with the character tokenizer: a complete folder for ``evaluate``."""
    make_base(folder, vocab=100, seed=seed, dtype=dtype)
    return save_char_tokenizer(folder)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class FixedTask:
    """A task following the mergelab.tasks.Task shape with a fixed list of examples."""

    name: str
    items: tuple[Example, ...]
    max_new_tokens: int = 8
    description: str = "test task"

    def examples(self, split: str, n: int) -> list[Example]:
        return list(self.items[:n])

    def extract(self, completion: str) -> str:
        return completion.strip()[:2]

    def score(self, completion: str, example: Example) -> bool:
        return self.extract(completion) == example.answer


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    folder = make_char_model(tmp_path_factory.mktemp("evalmodel") / "model")
    model, tokenizer = load_model(folder, dtype=torch.float64)
    return folder, model, tokenizer


def reference_greedy(model, tokenizer, prompt: str, steps: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """Greedy decoding without cache or padding, and the entropy of each prediction made."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out, entropies = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids).logits[0, -1]
            entropies.append(float(metrics.token_entropy(logits)))
            nxt = int(logits.argmax())
            if nxt in stop:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, entropies


PROMPTS = ["12+7=", "a", "the quick brown fox=", "zz"]


def test_batched_greedy_matches_a_plain_loop(char_model):
    _, model, tokenizer = char_model
    gens = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    for prompt, (gen,) in zip(PROMPTS, gens, strict=True):
        tokens, entropies = reference_greedy(model, tokenizer, prompt, 10, {tokenizer.eos_token_id})
        assert list(gen.tokens) == tokens
        assert gen.hit_limit == (len(tokens) == 10)
        assert gen.text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert gen.entropy == pytest.approx(sum(entropies) / len(entropies), rel=1e-9)


def test_generation_stops_at_an_end_token(char_model):
    _, model, tokenizer = char_model
    free, _ = reference_greedy(model, tokenizer, PROMPTS[0], 10, set())
    stop_token = free[3]  # the 4th greedy token becomes an end token: generation must stop before it
    first = free.index(stop_token)
    model.generation_config.eos_token_id = stop_token
    try:
        ((gen,),) = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = None
    assert list(gen.tokens) == free[:first]
    assert not gen.hit_limit


def test_sampling_is_seeded_and_greedy_refuses_many_samples(char_model):
    _, model, tokenizer = char_model
    one = generate(model, tokenizer, PROMPTS, max_new_tokens=6, n_samples=3, temperature=1.0, seed=5)
    two = generate(model, tokenizer, PROMPTS, max_new_tokens=6, n_samples=3, temperature=1.0, seed=5)
    assert [[g.tokens for g in s] for s in one] == [[g.tokens for g in s] for s in two]
    assert all(len(s) == 3 for s in one)
    with pytest.raises(ValueError, match="n_samples"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=6, n_samples=2)


def test_evaluate_accuracy_pass_at_k_and_self_consistency(char_model):
    folder, model, tokenizer = char_model
    # answers: the true greedy continuation (first two characters) for half the items, a wrong one otherwise
    items = []
    for i, prompt in enumerate(PROMPTS):
        tokens, _ = reference_greedy(model, tokenizer, prompt, 8, {tokenizer.eos_token_id})
        truth = tokenizer.decode(tokens).strip()[:2]
        items.append(Example(prompt, truth if i % 2 == 0 else "\x00\x00"))
    task = FixedTask("fixed", tuple(items))
    result = evaluate(
        folder,
        [task],
        n_items=4,
        n_samples=4,
        temperature=1.5,
        seed=3,
        dtype=torch.float64,
        keep_generations=True,
        progress=False,
    )
    figures = result["tasks"]["fixed"]
    assert figures["greedy"]["accuracy"] == pytest.approx(0.5)
    sampled = figures["sampled"]
    correct = [
        sum(task.score(c, Example(g["prompt"], g["answer"])) for c in g["completions"]) for g in sampled["generations"]
    ]
    for k in (1, 2, 4):
        expected = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in correct) / 4
        assert sampled[f"pass@{k}"] == pytest.approx(expected)
    for k in (1, 2, 4):  # majority over the first k samples; ties go to the earliest answer
        votes = []
        for g in sampled["generations"]:
            answers = [task.extract(c) for c in g["completions"][:k]]
            counts = Counter(a for a in answers if a)
            top = max(counts.values()) if counts else 0
            winner = next((a for a in answers if a and counts[a] == top), "")
            votes.append(winner == g["answer"])
        assert sampled[f"self_consistency@{k}"] == pytest.approx(sum(votes) / 4)
    assert 0 <= sampled["repetition_rate"] <= 1 and sampled["mean_length"] <= 8
    table = format_table(result)
    assert "fixed" in table and "sampled" in table


def test_text_perplexity_matches_unpadded_scoring(char_model):
    _, model, tokenizer = char_model
    texts = ["hello world", "ab", "a much longer sentence than the others"]
    got = text_perplexity(model, tokenizer, texts, batch_size=3)
    nll, ent, count = 0.0, 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            ent -= float((logp.exp() * logp).sum())
            count += ids.shape[1] - 1
    assert got["n_tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert got["entropy"] == pytest.approx(ent / count, rel=1e-9)


def test_evaluate_loaded_reports_heldout_text(char_model):
    _, model, tokenizer = char_model
    task = FixedTask("fixed", (Example("a", "b"),))
    result = evaluate_loaded(model, tokenizer, [task], n_items=1, ppl_texts=["some text"], progress=False)
    assert result["heldout_text"]["n_tokens"] == len("some text") - 1
    assert "perplexity" in format_table(result)


def test_bad_inputs_give_clear_errors(tmp_path):
    tasks_module = pytest.importorskip("mergelab.tasks")
    with pytest.raises(MergelabError, match=sorted(tasks_module.TASKS)[0]):
        resolve_tasks(["no_such_task"])
    no_tokenizer = make_base(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(no_tokenizer)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
