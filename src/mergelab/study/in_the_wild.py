"""``mergelab study in-the-wild``: the in-the-wild merging study's protocol on the tiny-lm pool.

Paper: "A Systematic Study of In-the-Wild Model Merging for Large Language Models" (003 in ``shared/papers``).
Its setting (sec. 3.2, 3.3, 4.2) maps onto the zoo as follows.

- Experts: the twelve ``pool_00`` .. ``pool_11`` of ``mergelab.zoo.tinylm.POOL`` (different skill mixes, step
  counts and learning rates; one on corrupted labels, one on code only), all fine-tuned from ``base``.
- Subsets (sec. 3.2): for n in {2, 4, 6, 8, 10} 15 distinct subsets drawn uniformly (seeded, ``sample_subsets``),
  and the whole pool for n = 12; the same subsets for every method. ``--quick`` takes n in {2, 4, 12} and the
  first two subsets of each n (so its jobs are a subset of the full protocol's).
- Methods at the paper's settings (sec. 3.2, 4.2, appendix C): TA with λ = 1 and mergekit's normalisation on
  (eq. 2 with eq. 12, so the task-vector mean), TIES with top-10 % density and λ = 0.1, Model Stock (eq. 4),
  TSV-M and Iso-C with λ = 1 (eq. 5-10, on the task-vector sum), TA+SB (λ = 1, normalised) and TIES+SB
  (λ = 0.1, density 0.1), both with β = 0.2 (eq. 11). Added for this project: SCF-RKL with its multi-expert rule
  (``methods/scf.py``, defaults) and the Karcher mean (``methods/karcher.py``, defaults).
- Benchmarks (sec. 3.3): every tiny-lm skill task of ``mergelab.tasks.TASKS``, greedy exact match; a model's
  score is the unweighted mean accuracy over the tasks, as the paper averages over its 16 benchmarks.
- Metrics (Tables 1-3): per method and n, the percentage of subsets whose merge scores strictly above the
  reference, and the mean over subsets of (merge − reference) in accuracy points. The paper calls the second
  the "relative improvement", but its own tables are point differences (e.g. Llama-8B TA at n = 12: +1.56 over
  the base 56.9 and −0.58 against the best expert 59.0). References: the base (Tables 1, 3) and the best single
  expert by mean accuracy (Table 2, shown here for every method, the paper shows TA). The column n = 1 scores
  the twelve experts themselves.
- Figure 4: the L2 norm of the merged task vector ``‖θ_merged − θ_base‖`` (weights diagnostics), mean and
  standard deviation (ddof 0) over the subsets; at n = 1 the experts' own task-vector norms.
- Appendix D: the pairwise cosines of the twelve task vectors and the per-layer sign counts, from the weights
  diagnostics of the full-pool merges.
- Appendix C sweeps, on all twelve experts as in the paper: TA's λ with and without normalisation (Figs. 11-12,
  up to λ = 10), a TIES grid of density × λ (Figs. 13-17), and Subspace Boosting's β for TA+SB and TIES+SB
  (Fig. 18). ``--quick`` keeps two points per sweep.
- Appendix E (homogeneous against heterogeneous merges): a homogeneous group is three pool experts that share
  a skill (``HOMOGENEOUS``: addition, word reversal), standing in for the paper's three math and three medical
  experts. Each group is merged alone and all six together; each merge is scored on each group's suite, the
  tasks its experts learned (from ``tinylm.POOL``). ``--quick`` runs this part with TA and TIES only.

Deviations: one base model instead of four (so no "Average" row), the zoo's exact-match tasks instead of
lm-eval-harness benchmarks, and ``n_items`` held-out items per task (``SIZES``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from mergelab.citations import IN_THE_WILD, cite
from mergelab.errors import MergelabError
from mergelab.study.jobs import Job
from mergelab.study.report import bar_plot, heatmap, label_axes, line_plot, new_figure, save_figure, scatter_plot, table
from mergelab.study.settings import StudySettings

TITLE = "In-the-wild merging of the tiny-lm pool"
PAPER = cite(IN_THE_WILD, "A Systematic Study of In-the-Wild Model Merging for LLMs, Tables 1-3, Figs. 3-6, "
                                "appendices C-E")
SEED = 0  # subset sampling
POOL_SIZE = 12
BASE = "base"
# label -> (merge_method, parameters); sec. 3.2, 4.2 and appendix C of the paper (λ = 1 except TIES, TIES+SB)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "TA": ("task_arithmetic", {"lambda": 1.0, "normalize": True}),
    "Model Stock": ("model_stock", {}),
    "TIES": ("ties", {"lambda": 0.1, "density": 0.1, "normalize": True}),
    "TA+SB": ("task_arithmetic_sb", {"lambda": 1.0, "normalize": True, "beta": 0.2}),
    "TIES+SB": ("ties_sb", {"lambda": 0.1, "density": 0.1, "normalize": True, "beta": 0.2}),
    "TSV-M": ("tsv", {"lambda": 1.0}),
    "Iso-C": ("iso_c", {"lambda": 1.0}),
    "SCF-RKL": ("scf_rkl", {}),
    "Karcher": ("karcher", {}),
}
NO_BASE = ("karcher",)  # methods that take no base model (Karcher averages the experts themselves)
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "n_values": [2, 4, 12], "subsets": 2, "n_items": 20,
        "ta_lambda": [1.0, 1.9], "ties_points": [[0.1, 0.1], [1.0, 0.1], [0.1, 1.0]], "beta": [0.2, 0.5],
        "homogeneous_methods": ["TA", "TIES"],
    },
    "full": {
        "n_values": [2, 4, 6, 8, 10, 12], "subsets": 15, "n_items": 200,
        "ta_lambda": [0.1, 0.4, 0.7, 1.0, 1.3, 1.6, 1.9, 10.0],
        "ties_points": [[d, lam] for d in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
                        for lam in (0.1, 0.4, 0.7, 1.0, 1.3, 1.6, 1.9)],
        "beta": [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
        "homogeneous_methods": list(METHODS),
    },
}
# Appendix E: skill -> three pool experts whose training mix contains that skill (checked against tinylm.POOL)
HOMOGENEOUS = {"addition": ("pool_00", "pool_01", "pool_06"), "reverse": ("pool_02", "pool_04", "pool_05")}


def pool_names() -> list[str]:
    return [f"pool_{i:02d}" for i in range(POOL_SIZE)]


def sample_subsets(pool: list[str], n: int, count: int, seed: int = SEED) -> list[list[str]]:
    """``count`` distinct subsets of ``n`` experts drawn uniformly (sec. 3.2), each sorted; the whole pool when
    ``n`` is its size. The draw for a given ``n`` is one seeded stream, so fewer subsets are a prefix of more."""
    if n >= len(pool):
        return [sorted(pool)]
    if count > math.comb(len(pool), n):
        raise ValueError(f"only {math.comb(len(pool), n)} subsets of {n} out of {len(pool)} exist, asked {count}")
    rng = random.Random(seed * 1000 + n)
    found: list[list[str]] = []
    while len(found) < count:
        subset = sorted(rng.sample(pool, n))
        if subset not in found:
            found.append(subset)
    return found


def homogeneous_groups() -> dict[str, dict[str, list[str]]]:
    """Appendix E's groups: for each skill, its three experts and its suite (the tasks those experts learned)."""
    from mergelab.tasks import TASKS
    from mergelab.zoo.tinylm import POOL

    groups = {}
    for skill, experts in HOMOGENEOUS.items():
        lacking = [e for e in experts if skill not in POOL[e][0]]
        if lacking:
            raise MergelabError(f"in-the-wild: pool experts {', '.join(lacking)} no longer learn {skill!r} "
                                "(tinylm.POOL changed); update in_the_wild.HOMOGENEOUS to experts sharing a skill.")
        suite = sorted({task for e in experts for task in POOL[e][0] if task in TASKS}, key=list(TASKS).index)
        groups[skill] = {"experts": list(experts), "suite": suite}
    return groups


