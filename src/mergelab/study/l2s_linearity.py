"""Is Task Arithmetic linear in its coefficient when a long reasoner is merged into a short model?

FIM-Merging (004 in ``shared/papers``) builds on the claim (section 3, Proposition 1; appendix C, eq. 19 and
Figure 4) that ``f(theta0 + lambda delta)`` is far from the linear interpolation ``f(theta0) + lambda (f(theta0 +
delta) - f(theta0))`` in the long-to-short setting, most of all in the early layers. The smollm2 long-to-short
protocol measures it two ways, with ``short`` as theta0 and ``reasoning - short`` as delta (on ``smollm2-arith``:
``arith_short`` and ``arith_long``):

- in behaviour: TA at ``SWEEP`` (besides the protocol's λ = 0.5), so that accuracy, response length and the
  perplexity of the reference solutions are read at λ = 0, 0.25, 0.5, 0.75, 1 (the two ends are the parents)
  and set beside the straight line between the ends;
- in the output logits: the NL score of eq. 19 per layer at α = 0.5 (Figure 4, left), and the same score of the
  whole task vector at α = each λ of the sweep, on ``PROBES`` random token sequences (the probe shape FIM's α
  uses). (The paper's Figure 4, middle, varies the scale of delta instead; not measured here.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mergelab.study.jobs import Job
from mergelab.study.report import line_plot, table

SWEEP = (0.25, 0.75)
PROBES = {"n_probes": 8, "probe_length": 64, "seed": 42}
STRENGTHS = (0.25, 0.5, 0.75)


def with_linearity_jobs(jobs: list[Job], context: dict[str, Any], short: str,
                        long: str) -> tuple[list[Job], dict[str, Any]]:
    """A long-to-short plan (its jobs and context) with the linearity measurements added: the NL probes on the
    long model's job (its task vector against member ``short``, per layer at α = 0.5 and whole at
    ``STRENGTHS``), and copies of the plan's TA job at each λ of ``SWEEP`` (its λ = 0.5 job is the middle
    point), appended to the context's methods."""
    family = Path(context["family"])
    probes = {"base": str(family / short), "experts": [], **PROBES, "nl_layers": None, "alpha": 0.5,
              "whole_alphas": list(STRENGTHS)}
    jobs = [dataclasses.replace(job, activations=probes) if job.label == long else job for job in jobs]
    ta = next(job for job in jobs if job.recipe and job.recipe["merge_method"] == "task_arithmetic")
    sweep = [dataclasses.replace(ta, label=f"TA (λ={value})", recipe={**ta.recipe, "parameters": {"lambda": value}})
             for value in SWEEP]
    return [*jobs, *sweep], {**context, "methods": [*context["methods"], *(job.label for job in sweep)]}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: NL scores are continuous)."""
    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0] * len(values)
        for rank, i in enumerate(order):
            out[i] = rank
        return out

    rx, ry = ranks(x), ranks(y)
    n = len(x)
    return 1.0 - 6.0 * sum((a - b) ** 2 for a, b in zip(rx, ry, strict=True)) / (n * (n * n - 1))


def analyse(results: dict[str, dict[str, Any]], task: str = "gsm8k", short: str = "short",
            long: str = "reasoning") -> dict[str, Any]:
    """The two F5 tables and their curves from the protocol's results (the parents labelled ``short`` and
    ``long``, the merges ``TA (λ=...)``); the perplexity column where the jobs measured held-out ``task`` text."""
    points = [(0.0, short), *[(v, f"TA (λ={v})") for v in sorted((*SWEEP, 0.5))], (1.0, long)]
    activations = results[long]["activations"]
    whole = activations["nl_score_whole"]["merged"]
    lengths = {label: results[label]["eval"][task]["greedy"]["mean_length"] for _, label in points}
    ends = lengths[short], lengths[long]
    perplexity = all(task in results[label].get("heldout", {}) for _, label in points)
    rows = []
    for value, label in points:
        figures = results[label]
        rows.append([value, label, figures["eval"][task]["greedy"]["accuracy"], lengths[label],
                     ends[0] + value * (ends[1] - ends[0]),
                     *([figures["heldout"][task]["perplexity"]["perplexity"]] if perplexity else []),
                     whole.get(str(value))])
    per_layer = activations["nl_score"]["merged"]
    layers = sorted(per_layer, key=int)
    scores = [per_layer[layer] for layer in layers]
    third = max(1, len(scores) // 3)
    note = (f"Mean NL over the {len(scores)} layers {sum(scores) / len(scores):.3f} (paper: 0.240 at 1.5B, 0.171 at "
            f"7B); first third {sum(scores[:third]) / third:.3f}, last third {sum(scores[-third:]) / third:.3f}; "
            f"Spearman correlation with the layer index {spearman([float(x) for x in layers], scores):+.2f} "
            "(the paper: NL decreases from early to late layers, i.e. negative).")
    tables = [
        table(f"Task Arithmetic against λ between {short} (λ = 0) and {long} (λ = 1): behaviour and the output's "
              "distance from linear (section 3; eq. 19 with the whole task vector)",
              ["λ", "model", f"{task} acc %", "mean length (tokens)", "length if linear in λ",
               *([f"{task} reference-solution ppl"] if perplexity else []), "NL score at α = λ (whole task vector)"],
              ["num", "text", "pct", "num", "num", *(["num"] if perplexity else []), "num"], rows,
              "NL score (eq. 19 with the whole task vector): ||f(θ0 + λδ) − [f(θ0) + λ(f(θ0 + δ) − f(θ0))]|| / "
              "||f(θ0 + δ) − f(θ0)|| on 8 random token sequences of 64 tokens; 0 means linear."),
        table("NL score per layer at α = 0.5 (eq. 19; appendix C, Figure 4 left)", ["layer", "NL score"],
              ["text", "num"], [[layer, per_layer[layer]] for layer in layers], note),
    ]
    return {"tables": tables, "curves": {"lambda": [p[0] for p in points], "length": [r[3] for r in rows],
                                         "linear": [r[4] for r in rows], "short": short, "long": long,
                                         "layers": [int(x) for x in layers], "nl": scores}}


def figures(out: Path, curves: dict[str, Any], command: str) -> list[tuple[str, str]]:
    line_plot(out / "ta_length_vs_lambda.png", f"TA between {curves['short']} and {curves['long']}: response "
              "length against λ", curves["lambda"], {"measured": curves["length"], "linear in λ": curves["linear"]},
              "λ", "mean response length (tokens)", command, percent=False)
    line_plot(out / "nl_score_per_layer.png", f"NL score of {curves['long']} − {curves['short']} per layer (α = 0.5)",
              curves["layers"],
              {"NL score": curves["nl"]}, "layer", "NL score", command, percent=False)
    return [("ta_length_vs_lambda.png", "TA's response length against λ"),
            ("nl_score_per_layer.png", "NL score per layer")]


def protocol_analysis(context: dict[str, Any], results: dict[str, dict[str, Any]], short: str,
                      long: str) -> dict[str, Any]:
    """The long-to-short protocol's tables (``long_to_short.analyse``), then ``analyse``'s (the smollm2 and
    smollm2-arith variants)."""
    from mergelab.study import long_to_short

    analysis = long_to_short.analyse(context, results)
    linearity = analyse(results, context.get("task", long_to_short.TASK), short, long)
    analysis["tables"] += linearity["tables"]
    analysis["linearity"] = linearity["curves"]
    return analysis


def protocol_figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    """The long-to-short protocol's figures, then ``figures``."""
    from mergelab.study import long_to_short

    return long_to_short.figures(out, analysis, command) + figures(out, analysis["linearity"], command)
