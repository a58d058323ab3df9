"""Generation metrics on hand-made strings and against closed forms written here in numpy / math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.evaluation import metrics


def words(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize(
    ("text", "period"),
    [("abcabcabc", 3), ("abab", 2), ("aaaa", 1), ("abcabcabd", None), ("ab", None), ("xyzxyzx", 3)],
)
def test_periodic_tail_on_characters(text, period):
    assert metrics.periodic_tail(list(text)) == period


def test_periodic_tail_respects_max_period():
    loop = list("abcdef" * 3)
    assert metrics.periodic_tail(loop, max_period=6) == 6
    assert metrics.periodic_tail(loop, max_period=5) is None


def test_repeated_ngram_coverage_hand_counted():
    # 3-grams: (the cat sat) twice at 0 and 3; three others once -> positions 0..5 covered, 'on' not: 6/7
    assert metrics.repeated_ngram_coverage(words("the cat sat the cat sat on"), n=3) == pytest.approx(6 / 7)
    assert metrics.repeated_ngram_coverage(words("one two three four five six"), n=2) == 0.0
    assert metrics.repeated_ngram_coverage(words("too short"), n=3) == 0.0


def test_is_repetitive_needs_the_token_limit():
    loop = words("so the answer is so the answer is so the answer is so the answer is")
    assert metrics.is_repetitive(loop, hit_limit=True)
    assert not metrics.is_repetitive(loop, hit_limit=False)


def test_is_repetitive_on_crafted_generations():
    prose = words("we add the two numbers carry the one and write down the final answer which is forty two")
    assert not metrics.is_repetitive(prose, hit_limit=True)
    # good start, then a loop that fills the last 64 tokens: only the tail matters
    looping_tail = prose + words("and then " * 40)
    assert metrics.is_repetitive(looping_tail, hit_limit=True)
    # a loop whose period (20 words) exceeds max_period is still caught by n-gram coverage
    long_period = words(" ".join(f"w{i}" for i in range(20)) + " ") * 4
    assert metrics.periodic_tail(long_period[-64:]) is None
    assert metrics.is_repetitive(long_period, hit_limit=True)
    # a loop with a counter: 8 chunks of 8 words. Every 4-gram holding a counter i is unique, so the 8
    # counters are uncovered, and so is the first 'step' (later ones sit in the repeated 'I think that step'):
    # coverage 55/64, not periodic, repetitive at the default 0.8 threshold but not at 0.9
    varying = words(" ".join(f"step {i} I think that I think that" for i in range(8)))
    assert metrics.periodic_tail(varying) is None
    assert metrics.repeated_ngram_coverage(varying, 4) == pytest.approx(55 / 64)
    assert metrics.is_repetitive(varying, hit_limit=True)
    assert not metrics.is_repetitive(varying, hit_limit=True, coverage=0.9)


def test_seq_rep_4_hand_counted():
    # 4-grams of a b c d a b c d: abcd bcda cdab dabc abcd -> 5 grams, 4 unique
    assert metrics.seq_rep_n(list("abcdabcd"), 4) == pytest.approx(1 - 4 / 5)
    assert metrics.seq_rep_n(list("abcdefgh"), 4) == 0.0
    assert metrics.seq_rep_n(list("aaaaaa"), 4) == pytest.approx(1 - 1 / 3)
    assert metrics.seq_rep_n(list("abc"), 4) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_the_binomial_closed_form(args):
    n, c, k = args
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_bad_arguments_fail():
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


def test_majority_vote_ties_and_empty_answers():
    assert metrics.majority_vote(["7", "3", "3", "7", "5"]) == "7"  # tie 2-2: first seen wins
    assert metrics.majority_vote(["", "", "", "4"]) == "4"  # empty extractions do not vote
    assert metrics.majority_vote(["", ""]) == ""
    assert metrics.majority_vote(["1", "2", "2"]) == "2"


def test_entropy_kl_and_perplexity_against_numpy():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    other = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    q = np.exp(other.double().numpy())
    q /= q.sum(-1, keepdims=True)
    np.testing.assert_allclose(metrics.token_entropy(logits).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(metrics.kl_divergence(logits, other).numpy(), (p * np.log(p / q)).sum(-1), rtol=1e-10)
    assert float(metrics.token_entropy(torch.zeros(7))) == pytest.approx(math.log(7))
    assert metrics.perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert math.isnan(metrics.perplexity(0.0, 0))
