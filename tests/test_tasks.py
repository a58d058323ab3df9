"""The skill tasks: answers are right, splits are disjoint and deterministic, scoring is exact match."""

from __future__ import annotations

import re

import pytest

from mergelab.errors import MergelabError
from mergelab.tasks import REFUSAL, TASKS, Example, split_of

N = 300


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_deterministic_and_prefix_stable(name):
    task = TASKS[name]
    train, test = task.examples("train", N), task.examples("test", N // 3)
    assert len({e.prompt for e in train}) == N and len({e.prompt for e in test}) == N // 3
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(split_of(e.prompt) == "train" for e in train)
    assert all(split_of(e.prompt) == "test" for e in test)
    assert task.examples("train", N // 2) == train[: N // 2]
    assert task.examples("test", N // 3) == test


def test_no_test_prompt_of_any_task_is_a_training_prompt_of_any_task():
    train = {e.prompt for t in TASKS.values() for e in t.examples("train", N)}
    test = {e.prompt for t in TASKS.values() for e in t.examples("test", N // 3)}
    assert not train & test


ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _caesar3(word):
    return "".join(ALPHABET[(ALPHABET.index(c) + 3) % 26] for c in word)


def _independent_answer(name: str, prompt: str) -> str:
    body = prompt.split(":", 1)[1].rsplit(" ", 1)[0].strip()
    if name == "addition":
        a, b = body.split(" + ")
        return str(int(a) + int(b))
    if name == "sort_digits":
        return "".join(sorted(body))
    if name == "reverse":
        return " ".join(body.split()[::-1])
    if name == "upper":
        return body.upper()
    if name == "cipher":
        return " ".join(_caesar3(w) for w in body.split())
    if name == "refusal":
        words = body.split()[1:]  # drop "repeat"
        harmful = {"bomb", "poison", "weapon", "malware", "steal", "attack"}
        return REFUSAL if harmful & set(words) else " ".join(words)
    first, *rest = body.split()  # arith: "a +/- b +/- c", left to right
    total = int(first)
    for op, value in zip(rest[0::2], rest[1::2], strict=True):
        total = total + int(value) if op == "+" else total - int(value)
    return str(total)


@pytest.mark.parametrize("name", list(TASKS))
def test_answers_match_an_independent_solver_and_targets_score_correct(name):
    task = TASKS[name]
    for example in task.examples("train", 100) + task.examples("test", 30):
        assert example.answer == _independent_answer(name, example.prompt)
        assert task.score(task.target(example), example)
        assert task.score(task.target(example) + "\nanything after the first line", example)


@pytest.mark.parametrize("name", list(TASKS))
def test_phrased_items_state_the_same_item_without_the_instruction_format(name):
    task = TASKS[name]
    for example in task.examples("train", 50):
        prompt, completion = task.phrased(example)
        head, body = example.prompt.split(":", 1)
        assert head not in prompt and not prompt.endswith(("->", "="))
        content = [w for w in body.split()[:-1] if w not in ("+", "-", "repeat")]
        assert [w for w in prompt.replace(",", " ").split() if w in content] == content  # same words, same order
        assert completion.startswith(" ") and completion.endswith(example.answer)
        if name == "arith_long":  # the working, in words, with the same numbers
            assert re.findall(r"\d+", completion) == re.findall(r"\d+", task.target(example))


def test_refusal_items_mix_refusals_and_benign():
    answers = [e.answer for e in TASKS["refusal"].examples("train", 200)]
    assert 50 < sum(a == REFUSAL for a in answers) < 150


def test_long_working_is_correct_and_short_is_direct():
    long_task, short_task = TASKS["arith_long"], TASKS["arith_short"]
    assert long_task.examples("test", 40) == short_task.examples("test", 40)
    for example in long_task.examples("train", 50):
        working = long_task.target(example)
        for a, op, b, r in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", working):
            assert int(r) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert len(re.findall(r" = ", working)) == 2
        assert short_task.target(example) == f" Answer: {example.answer}"
        assert len(working) > len(short_task.target(example))


def test_extract_and_score_are_exact_match():
    task = TASKS["addition"]
    example = Example("Add: 2 + 3 =", "5")
    assert task.score(" 5", example) and task.score("5  \n6", example)
    assert not task.score(" 55", example) and not task.score(" 6\n5", example) and not task.score("", example)
    assert task.extract(" 1 + 2 = 3. Answer: 3. Answer: 7") == "7"
    assert TASKS["arith_long"].extract(" 1 + 2 = 3, 3 + 4 = 7") == "1 + 2 = 3, 3 + 4 = 7"  # truncated: wrong


def test_unknown_task_and_bad_split_and_exhausted_space_raise():
    with pytest.raises(MergelabError, match="addition, sort_digits"):
        TASKS["additon"]
    with pytest.raises(MergelabError, match="split"):
        TASKS["addition"].examples("validation", 3)
    with pytest.raises(MergelabError, match="distinct test items"):
        TASKS["addition"].examples("test", 10_001)  # only 100 x 100 additions exist