def recipe(method: str, family: Path, experts: list[str], **overrides: Any) -> dict[str, Any]:
    """The merge recipe of ``method`` (a ``METHODS`` label) over ``experts``, with parameters overridden."""
    name, params = METHODS[method]
    merged = {"merge_method": name, "models": [{"model": str(family / e)} for e in experts],
              "parameters": {**params, **overrides}}
    if name not in NO_BASE:
        merged["base_model"] = str(family / BASE)
    return merged


def plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab import zoo
    from mergelab.tasks import TASKS

    size = SIZES["quick" if settings.quick else "full"]
    pool = pool_names()
    family = zoo.require("tiny-lm", settings.size(), [BASE, *pool], settings.build_zoo, settings.device,
                         settings.progress)
    tasks = list(TASKS)
    evaluation = {"tasks": tasks, "n_items": size["n_items"], "eval_options": {"batch_size": size["n_items"]}}

    def merge_job(label: str, method: str, experts: list[str], **overrides: Any) -> Job:
        # the full pool's merges also record every expert's task vector (appendix D); others only the merge's
        recorded = [str(family / e) for e in experts] if len(experts) == len(pool) else []
        return Job(label=label, recipe=recipe(method, family, experts, **overrides), **evaluation,
                   weights={"base": str(family / BASE), "experts": recorded, "svd": False})

    jobs = [Job(label=f"parent:{name}", model=str(family / name), **evaluation) for name in [BASE, *pool]]
    subsets = {str(n): sample_subsets(pool, n, size["subsets"]) for n in size["n_values"]}
    for n, drawn in subsets.items():
        for i, subset in enumerate(drawn):
            jobs += [merge_job(f"main:{method}|n={n}|s={i}", method, subset) for method in METHODS]
    for lam in size["ta_lambda"]:
        for normalize in (True, False):
            jobs.append(merge_job(f"sweep:TA|normalize={normalize}|lambda={lam}", "TA", pool,
                                  **{"lambda": lam, "normalize": normalize}))
    for density, lam in size["ties_points"]:
        jobs.append(merge_job(f"sweep:TIES|density={density}|lambda={lam}", "TIES", pool,
                              **{"density": density, "lambda": lam}))
    for beta in size["beta"]:
        jobs += [merge_job(f"sweep:{method}|beta={beta}", method, pool, beta=beta) for method in ("TA+SB", "TIES+SB")]
    groups = homogeneous_groups()
    everyone = sorted({e for g in groups.values() for e in g["experts"]})
    for method in size["homogeneous_methods"]:
        jobs += [merge_job(f"homogeneous:{method}|{skill}", method, g["experts"]) for skill, g in groups.items()]
        jobs.append(merge_job(f"homogeneous:{method}|all", method, everyone))
    context = {
        "family": str(family), "pool": pool, "tasks": tasks, "methods": list(METHODS), "subsets": subsets,
        "n_values": size["n_values"], "n_items": size["n_items"],
        "sweeps": {"ta_lambda": size["ta_lambda"], "ties_points": size["ties_points"], "beta": size["beta"]},
        "homogeneous": {"groups": groups, "methods": size["homogeneous_methods"]},
        "defaults": {"ties_lambda": METHODS["TIES"][1]["lambda"]},
    }
    return jobs, context


