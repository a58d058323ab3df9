"""``mergelab study long-to-short``: the FIM-Merging paper's long-to-short setting on the tiny-lm zoo.

Paper: "FIM-Merging" (004 in ``shared/papers``), sections 5.1-5.5 and 6.2. There the short model
(Qwen2.5-Math) is the base and the long reasoner (DeepSeek-R1-Distill, fine-tuned from it) the one expert. Here
``arith_short`` (answers directly) plays the base and ``arith_long`` (step-by-step working, then the answer)
the expert; both are fine-tunes of the zoo base, so ``arith_long − arith_short`` is the task vector. Methods:
TA and TIES at λ = 0.5 (the median of FIM's α is 0.5 by construction, eq. 10-11, so the comparison is at the
same mean strength), FIM-TA and FIM-TIES at their defaults (N = 8 random sequences of 64 tokens, seed 42,
r = 0.2, gate factor 0.7, calibration for FIM-TIES), TIES at the same r = 0.2, and the section 5.5 ablations
(FIM-TA with the weight-norm-only and the FIM-only score). Every model answers the same held-out three-operand
problems; scored on final-answer accuracy (the text after the last ``Answer:``) and response length, greedy
(Tables 2-3), and by self-consistency over n samples at temperature 0.3 (Table 4, section 6.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelab.citations import FIM_MERGING, cite
from mergelab.study.jobs import Job
from mergelab.study.report import line_plot, scatter_plot, table
from mergelab.study.settings import StudySettings

TITLE = "Long-to-short merging with FIM-Merging"
PAPER = cite(FIM_MERGING, "Tables 2-4, Figures 2-3, section 5.5")
TASK = "arith_long"  # same prompts and answers as arith_short; its longer token limit lets working finish
PARENTS = ("base", "arith_short", "arith_long")
SIZES = {"quick": {"n_items": 30, "samples": 4}, "full": {"n_items": 200, "samples": 16}}


def methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (merge_method, the recipe's top-level parameters)."""
    return {
        "TA (λ=0.5)": ("task_arithmetic", {"lambda": 0.5}),
        "TIES (λ=0.5, r=0.2)": ("ties", {"density": 0.2, "lambda": 0.5}),
        "FIM-TA": ("fim_ta", {}),
        "FIM-TIES": ("fim_ties", {}),
        "FIM-TA, norm-only score": ("fim_ta", {"score": "norm"}),
        "FIM-TA, FIM-only score": ("fim_ta", {"score": "fim"}),
    }


def plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab import zoo

    size = SIZES["quick" if settings.quick else "full"]
    family = zoo.require(settings.zoo, settings.size(), list(PARENTS), settings.build_zoo, settings.device,
                         settings.progress)  # tiny-lm, or smollm2-arith (the same member names)
    evaluation = {"tasks": [TASK], "n_items": size["n_items"], "n_samples": size["samples"],
                  "eval_options": {"temperature": 0.3, "seed": 0, "batch_size": 64}}
    jobs = [Job(label=name, model=str(family / name), **evaluation) for name in PARENTS]
    for label, (method, params) in methods().items():
        recipe = {"merge_method": method, "base_model": str(family / "arith_short"),
                  "models": [{"model": str(family / "arith_long")}], "parameters": params, "seed": 0}
        jobs.append(Job(label=label, recipe=recipe, **evaluation))
    return jobs, {"family": str(family), "samples": size["samples"], "methods": list(methods())}


def analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tables 2-4 and Figure 2 from the job results; ``context`` may name another ``task``, ``parents``,
    ``expert`` (the merges' base) and ``note`` (the smollm2 variant, ``mergelab.study.smollm2``)."""
    task, expert = context.get("task", TASK), context.get("expert", "arith_short")
    rows_order = [*context.get("parents", PARENTS), *context["methods"]]
    n = context["samples"]
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    # the answer-format rate where the task defines a format (GSM8K's "#### N"; tiny-lm's tasks have none)
    formats = any("format_rate" in results[label]["eval"][task]["greedy"] for label in rows_order)
    main, consistency = [], []
    for label in rows_order:
        figures = results[label]["eval"][task]
        greedy, sampled = figures["greedy"], figures.get("sampled", {})
        unchanged = results[label].get("merge", {}).get("unchanged_from_base")
        main.append([label, greedy["accuracy"], greedy["mean_length"], greedy["repetition_rate"], unchanged,
                     *([greedy.get("format_rate")] if formats else [])])
        consistency.append([label, *[sampled.get(f"self_consistency@{k}") for k in ks]])
    alphas = {label: results[label]["merge"]["prepare"] for label in context["methods"]
              if "prepare" in results[label].get("merge", {})}
    layers = next(iter(alphas.values()))["layers"] if alphas else []
    alpha_rows = [[layer, *[record["experts"][0]["alpha"][i] for record in alphas.values()]]
                  for i, layer in enumerate(layers)]
    tables = [
        table("Final-answer accuracy and response length (greedy; the paper's Tables 2-3)",
              ["model", "accuracy %", "mean length (tokens)", "repetition %", f"unchanged from {expert} %",
               *(["answers in the task's format %"] if formats else [])],
              ["text", "pct", "num", "pct", "pct", *(["pct"] if formats else [])], main,
              context.get("note", "Merges take arith_short as the base and arith_long as the one expert.")),
        table(f"Self-consistency at temperature 0.3 (Table 4): majority vote over the first k of {n} samples",
              ["model", *[f"SC@{k} %" for k in ks]], ["text", *["pct"] * len(ks)], consistency),
    ]
    if alpha_rows:
        tables.append(table("Per-layer merging coefficient α (Algorithm 1; Figure 2)", ["layer", *alphas],
                            ["text", *["num"] * len(alphas)], alpha_rows))
    return {"tables": tables, "points": {r[0]: [r[2], r[1]] for r in main},
            "alphas": {"layers": layers, "series": {k: v["experts"][0]["alpha"] for k, v in alphas.items()}}}


def figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    made = [(scatter_plot(out / "accuracy_vs_length.png", "accuracy against response length (Figure 3)",
                          analysis["points"], "mean response length (tokens)", "final-answer accuracy (%)",
                          command).name, "accuracy against response length")]
    alphas = analysis["alphas"]
    if alphas["layers"]:
        made.append((line_plot(out / "alpha_per_layer.png", "FIM merging coefficient per layer (Figure 2)",
                               alphas["layers"], alphas["series"], "layer", "α", command, percent=False).name,
                     "per-layer α"))
    return made
