"""``mergelab study long-to-short|scf --zoo smollm2-arith``: tiny-lm's protocols on SmolLM2-135M fine-tunes that
solve their task (``mergelab.zoo.smollm2_arith``, all from the real SmolLM2-135M-Instruct).

- ``long-to-short`` (FIM-Merging): ``arith_short`` the base, ``arith_long`` the one expert. The jobs are
  tiny-lm's protocol (``long_to_short.plan``: the same members, methods, held-out arithmetic items and
  self-consistency samples), plus ``l2s_linearity``'s TA sweep in λ and the NL scores of ``arith_long −
  arith_short``; the analysis is tiny-lm's tables followed by the linearity tables.
- ``scf`` (SCF-RKL, section 5.3, Figures 9-11): tiny-lm's ``safety`` pair (``scf_pairs.lm_plan``), the
  reasoning model ``arith_long`` as M0 and the safety model ``refusal`` as M1: every method, SCF-KL, the α
  sweep, provenance and rotation, layer blocking. The family has no complementary or strong-weak pair and no
  vision members: those run with ``--zoo tiny-lm`` and ``--zoo smollm2``.

The other protocols need the ``smollm2`` family.
"""

from __future__ import annotations

from typing import Any

from mergelab.citations import SCF_RKL, cite
from mergelab.study import l2s_linearity, long_to_short, scf_pairs
from mergelab.study.jobs import Job
from mergelab.study.settings import StudySettings
from mergelab.study.smollm2 import Protocol

FAMILY = "smollm2-arith"
SHORT, LONG = "arith_short", "arith_long"


def _l2s_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    return l2s_linearity.with_linearity_jobs(*long_to_short.plan(settings), SHORT, LONG)


def _l2s_analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """tiny-lm's long-to-short tables, then TA's linearity in λ."""
    return l2s_linearity.protocol_analysis(context, results, SHORT, LONG)


def _scf_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    return scf_pairs.lm_plan(settings, FAMILY, ("safety",))


PROTOCOLS = {
    "long-to-short": Protocol(f"{long_to_short.TITLE} (SmolLM2-135M arithmetic pair)", long_to_short.PAPER,
                              _l2s_plan, _l2s_analyse, l2s_linearity.protocol_figures),
    "scf": Protocol("SCF-RKL: reasoning + safety fusion (SmolLM2-135M arithmetic and refusal fine-tunes)",
                    cite(SCF_RKL, "section 5.3, Figures 9-11, Table 10"), _scf_plan, scf_pairs.analyse,
                    scf_pairs.figures),
}