# ------------------------------------------------------------------------------------------ metrics


def mean_accuracy(result: dict[str, Any], tasks: list[str]) -> float:
    """A model's score: the unweighted mean greedy exact match over ``tasks`` (the paper's benchmark average)."""
    return sum(result["eval"][t]["greedy"]["accuracy"] for t in tasks) / len(tasks)


def interference(scores: list[float], reference: float) -> tuple[float, float]:
    """One cell of Tables 1-3: the percentage of ``scores`` strictly above ``reference`` and the mean of
    ``score − reference`` in accuracy points (scores and reference are accuracies in [0, 1])."""
    above = 100.0 * sum(s > reference for s in scores) / len(scores)
    return above, 100.0 * sum(s - reference for s in scores) / len(scores)


def interference_cell(above: float, gain: float) -> str:
    """The paper's cell format: ``percentage / signed mean difference``, e.g. ``80 / +0.39``."""
    return f"{above:.0f} / {gain:+.2f}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0; one subset gives 0)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def merged_norm(result: dict[str, Any]) -> float:
    """``‖θ_merged − θ_base‖_2`` over every tensor (Figure 4), from the job's weights diagnostics."""
    return result["weights"]["task_vector_norm"]["merged"]["total"]


# ------------------------------------------------------------------------------------------ analysis


def analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tasks, pool, methods = context["tasks"], context["pool"], context["methods"]
    ns = [str(n) for n in context["n_values"]]
    score = {label: mean_accuracy(result, tasks) for label, result in results.items() if "eval" in result}
    base = score[f"parent:{BASE}"]
    experts = [score[f"parent:{e}"] for e in pool]
    best = max(range(len(pool)), key=lambda i: experts[i])
    scores = {m: {n: [score[f"main:{m}|n={n}|s={i}"] for i in range(len(context["subsets"][n]))] for n in ns}
              for m in methods}
    full_pool = results[f"main:{methods[0]}|n={len(pool)}|s=0"]["weights"]
    norms = {m: {n: [merged_norm(results[f"main:{m}|n={n}|s={i}"]) for i in range(len(context["subsets"][n]))]
                 for n in ns} for m in methods}
    expert_norms = [full_pool["task_vector_norm"][e]["total"] for e in pool]
    counts = {n: len(context["subsets"][n]) for n in ns}
    columns = [f"n=1 ({len(pool)})", *[f"n={n} ({counts[n]})" for n in ns]]

    def interference_rows(reference: float) -> list[list[Any]]:
        rows = []
        for m in methods:
            cells = [interference(experts, reference), *[interference(scores[m][n], reference) for n in ns]]
            rows.append([m, reference, *[interference_cell(*c) for c in cells]])
        return rows

    per_n = [[m, mean_std(experts)[0], *[mean_std(scores[m][n])[0] for n in ns]] for m in methods]
    norm_rows = [[m, mean_std(expert_norms)[0], *[mean_std(norms[m][n])[0] for n in ns]] for m in methods]
    tables = [
        table("Base and the twelve pool experts: exact match per task (the paper's n = 1 models, appendix A)",
              ["model", *tasks, "mean"], ["text", *["pct"] * len(tasks), "pct"],
              [[name, *[results[f"parent:{name}"]["eval"][t]["greedy"]["accuracy"] for t in tasks],
                score[f"parent:{name}"]] for name in [BASE, *pool]],
              f"Best single expert by mean accuracy: {pool[best]}."),
        table("Constructive interference against the base (Tables 1 and 3): % of merges above the base / mean "
              "difference in accuracy points", ["method", "base mean %", *columns],
              ["text", "pct", *["text"] * len(columns)], interference_rows(base),
              "Column n = k (m): k experts merged, m subsets. n = 1 scores the experts themselves."),
        table(f"Against the best single expert, {pool[best]} (Table 2, there for TA only): % of merges above it / "
              "mean difference in accuracy points", ["method", "best expert mean %", *columns],
              ["text", "pct", *["text"] * len(columns)], interference_rows(experts[best])),
        table("Mean accuracy over the subsets (Figures 3 and 6)", ["method", *columns],
              ["text", *["pct"] * len(columns)], per_n),
        table("Task-vector norm ‖θ_merged − θ_base‖₂, mean over the subsets (Figure 4)", ["method", *columns],
              ["text", *["num"] * len(columns)], norm_rows, "n = 1: the experts' own task-vector norms."),
        table(f"Exact match per task of the full-pool merges, n = {len(pool)} (appendix B)",
              ["model", *tasks, "mean"], ["text", *["pct"] * len(tasks), "pct"],
              [[m, *[results[f"main:{m}|n={len(pool)}|s=0"]["eval"][t]["greedy"]["accuracy"] for t in tasks],
                scores[m][str(len(pool))][0]] for m in methods]),
    ]
    cosine = _expert_cosines(full_pool, pool)
    tables += [
        table("Pairwise cosine similarity of the task vectors (appendix D, Figs. 19-22)", ["expert", *pool],
              ["text", *["num"] * len(pool)], [[a, *row] for a, row in zip(pool, cosine, strict=True)]),
        table("Layers with positive / negative task-vector cosine per pair (appendix D, Figs. 23-26)",
              ["expert", *pool], ["text", *["text"] * len(pool)], _sign_rows(full_pool, pool)),
    ]
    sweeps = _sweeps(context, results, score)
    tables += sweeps.pop("tables")
    homogeneous = _homogeneous(context, results)
    tables.append(homogeneous.pop("table"))
    x = [1, *[int(n) for n in ns]]
    return {
        "tables": tables,
        "notes": [f"Best method by mean accuracy at n = {ns[-1]}: "
                  f"{max(methods, key=lambda m: mean_std(scores[m][ns[-1]])[0])}; base mean accuracy "
                  f"{100 * base:.1f} %, best single expert ({pool[best]}) {100 * experts[best]:.1f} %."],
        "curves": {
            "x": x,
            "accuracy": {m: [mean_std(experts), *[mean_std(scores[m][n]) for n in ns]] for m in methods},
            "norm": {m: [mean_std(expert_norms), *[mean_std(norms[m][n]) for n in ns]] for m in methods},
            "references": {"base": base, f"best expert ({pool[best]})": experts[best]},
        },
        "cosine": {"labels": pool, "matrix": cosine},
        "sweeps": sweeps,
        "homogeneous": homogeneous,
    }


