"""``mergelab study karcher``: the Fisher-Rao Karcher paper's merge-scale experiment on the zoo.

Paper: "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold" (002 in ``shared/papers``), section 4:
figure 1 (average score against the number of merged models m = 2..11, with tables 1 and 3-5 holding the
numbers) and figure 2 / table 7 (activation variance and effective rank per layer for Karcher, Lerp and TIES).

Setting here (sec. 4.1, "Models and merge scale"): the paper merges the first m checkpoints of an 11-model
Qwen2.5-14B pool; here the first m experts of a fixed order (``expert_order``: ``random.Random(0)`` shuffle of
the sorted member names, the same for every method) of

- the ``tiny-lm`` in-the-wild pool ``pool_00`` .. ``pool_11`` at m = 2..11 (one member is left out, as the
  paper's pool has 11 models), and
- the ``vision`` family's seven task experts at m = 2..7.

Methods (sec. 4.1, "Baselines"), every model with weight 1 ("equal source weights"), mergekit's defaults
otherwise: Karcher (spherical proxy, eq. 5 and sec. 3.4: step 1, 10 iterations, tol 1e-5, no Fisher
preconditioning; it merges the experts' weights, the base takes no part), Lerp (``linear``, normalised),
Multi-SLERP (on task vectors against the base), Model Stock, TIES, DARE-linear, DARE-TIES, DELLA-linear,
DELLA-TIES (``della``), all four sparsifiers at density 0.5 (mergekit's default density of 1 would keep every
entry; DELLA's epsilon 0.15), SCE (``select_topk`` 1) and arcee-fusion-style SCF-KL (``scf_kl`` with the
``lower`` quantiles; with several experts each is thresholded against the base and the most salient passing
expert gives each element, the ``max_saliency`` rule). With weight 1 and mergekit's ``normalize: false``,
DARE-linear, DARE-TIES and DELLA-linear add the m task vectors (task arithmetic at lambda = 1), as a mergekit
recipe with ``weight: 1.0`` does. Random methods use seed 0.

Metric (sec. 4.1 reports raw normalised-to-[0, 1] benchmark scores and their unweighted average; it does not
divide by the experts' own scores): the unweighted mean accuracy over the union of the merged experts' own tasks
(tiny-lm: each pool member's skills in ``tinylm.POOL`` that are tasks of ``mergelab.tasks``, greedy exact match;
vision: each expert's task with its frozen head). The base and, per task, the best of the merged experts are
shown as references. Deviation: the paper scores every m on the same five benchmarks; the tasks here grow with
m, because the zoo's experts each know only their own skills.

Figure 2 (sec. 4.2, Q4): ``activations`` diagnostics of the Karcher, Lerp and TIES merges at the largest m of
the tiny-lm pool, on the test prompts of the merged experts' tasks: activation variance, effective rank and
numerical rank of each decoder layer's output, and the KL between each expert's and the merge's next-token
distributions (the function distance of eq. 2).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.citations import FISHER_RAO, cite
from mergelab.study.jobs import Job
from mergelab.study.report import line_plot, table
from mergelab.study.settings import StudySettings

TITLE = "Karcher merging against baselines as the number of merged models grows"
PAPER = cite(FISHER_RAO, "Figure 1, Tables 1 and 3-5, Figure 2 and Table 7")
SEED = 0  # the expert order and the random methods' seed
FAMILIES = ("tiny-lm", "vision")
DIAGNOSED = ("Karcher", "Lerp", "TIES")  # figure 2's methods
TABLE1_MS = (2, 5)  # table 1 reports m = 2 and m = 5
SIZES = {
    "quick": {"ms": {"tiny-lm": (2, 4), "vision": (2, 4)}, "n_items": {"tiny-lm": 12, "vision": 200},
              "probes_per_task": 4},
    "full": {"ms": {"tiny-lm": tuple(range(2, 12)), "vision": tuple(range(2, 8))},
             "n_items": {"tiny-lm": 100, "vision": 2000}, "probes_per_task": 16},
}


def methods() -> dict[str, tuple[str, dict[str, Any], bool]]:
    """Label -> (merge_method, the recipe's top-level parameters, whether the recipe names the base)."""
    sparse = {"weight": 1.0, "density": 0.5}
    return {
        "Karcher": ("karcher", {"weight": 1.0}, False),
        "Lerp": ("linear", {"weight": 1.0}, False),
        "Multi-SLERP": ("multislerp", {"weight": 1.0}, True),
        "Model Stock": ("model_stock", {}, True),
        "TIES": ("ties", sparse, True),
        "DARE-linear": ("dare_linear", sparse, True),
        "DARE-TIES": ("dare_ties", sparse, True),
        "DELLA-linear": ("della_linear", sparse, True),
        "DELLA-TIES": ("della", sparse, True),
        "SCE": ("sce", {}, True),
        "SCF-KL (arcee-fusion style)": ("scf_kl", {"quantile_method": "lower"}, True),
    }


def expert_order(family: str) -> list[str]:
    """The family's experts in the study's fixed order: ``random.Random(SEED)`` shuffle of the sorted names."""
    names = sorted(_experts(family))
    return random.Random(SEED).sample(names, len(names))


def _experts(family: str) -> dict[str, list[str]]:
    """Expert name -> its own tasks (tiny-lm: the pool member's skills that are evaluation tasks)."""
    return {name: [t for t in _task_order(family) if t in mix] for name, mix in _mixes(family).items()}


def _mixes(family: str) -> dict[str, Sequence[str]]:
    if family == "tiny-lm":
        from mergelab.zoo.tinylm import POOL

        return {name: list(mix) for name, (mix, *_rest) in POOL.items()}
    return {name: [name] for name in _task_order(family)}


def _task_order(family: str) -> list[str]:
    if family == "tiny-lm":
        from mergelab.tasks import TASKS
    else:
        from mergelab.zoo.vision import TASKS
    return list(TASKS)


def merged_tasks(family: str, experts: Sequence[str]) -> list[str]:
    """The union of the experts' own tasks, in the family's task order."""
    own = _experts(family)
    return [t for t in _task_order(family) if any(t in own[name] for name in experts)]


def zoo_size(family: str, size: str) -> str:
    """The family's size for the study's zoo size: vision has no ``demo`` size, its ``full`` one is used."""
    return size if family == "tiny-lm" or size == "test" else "full"


def merge_label(family: str, method: str, m: int) -> str:
    return f"{family} | {method} | m={m}"


def parent_label(family: str, name: str) -> str:
    return f"{family} | {name}"


def plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab import zoo
    from mergelab.tasks import TASKS

    size = SIZES["quick" if settings.quick else "full"]
    jobs: list[Job] = []
    context: dict[str, Any] = {"seed": SEED, "methods": list(methods()), "diagnosed": list(DIAGNOSED),
                               "families": {}}
    for family in FAMILIES:
        ms = list(size["ms"][family])
        order = expert_order(family)
        used = order[: max(ms)]
        fam_size = zoo_size(family, settings.size())
        folder = zoo.require(family, fam_size, ["base", *used], settings.build_zoo, settings.device,
                             settings.progress)
        n = size["n_items"][family]
        parents_measure = _measure(family, folder, n, merged_tasks(family, used))  # every task of the study
        jobs += [Job(label=parent_label(family, name), model=str(folder / name), **parents_measure)
                 for name in ["base", *used]]
        tasks_by_m = [merged_tasks(family, order[:m]) for m in ms]
        for label, (method, params, with_base) in methods().items():
            for m, tasks in zip(ms, tasks_by_m, strict=True):
                recipe: dict[str, Any] = {"merge_method": method, "models": [{"model": str(folder / e)}
                                                                             for e in order[:m]],
                                          "parameters": params, "seed": SEED}
                if with_base:
                    recipe["base_model"] = str(folder / "base")
                diagnostics = None
                if family == "tiny-lm" and m == max(ms) and label in DIAGNOSED:
                    prompts = [e.prompt for t in tasks for e in TASKS[t].examples("test", size["probes_per_task"])]
                    diagnostics = {"base": str(folder / "base"), "experts": [str(folder / e) for e in order[:m]],
                                   "prompts": prompts, "probe_length": 32, "nl_layers": []}
                jobs.append(Job(label=merge_label(family, label, m), recipe=recipe, activations=diagnostics,
                                **_measure(family, folder, n, tasks)))
        context["families"][family] = {"zoo_size": fam_size, "folder": str(folder), "order": order, "ms": ms,
                                       "own_tasks": {e: _experts(family)[e] for e in used},
                                       "tasks_by_m": tasks_by_m, "n_items": n}
    return jobs, context


def _measure(family: str, folder: Path, n_items: int, tasks: list[str]) -> dict[str, Any]:
    """The Job fields that score ``tasks``: greedy generation (tiny-lm) or each task's head (vision)."""
    if family == "vision":
        return {"vision_tasks": tasks, "n_items": n_items, "heads": str(folder)}
    return {"tasks": tasks, "n_items": n_items, "eval_options": {"batch_size": 64}}


# ---------------------------------------------------------------------------------------------- metrics


def task_scores(family: str, result: dict[str, Any]) -> dict[str, float]:
    """Task -> accuracy of one job (tiny-lm: greedy exact match; vision: accuracy with the task's head)."""
    if family == "vision":
        return dict(result["vision"])
    return {task: figures["greedy"]["accuracy"] for task, figures in result["eval"].items()}


def mean_accuracy(scores: dict[str, float], tasks: Sequence[str]) -> float | None:
    """The unweighted mean of ``scores`` over ``tasks`` (the paper's Avg column, sec. 4.1); None without tasks."""
    return sum(scores[t] for t in tasks) / len(tasks) if tasks else None


def best_expert_mean(expert_scores: Sequence[dict[str, float]], tasks: Sequence[str]) -> float | None:
    """Mean over ``tasks`` of the best score any of the merged experts reaches on that task (a reference)."""
    return mean_accuracy({t: max(s[t] for s in expert_scores) for t in tasks}, tasks)


def ranks(values: dict[str, float | None]) -> dict[str, int]:
    """Competition rank (1 = best; ties share the better rank) of each non-missing value."""
    present = {k: v for k, v in values.items() if v is not None}
    return {k: 1 + sum(other > v for other in present.values()) for k, v in present.items()}


def best_methods(values: dict[str, float | None]) -> str:
    """The method with the highest value; tied ones joined by ' = ', or their count when more than three tie."""
    top = [k for k, rank in ranks(values).items() if rank == 1]
    if not top:
        return "-"
    return " = ".join(top) if len(top) <= 3 else f"{len(top)} methods tie"


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# ---------------------------------------------------------------------------------------------- analysis


def analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tables: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    notes = [f"Experts merged at m: the first m of a fixed order (random.Random({context['seed']}) shuffle of the "
             "sorted names), the same for every method. Score: unweighted mean accuracy (%) over the union of the "
             "merged experts' own tasks, as the paper averages raw benchmark scores (no normalisation by the "
             "experts' own scores)."]
    for family, fam in context["families"].items():
        ms, order = fam["ms"], fam["order"]
        scores = {merge_label(family, label, m): task_scores(family, results[merge_label(family, label, m)])
                  for label in context["methods"] for m in ms}
        parents = {name: task_scores(family, results[parent_label(family, name)])
                   for name in ["base", *order[: max(ms)]]}
        series: dict[str, list[float | None]] = {
            label: [mean_accuracy(scores[merge_label(family, label, m)], tasks)
                    for m, tasks in zip(ms, fam["tasks_by_m"], strict=True)]
            for label in context["methods"]}
        references = {
            "base (reference)": [mean_accuracy(parents["base"], tasks) for tasks in fam["tasks_by_m"]],
            "best merged expert per task (reference)": [
                best_expert_mean([parents[e] for e in order[:m]], tasks)
                for m, tasks in zip(ms, fam["tasks_by_m"], strict=True)],
        }
        by_m = [{label: values[i] for label, values in series.items()} for i in range(len(ms))]
        best = [best_methods(row) for row in by_m]
        karcher_rank = [ranks(row).get("Karcher") for row in by_m]
        rows = [[label, *values, _mean(values)] for label, values in {**series, **references}.items()]
        note = ("Best method at each m: " + "; ".join(f"m={m}: {b}" for m, b in zip(ms, best, strict=True))
                + f". Karcher's rank among the {len(series)} methods: "
                + ", ".join(f"m={m}: {r}" for m, r in zip(ms, karcher_rank, strict=True)) + ". Experts in order: "
                + ", ".join(f"{e} ({'+'.join(fam['own_tasks'][e]) or 'no task'})" for e in order[: max(ms)])
                + ".")
        tables.append(table(f"{family}: mean accuracy (%) against the number of merged models m "
                            "(Figure 1; Tables 3-5)",
                            ["method", *[f"m={m}" for m in ms], "mean over m"], ["text", *["pct"] * (len(ms) + 1)],
                            rows, note))
        tables.append(_per_task_table(family, fam, context["methods"], scores, parents))
        curves[family] = {"ms": ms, "series": {**series, **references}}
    m = max(context["families"]["tiny-lm"]["ms"])
    layers = layer_diagnostics({label: results[merge_label("tiny-lm", label, m)]["activations"]
                                for label in context["diagnosed"]},
                               m, f"tiny-lm, m = {m}, test prompts of the merged experts' tasks")
    tables += layers.pop("tables")
    return {"tables": tables, "notes": notes, "curves": curves, "layers": layers}


def _per_task_table(family: str, fam: dict[str, Any], labels: Sequence[str], scores: dict[str, dict[str, float]],
                    parents: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-task accuracy at the m of table 1 (2 and 5; the largest planned m up to 5 when 5 is not planned)."""
    ms = fam["ms"]
    shown = sorted({m for m in TABLE1_MS if m in ms} | {max(m for m in ms if m <= TABLE1_MS[-1])})
    tasks = fam["tasks_by_m"][ms.index(shown[-1])]
    rows = []
    for m in shown:
        merged = fam["tasks_by_m"][ms.index(m)]
        for label in labels:
            row = scores[merge_label(family, label, m)]
            rows.append([label, m, *[row[t] if t in merged else None for t in tasks], mean_accuracy(row, merged)])
    rows += [[name, "-", *[parents[name][t] for t in tasks], mean_accuracy(parents[name], tasks)]
             for name in parents]
    return table(f"{family}: accuracy (%) per task when merging m = {' and '.join(map(str, shown))} models "
                 "(Table 1)", ["model", "m", *tasks, "avg"], ["text", "text", *["pct"] * (len(tasks) + 1)], rows,
                 "Parents (the base and each expert, unmerged) are scored on every task shown; '-' marks tasks "
                 "of experts not in that merge. avg: over the merged experts' tasks (parents: over all shown).")


def layer_diagnostics(found: dict[str, dict[str, Any]], m: int, where: str) -> dict[str, Any]:
    """Figure 2 / table 7: per-layer activation statistics and the KL to the experts of the merges at the
    largest m; ``found``: method label -> its job's ``activations`` result; ``where``: the family, m and probes,
    for the titles."""
    labels = list(found)
    first = next(iter(found.values()))["models"]
    experts = [k for k in first if k not in ("merged", "base")]
    stats = ("variance", "effective_rank", "numerical_rank")
    per_layer = {label: found[label]["models"]["merged"]["per_layer"] for label in labels}
    per_layer["base"] = first["base"]["per_layer"]
    per_layer["experts (mean)"] = {s: [_mean([first[e]["per_layer"][s][i] for e in experts])
                                       for i in range(len(first["base"]["per_layer"][s]))] for s in stats}
    layers = list(range(len(per_layer["base"]["variance"])))
    rows = [[label, layer, *[values[s][layer] for s in stats]] for label, values in per_layer.items()
            for layer in layers]
    kl_rows = [[label, _mean([found[label]["models"][e]["kl_parent_to_merged"] for e in experts]),
                _mean([found[label]["models"][e]["kl_merged_to_parent"] for e in experts]),
                found[label]["models"]["base"]["kl_parent_to_merged"],
                found[label]["models"]["merged"]["next_token_entropy"]] for label in labels]
    probes = next(iter(found.values()))["probes"]
    where = f"{where} ({probes['n']} probes, {probes['tokens']} tokens)"
    return {
        "tables": [
            table(f"Activation variance, effective rank and numerical rank of each decoder layer's output "
                  f"(Figure 2; Table 7): {where}",
                  ["model", "layer", "variance", "effective rank", "numerical rank"],
                  ["text", "text", "num", "num", "num"], rows,
                  "experts (mean): the mean over the merged experts of each statistic."),
            table(f"Function distance to the experts (eq. 2): {where}",
                  ["merge", "mean KL(expert ‖ merged)", "mean KL(merged ‖ expert)", "KL(base ‖ merged)",
                   "next-token entropy"], ["text", "num", "num", "num", "num"], kl_rows,
                  "KL in nats per token, averaged over the merged experts; lower: closer to the experts' "
                  "predictions (the objective the Karcher mean targets, eqs. 2-3)."),
        ],
        "m": m,
        "where": where,
        "x": layers,
        "series": {s: {label: values[s] for label, values in per_layer.items()} for s in stats},
    }


def figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    made = []
    for family, curve in analysis["curves"].items():
        name = f"figure1_{family.replace('-', '_')}.png"
        line_plot(out / name, f"{family}: mean accuracy against the number of merged models (Figure 1)",
                  curve["ms"], curve["series"], "number of merged models m", "mean accuracy (%)", command)
        made.append((name, f"{family}: mean accuracy against m"))
    return made + layer_figures(out, analysis["layers"], command)


def layer_figures(out: Path, layers: dict[str, Any], command: str) -> list[tuple[str, str]]:
    """Figure 2: activation variance and effective rank per layer (``layer_diagnostics``'s series)."""
    made = []
    for stat, title in (("variance", "activation variance"), ("effective_rank", "effective rank")):
        name = f"figure2_{stat}.png"
        line_plot(out / name, f"{title} per layer at m = {layers['m']} (Figure 2)", layers["x"],
                  layers["series"][stat], "decoder layer", title, command, percent=False)
        made.append((name, f"{title} per layer at m = {layers['m']}"))
    return made
