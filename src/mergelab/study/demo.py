"""``mergelab demo``: the SCF-RKL paper's two headline settings on the offline tiny-lm zoo.

Builds (or reuses) the zoo members it needs, merges the complementary pair and the strong-weak pair with
SCF-RKL and the paper's baselines (TA, DARE-TA, TIES, DARE-TIES, SCE), evaluates every merge and both
parents, prints a table and writes a report folder (markdown, a self-contained HTML page, PNG plots, raw
JSON).

As in the paper (section 2, Algorithm 1), SCF-RKL fuses two models directly: the first of the pair is its base
``θ_b`` and the second its secondary ``θ_s``; the task-vector baselines take task vectors of both against the
pretrained zoo base.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mergelab import document
from mergelab.document import Figure, Heading, Paragraph, Report
from mergelab.study.report import bar_plot, fmt_table, text_table

# scenario -> (first model, second model, tasks scored). The tasks are the experts' own skills.
SCENARIOS = {
    "complementary": ("addition", "reverse", ["addition", "reverse"]),
    "strong_weak": ("addition", "weak_addition", ["addition", "sort_digits"]),
}
BATCH = 100  # tiny models: one generate() call per task is far cheaper than many small ones
METHODS = ("scf_rkl", "task_arithmetic", "dare_linear", "ties", "dare_ties", "sce")


def recipes(base: Path, first: Path, second: Path) -> dict[str, dict[str, Any]]:
    """The demo's recipes for one pair. Baselines use the paper's "standard configurations", read as mergekit's
    defaults: weight 1 per expert, density 0.5, sums normalised by the weights only for the TIES variants."""
    experts = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (first, second)]
    common = {"base_model": str(base), "models": experts, "seed": 0}
    return {
        "scf_rkl": {"merge_method": "scf_rkl", "base_model": str(first), "models": [{"model": str(second)}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", **common},
        "dare_linear": {"merge_method": "dare_linear", **common, "parameters": {"density": 0.5}},
        "ties": {"merge_method": "ties", **common, "parameters": {"density": 0.5}},
        "dare_ties": {"merge_method": "dare_ties", **common, "parameters": {"density": 0.5}},
        "sce": {"merge_method": "sce", "base_model": str(base), "models": [{"model": str(m)} for m in (first, second)],
                "parameters": {"select_topk": 0.5}},
    }


def update_sparsity(merged: Path) -> float:
    """Fraction of elements the merge left equal to its recipe's base (from ``mergelab.json``)."""
    record = json.loads((merged / "mergelab.json").read_text())
    total = sum(s["numel"] for s in record["tensors"].values())
    changed = sum(s.get("changed_from_base", 0.0) * s["numel"] for s in record["tensors"].values())
    return 1.0 - changed / total


def summarize(result: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    """Accuracy per task, their average, and the stability figures averaged over tasks."""
    greedy = {t: result["tasks"][t]["greedy"] for t in tasks}
    row = {f"acc:{t}": greedy[t]["accuracy"] for t in tasks}
    row["average"] = sum(row.values()) / len(tasks)
    for key in ("repetition_rate", "mean_length"):
        row[key] = sum(g[key] for g in greedy.values()) / len(tasks)
    return row


def run_demo(out: Path, size: str = "demo", n_items: int = 100, device: str = "cpu", progress: bool = True,
             command: str = "mergelab demo") -> dict[str, Any]:
    from mergelab import zoo
    from mergelab.api import merge
    from mergelab.evaluation.runner import evaluate

    started = time.perf_counter()
    needed = sorted({m for first, second, _ in SCENARIOS.values() for m in (first, second)} | {"base"})
    family = zoo.build("tiny-lm", size, device=device, members=needed, progress=progress, workers=2)
    built = time.perf_counter()
    (out / "merges").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"size": size, "n_items": n_items, "scenarios": {}}
    for scenario, (first, second, tasks) in SCENARIOS.items():
        rows: dict[str, dict[str, float]] = {}
        for name in ("base", first, second):
            rows[f"parent:{name}"] = summarize(evaluate(family / name, tasks, n_items=n_items, device=device,
                                                        batch_size=BATCH, progress=False), tasks)
        for method, recipe in recipes(family / "base", family / first, family / second).items():
            merged = out / "merges" / f"{scenario}-{method}"
            merge(recipe, merged, overwrite=True, device=device)
            row = summarize(evaluate(merged, tasks, n_items=n_items, device=device, batch_size=BATCH,
                                     progress=False), tasks)
            row["unchanged_from_recipe_base"] = update_sparsity(merged)
            rows[method] = row
        results["scenarios"][scenario] = {"pair": [first, second], "tasks": tasks, "rows": rows}
    results["seconds"] = {"zoo": built - started, "total": time.perf_counter() - started}
    write_report(out, results, command)
    return results


def table_rows(scenario: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    tasks = scenario["tasks"]
    header = ["model", *[f"{t} %" for t in tasks], "average %", "repetition %", "length (tokens)",
              "unchanged from its base %"]
    rows = []
    for name, row in scenario["rows"].items():
        rows.append([name, *[row[f"acc:{t}"] for t in tasks], row["average"], row["repetition_rate"],
                     f"{row['mean_length']:.1f}", row.get("unchanged_from_recipe_base")])
    return header, rows


def write_report(out: Path, results: dict[str, Any], command: str) -> Path:
    """report.md and report.html (tables and plots), results.json; the tables are rendered from ``results``
    only."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = Report("mergelab demo").add(Paragraph(
        f"Made by `{command}` on the tiny-lm zoo (size `{results['size']}`), {results['n_items']} held-out "
        f"items per task, greedy decoding. Raw numbers: [results.json](results.json)."))
    for scenario, data in results["scenarios"].items():
        header, rows = table_rows(data)
        plot = bar_plot(out / f"{scenario}.png", f"{scenario}: {' + '.join(data['pair'])}", list(data["rows"]),
                        {h: [r[i + 1] for r in rows] for i, h in enumerate(header[1:len(data["tasks"]) + 2])},
                        "exact match (%)", command)
        report.add(Heading(f"{scenario} ({' + '.join(data['pair'])})"), fmt_table(header, rows, command),
                   Figure(plot.name, f"{scenario}: exact match per model", command))
    report.add(Paragraph(f"Zoo build or reuse took {results['seconds']['zoo']:.0f} s; everything "
                         f"{results['seconds']['total']:.0f} s."))
    return document.write(report, out)[0]


def print_tables(results: dict[str, Any]) -> None:
    for scenario, data in results["scenarios"].items():
        header, rows = table_rows(data)
        print(f"\n{scenario} ({' + '.join(data['pair'])})")
        print(text_table(header, rows))