def _expert_cosines(weights: dict[str, Any], pool: list[str]) -> list[list[float]]:
    labels = weights["cosine"]["labels"]
    index = [labels.index(e) for e in pool]
    return [[weights["cosine"]["global"][i][j] for j in index] for i in index]


def _sign_rows(weights: dict[str, Any], pool: list[str]) -> list[list[str]]:
    """``positive/negative`` layer counts of every pair (``-`` on the diagonal)."""
    counts = weights["sign_counts"]

    def pair(a: str, b: str) -> str:
        if a == b:
            return "-"
        found = counts.get(f"{a}|{b}") or counts[f"{b}|{a}"]
        return f"{found['positive']}/{found['negative']}"

    return [[a, *[pair(a, b) for b in pool]] for a in pool]


def _sweeps(context: dict[str, Any], results: dict[str, Any], score: dict[str, float]) -> dict[str, Any]:
    """Appendix C: TA's λ with and without normalisation, the TIES density × λ points, SB's β."""
    spec = context["sweeps"]

    def point(label: str) -> tuple[float, float]:
        return score[label], merged_norm(results[label])

    ta = {normalize: [point(f"sweep:TA|normalize={normalize}|lambda={lam}") for lam in spec["ta_lambda"]]
          for normalize in (True, False)}
    ties = [point(f"sweep:TIES|density={d}|lambda={lam}") for d, lam in spec["ties_points"]]
    sb = {m: [point(f"sweep:{m}|beta={b}") for b in spec["beta"]] for m in ("TA+SB", "TIES+SB")}
    tables = [
        table("TA: scaling coefficient λ with and without normalisation, all twelve experts (appendix C.1, "
              "Figs. 11-12)", ["λ", "mean acc % (normalised)", "norm (normalised)", "mean acc % (sum)",
                               "norm (sum)"], ["num", "pct", "num", "pct", "num"],
              [[lam, *ta[True][i], *ta[False][i]] for i, lam in enumerate(spec["ta_lambda"])]),
        table("TIES: density × λ, all twelve experts (appendix C.2-C.3, Figs. 13-17)",
              ["density", "λ", "mean acc %", "task-vector norm"], ["num", "num", "pct", "num"],
              [[d, lam, *ties[i]] for i, (d, lam) in enumerate(spec["ties_points"])]),
        table("Subspace Boosting: threshold β, all twelve experts (appendix C.4, Fig. 18)",
              ["β", "TA+SB mean acc %", "TA+SB norm", "TIES+SB mean acc %", "TIES+SB norm"],
              ["num", "pct", "num", "pct", "num"],
              [[b, *sb["TA+SB"][i], *sb["TIES+SB"][i]] for i, b in enumerate(spec["beta"])]),
    ]
    at_default = [(d, ties[i][0]) for i, (d, lam) in enumerate(spec["ties_points"])
                  if lam == context["defaults"]["ties_lambda"]]
    at_default.sort()
    return {
        "tables": tables,
        "ta_lambda": {"x": spec["ta_lambda"], "normalised": [a for a, _ in ta[True]], "sum": [a for a, _ in ta[False]]},
        "ties_points": {f"d={d} λ={lam}": [norm, acc] for (d, lam), (acc, norm) in zip(spec["ties_points"], ties,
                                                                                    strict=True)},
        "ties_density": {"x": [d for d, _ in at_default], "accuracy": [a for _, a in at_default],
                         "lambda": context["defaults"]["ties_lambda"]},
        "beta": {"x": spec["beta"], **{m: [a for a, _ in values] for m, values in sb.items()}},
    }


