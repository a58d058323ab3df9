"""Generation metrics: repetition, seq-rep-n, distinct-n, pass@k, self-consistency, length, perplexity, entropy.

Pure functions over token sequences, answer lists and logits; they know nothing about models. Token sequences
are any sequences of hashable items (token ids, words or characters), so the definitions can be tested on
hand-made strings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

REPETITION_TAIL = 64
REPETITION_MAX_PERIOD = 16
REPETITION_NGRAM = 4
REPETITION_COVERAGE = 0.8


def periodic_tail(tokens: Sequence[Hashable], max_period: int = REPETITION_MAX_PERIOD) -> int | None:
    """The smallest period k <= ``max_period`` such that ``tokens`` repeats with period k at least twice.

    ``tokens[i] == tokens[i + k]`` must hold for every i, and ``len(tokens) >= 2 k``. None if there is none.
    """
    n = len(tokens)
    for period in range(1, min(max_period, n // 2) + 1):
        if all(tokens[i] == tokens[i + period] for i in range(n - period)):
            return period
    return None


def repeated_ngram_coverage(tokens: Sequence[Hashable], n: int = REPETITION_NGRAM) -> float:
    """Fraction of positions of ``tokens`` covered by an occurrence of an n-gram that occurs at least twice.

    0.0 for sequences shorter than ``n``. A period-k loop repeated at least twice, with k <= the sequence
    length - n, covers every position.
    """
    if len(tokens) < n:
        return 0.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for start, gram in enumerate(grams):
        if counts[gram] >= 2:
            covered[start : start + n] = [True] * n
    return sum(covered) / len(tokens)


def is_repetitive(
    tokens: Sequence[Hashable],
    hit_limit: bool,
    *,
    tail: int = REPETITION_TAIL,
    max_period: int = REPETITION_MAX_PERIOD,
    ngram: int = REPETITION_NGRAM,
    coverage: float = REPETITION_COVERAGE,
) -> bool:
    """Whether a generation fell into a degenerate loop (the repetition rate of SCF-RKL, [Lin2026] Fig. 1).

    Definition: the generation hit the token limit without ending (``hit_limit``), and its tail (the last
    ``tail`` tokens, or all of it if shorter) either

    * is periodic: ``tail[i] == tail[i + k]`` for every i, for some period ``k <= max_period`` that fits at
      least twice in the tail (``periodic_tail``), or
    * is covered for at least ``coverage`` of its positions by ``ngram``-grams that occur twice or more
      in the tail (``repeated_ngram_coverage``): loops with small variations or long periods.

    A generation that stops by itself (end-of-sequence) is never counted, however repetitive.
    """
    if not hit_limit:
        return False
    window = list(tokens[-tail:])
    if len(window) < 2:
        return False
    if periodic_tail(window, max_period) is not None:
        return True
    return repeated_ngram_coverage(window, ngram) >= coverage


def seq_rep_n(tokens: Sequence[Hashable], n: int = 4) -> float:
    """seq-rep-n of one sequence (Welleck et al. 2019): 1 - |unique n-grams| / |n-grams|; 0 below n tokens."""
    if len(tokens) < n:
        return 0.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int = 2) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams, pooled over ``sequences``; 0.0 when no
    sequence has ``n`` tokens (as ``seq_rep_n``; a NaN would make equal results compare unequal)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which ``correct`` pass (Chen et al. 2021, eq. 1).

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` for stability.
    """
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n; got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    product = 1.0
    for i in range(n - correct + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_vote(answers: Sequence[str]) -> str:
    """Self-consistency answer (Wang et al. 2023): the most frequent non-empty extracted answer.

    Ties go to the answer seen first; empty answers (nothing extracted) only win when every answer is empty.
    """
    counts = Counter(a for a in answers if a != "")
    if not counts:
        return ""
    best = max(counts.values())
    return next(a for a in answers if a != "" and counts[a] == best)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence (nothing measured, not zero)."""
    return sum(values) / len(values) if values else math.nan


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis, computed in float64: ``-sum p log p``."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats over the last axis, p = softmax(logits_p), q = softmax(logits_q), in float64."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token); NaN when no token was predicted."""
    return math.exp(nll_sum / n_tokens) if n_tokens else math.nan
