"""``mergelab study long-to-short --zoo smollm2-arith``: FIM-Merging's long-to-short protocol on SmolLM2-135M
fine-tunes that solve their task (``mergelab.zoo.smollm2_arith``: ``arith_short`` the base, ``arith_long`` the
one expert, both from the real SmolLM2-135M-Instruct).

The jobs are tiny-lm's protocol (``long_to_short.plan``: the same members, methods, held-out arithmetic items
and self-consistency samples), plus ``l2s_linearity``'s TA sweep in λ and the NL scores of ``arith_long −
arith_short``; the analysis is tiny-lm's tables followed by the linearity tables. The other protocols need the
``smollm2`` family.
"""

from __future__ import annotations

from typing import Any

from mergelab.study import l2s_linearity, long_to_short
from mergelab.study.jobs import Job
from mergelab.study.settings import StudySettings

TITLE = f"{long_to_short.TITLE} (SmolLM2-135M arithmetic pair)"
PAPER = long_to_short.PAPER
SHORT, LONG = "arith_short", "arith_long"


def plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    return l2s_linearity.with_linearity_jobs(*long_to_short.plan(settings), SHORT, LONG)


def analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """tiny-lm's long-to-short tables, then TA's linearity in λ."""
    return l2s_linearity.protocol_analysis(context, results, SHORT, LONG)


figures = l2s_linearity.protocol_figures