def _homogeneous(context: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Appendix E: each group's merge and the all-six merge, scored on each group's suite."""
    groups, methods = context["homogeneous"]["groups"], context["homogeneous"]["methods"]
    base = results[f"parent:{BASE}"]
    header, kinds, rows = ["method"], ["text"], []
    for skill, group in groups.items():
        header += [f"{skill} suite: {skill} group (n={len(group['experts'])})", f"{skill} suite: all six",
                   "all − group (points)"]
        kinds += ["pct", "pct", "signed_pct"]
    series: dict[str, list[float]] = {}
    row = ["base (no merge)"]
    for group in groups.values():
        row += [mean_accuracy(base, group["suite"]), mean_accuracy(base, group["suite"]), None]
    rows.append(row)
    for m in methods:
        row = [m]
        for skill, group in groups.items():
            alone = mean_accuracy(results[f"homogeneous:{m}|{skill}"], group["suite"])
            together = mean_accuracy(results[f"homogeneous:{m}|all"], group["suite"])
            row += [alone, together, together - alone]
            series.setdefault(f"{skill} suite, {skill} group", []).append(alone)
            series.setdefault(f"{skill} suite, all six", []).append(together)
        rows.append(row)
    suites = "; ".join(f"{skill}: experts {', '.join(g['experts'])}, suite {', '.join(g['suite'])}"
                       for skill, g in groups.items())
    return {"table": table("Homogeneous against heterogeneous merges (appendix E, Figs. 27-28): mean accuracy on "
                           "each group's suite", header, kinds, rows, f"Groups (experts sharing a skill): {suites}."),
            "methods": methods, "series": series}


# ------------------------------------------------------------------------------------------ figures


def band_plot(path: Path, title: str, x: list[int], series: dict[str, list[list[float]]],
              references: dict[str, float], xlabel: str, ylabel: str, command: str, percent: bool) -> Path:
    """Mean lines with ± one standard deviation shaded (Figures 3, 4 and 6), dashed horizontal references."""
    plt, fig, ax = new_figure(7, 4.5)
    scale = 100 if percent else 1
    for name, points in series.items():
        means = [scale * m for m, _ in points]
        stds = [scale * s for _, s in points]
        (line,) = ax.plot(x, means, marker="o", label=name)
        ax.fill_between(x, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], color=line.get_color(), alpha=0.12)
    for name, value in references.items():
        ax.axhline(scale * value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (x[-1], scale * value), fontsize=7, color="gray", ha="right", va="bottom")
    ax.set_xticks(x)
    label_axes(ax, title, xlabel, ylabel, legend_columns=3)
    return save_figure(plt, fig, path, command)


def figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    curves, sweeps = analysis["curves"], analysis["sweeps"]
    made = [
        (band_plot(out / "accuracy_vs_n.png", "mean accuracy against the number of merged experts (Figs. 3, 6)",
                   curves["x"], curves["accuracy"], curves["references"], "experts merged (n)",
                   "mean exact match over tasks (%)", command, percent=True).name,
         "mean accuracy against n, ± one standard deviation over the subsets"),
        (band_plot(out / "norm_vs_n.png", "task-vector norm against the number of merged experts (Fig. 4)",
                   curves["x"], curves["norm"], {}, "experts merged (n)", "‖θ_merged − θ_base‖₂", command,
                   percent=False).name, "merged task-vector norm against n"),
        (heatmap(out / "cosine.png", "pairwise cosine of the pool's task vectors (appendix D)",
                 analysis["cosine"]["labels"], analysis["cosine"]["matrix"], command, "cosine").name,
         "pairwise task-vector cosines"),
        (line_plot(out / "ta_lambda.png", "TA: λ with and without normalisation (Figs. 11-12)",
                   sweeps["ta_lambda"]["x"], {"normalised (mean)": sweeps["ta_lambda"]["normalised"],
                                              "no normalisation (sum)": sweeps["ta_lambda"]["sum"]},
                   "λ", "mean exact match (%)", command).name, "TA λ sweep"),
        (scatter_plot(out / "ties_norm_accuracy.png", "TIES: accuracy against task-vector norm (Figs. 13-16)",
                      sweeps["ties_points"], "‖θ_merged − θ_base‖₂", "mean exact match (%)", command).name,
         "TIES density × λ: accuracy against norm"),
        (line_plot(out / "ties_density.png", f"TIES: top-k density at λ = {sweeps['ties_density']['lambda']} (Fig. 17)",
                   sweeps["ties_density"]["x"], {"TIES": sweeps["ties_density"]["accuracy"]}, "density",
                   "mean exact match (%)", command).name, "TIES density sweep"),
        (line_plot(out / "sb_beta.png", "Subspace Boosting: threshold β (Fig. 18)", sweeps["beta"]["x"],
                   {m: sweeps["beta"][m] for m in ("TA+SB", "TIES+SB")}, "β", "mean exact match (%)",
                   command).name, "Subspace Boosting β sweep"),
        (bar_plot(out / "homogeneous.png", "homogeneous against heterogeneous merges (Figs. 27-28)",
                  analysis["homogeneous"]["methods"], analysis["homogeneous"]["series"], "mean exact match (%)",
                  command).name, "homogeneous against heterogeneous merges"),
    ]
    return made
