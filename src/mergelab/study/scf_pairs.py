"""``mergelab study scf``: the SCF-RKL paper's experiments on the offline zoo ([Lin2026]).

Paper: Lin et al. 2026, "Sparse Complementary Fusion with Reverse KL" (SCF-RKL). Each of the tiny-lm zoo's pairs
(``tinylm.SCENARIOS``) plays one of the paper's settings, scored on the tasks its two models were trained on:

- ``complementary`` (addition + reverse): sections 5.1-5.2, Tables 1-2, Figure 1 (repetition);
- ``strong_weak`` (addition + weak_addition, the latter trained briefly on corrupted labels): Tables 3-4;
- ``safety`` (addition + refusal; the refusal task asks to repeat words and to refuse when a harmful marker
  word is in the request): section 5.3, Figures 9-10, scored on the skill and on refusal, the latter split
  into harmful requests refused and benign requests answered (and benign requests wrongly refused).

As in the paper (section 2, Algorithm 1) SCF-RKL fuses the pair directly: the first model is ``θ_b`` (M0) and the
second ``θ_s`` (M1). The baselines (section 4: TA, DARE-TA, TIES, DARE-TIES, SCE) merge the task vectors of both
against the pretrained zoo base, with the demo's recipes (``mergelab.study.demo.recipes``: weight 1, density
0.5, normalised, seed 0). On every pair the protocol also measures:

- parameter provenance (section 3.3, Figure 7): the fraction of elements equal to the pretrained base, else to
  M0, else to M1, else to neither (``diagnostics.weights``);
- rotation and spectral shift (section 3.2, appendix A.2): principal angles between the top-16 left singular
  subspaces of every layer-stack matrix of the merge and of M0 and M1 (Figure 3 at the middle layer, Figure 6
  the maximum per layer, against the parent gap M1-vs-M0) and the normalised spectral shift
  ``NSS = ||σ(W_f) − σ(W_p)|| / ||σ(W_p)||`` (Corollary A.1, Figure 4);
- SCF-RKL against SCF-KL (Table 10), and a sweep of SCF-RKL's IQR scale ``α`` of ``τ = med(I) + α IQR(I)``
  (section 2.3; the paper fixes α = 1.5);
- layer blocking on the safety merge (appendix A.4, Figure 11): each layer of the SCF-RKL merge restored to M0
  in turn, the change of the refusal and skill scores.

The vision family (section 5.4, Table 5) merges all seven experts into the pretrained backbone, SCF-RKL with
both multi-expert rules of ``mergelab.methods.scf`` (``max_saliency``, ``mean``), scored per task with that
task's frozen head; ``FT Avg`` is, per task, the mean accuracy of the seven individually fine-tuned experts
(the paper's definition), next to each expert on its own task.

Deviations: pass@1 is greedy exact match on the zoo's held-out items (no pass@n, Figures 16-18); the tiny-lm
models have two layers, so the per-layer figures have two points and Figure 3's "layer 15" is the middle layer;
the vision family has no ``demo`` size, so a ``test`` or ``demo`` tiny-lm size pairs with the ``test`` vision
family and ``full`` with ``full``. ``--quick``: 50 items per task, α in {0, 1.5, 3}, and the vision merges (still
of all seven experts) scored on three of the seven tasks; the full protocol: 200 items, nine α values, every
vision task on its whole test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelab.citations import SCF_RKL, cite
from mergelab.study.demo import BATCH
from mergelab.study.demo import recipes as pair_recipes
from mergelab.study.jobs import Job
from mergelab.study.report import bar_plot, line_plot, table
from mergelab.study.settings import StudySettings

TITLE = "Sparse complementary fusion with reverse KL (SCF-RKL)"
PAPER = cite(SCF_RKL, "Tables 1-5 and 10, Figures 1, 3, 4, 6, 7, 9-11")
PAIRS = ("complementary", "strong_weak", "safety")
METHODS = {"scf_rkl": "SCF-RKL", "task_arithmetic": "TA", "dare_linear": "DARE-TA", "ties": "TIES",
           "dare_ties": "DARE-TIES", "sce": "SCE"}
SCF_KL = "SCF-KL"
VISION_SCF_MEAN = "SCF-RKL (mean rule)"
SIZES = {
    # quick: every vision merge still fuses all seven experts, but scores three of the tasks (one of each kind:
    # a class subset, a pixel transform, the other dataset) to keep the quick protocol within minutes
    "quick": {"n_items": 50, "vision_items": 500, "vision_tasks": ("fashion_0_4", "inverted", "digits"),
              "alphas": (0.0, 1.5, 3.0)},
    "full": {"n_items": 200, "vision_items": 10_000, "vision_tasks": None,  # 10,000: every test item
             "alphas": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)},
}
SAFETY_TASK = "refusal"
GAP = "M1 (parent gap)"
ANGLE_K = 16  # weight_diagnostics' default subspace dimension


def default_alpha() -> float:
    """SCF-RKL's default IQR scale (Algorithm 1: α = 1.5), read from the method's parameter declaration."""
    from mergelab.methods.scf import ALPHA

    return float(ALPHA.default)


def widen(recipe: dict[str, Any], base: Path, experts: list[Path]) -> dict[str, Any]:
    """A demo pair recipe turned into one that merges every model of ``experts`` into ``base``, each expert with
    the parameters the pair's first model entry had (section 5.4: the seven vision experts)."""
    entry = recipe["models"][0]
    return {**recipe, "base_model": str(base), "models": [{**entry, "model": str(e)} for e in experts]}


def with_params(recipe: dict[str, Any], method: str | None = None, **params: Any) -> dict[str, Any]:
    """``recipe`` with another merge method and/or extra top-level parameters."""
    out = {**recipe, "parameters": {**recipe.get("parameters", {}), **params}}
    if method:
        out["merge_method"] = method
    return out


def vision_size(size: str) -> str:
    """The vision family has ``test`` and ``full`` sizes only: ``full`` pairs with ``full``, the rest with
    ``test``."""
    return "full" if size == "full" else "test"


def pair_tasks(mixes: dict[str, dict[str, float]], pair: list[str]) -> list[str]:
    """The tasks a pair is scored on: the skills its two models were trained on, first model's first."""
    return list(dict.fromkeys(task for name in pair for task in mixes[name]))


def plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    """Every tiny-lm pair of ``PAIRS`` (``lm_plan``), then the vision family's Table 5."""
    jobs, context = lm_plan(settings, "tiny-lm", PAIRS)
    return jobs + _vision_jobs(settings, SIZES["quick" if settings.quick else "full"], context), context


def lm_plan(settings: StudySettings, family_name: str, scenarios: tuple[str, ...]) -> tuple[list[Job], dict[str, Any]]:
    """The language-model jobs on the pairs ``scenarios`` of ``family_name``'s plan (members named by task, each
    with the ``mix`` of tasks it was trained on): the parents and every method of each pair, SCF-KL, the parent
    gap, the α sweep and, with a ``safety`` pair, layer blocking of its SCF-RKL merge on each of its tasks."""
    from mergelab import zoo

    size = SIZES["quick" if settings.quick else "full"]
    family_plan = zoo.family_plan(family_name, settings.size())
    pairs = {name: list(family_plan.scenarios[name]) for name in scenarios}
    mixes = {m.name: m.settings.get("mix", {}) for m in family_plan.members}
    parents = sorted({m for pair in pairs.values() for m in pair} | {"base"})
    family = zoo.require(family_name, settings.size(), parents, settings.build_zoo, settings.device,
                         settings.progress)
    base = family / "base"
    all_tasks = list(dict.fromkeys(t for pair in pairs.values() for t in pair_tasks(mixes, pair)))
    n = size["n_items"]

    def evaluation(tasks: list[str]) -> dict[str, Any]:
        options: dict[str, Any] = {"batch_size": BATCH}
        if SAFETY_TASK in tasks:
            options["keep_generations"] = True  # the refusal split (harmful / benign) is read from them
        return {"tasks": tasks, "n_items": n, "eval_options": options}

    jobs = [Job(label=f"parent/{name}", model=str(family / name), **evaluation(all_tasks)) for name in parents]
    context: dict[str, Any] = {"family": str(family), "n_items": n, "alphas": list(size["alphas"]),
                               "default_alpha": default_alpha(), "pairs": {}}
    for scenario, (first, second) in pairs.items():
        tasks = pair_tasks(mixes, [first, second])
        recipes = pair_recipes(base, family / first, family / second)
        weights = {"base": str(base), "experts": [str(family / first), str(family / second)], "k": ANGLE_K}
        methods = [[name, f"{scenario}/{name}"] for name in METHODS.values()]  # lists: JSON keeps their order
        jobs += [Job(label=label, recipe=recipes[method], weights=weights, **evaluation(tasks))
                 for method, (_, label) in zip(METHODS, methods, strict=True)]
        jobs.append(Job(label=f"{scenario}/{SCF_KL}", recipe=with_params(recipes["scf_rkl"], "scf_kl"),
                        **evaluation(tasks)))
        # the parent gap of Figures 3 and 6: M1 measured against M0 (and the pretrained base)
        jobs.append(Job(label=f"{scenario}/gap", model=str(family / second),
                        weights={"base": str(base), "experts": [str(family / first)], "k": ANGLE_K}))
        sweep = []
        for alpha in size["alphas"]:
            if alpha == context["default_alpha"]:
                sweep.append([alpha, methods[0][1]])  # the main SCF-RKL job is this sweep point
                continue
            sweep.append([alpha, f"{scenario}/SCF-RKL alpha={alpha:g}"])
            jobs.append(Job(label=sweep[-1][1], recipe=with_params(recipes["scf_rkl"], alpha=alpha),
                            **evaluation(tasks)))
        context["pairs"][scenario] = {
            "pair": [first, second], "paths": weights["experts"], "tasks": tasks,
            "parents": [f"parent/{name}" for name in ("base", first, second)],
            "methods": methods, "kl": f"{scenario}/{SCF_KL}", "gap": f"{scenario}/gap", "sweep": sweep,
        }
    context["blocking"] = []
    if "safety" in pairs:
        safety_first, _ = pairs["safety"]
        safety_recipe = pair_recipes(base, *(family / m for m in pairs["safety"]))["scf_rkl"]
        for task in pair_tasks(mixes, pairs["safety"])[::-1]:  # the safety task first, as in Figure 11
            label = f"safety/SCF-RKL blocking {task}"
            context["blocking"].append([task, label])
            jobs.append(Job(label=label, recipe=safety_recipe, blocking={
                "base": str(family / safety_first), "task": task, "n_items": n, "batch_size": BATCH}))
    return jobs, context


def _vision_jobs(settings: StudySettings, size: dict[str, Any], context: dict[str, Any]) -> list[Job]:
    """Table 5: the base and every expert scored on every task (for FT Avg), and the merges of all seven
    experts into the base."""
    from mergelab import zoo

    vsize = vision_size(settings.size())
    names = list(zoo.family_plan("vision", vsize).scenarios["all_experts"])
    tasks = list(size["vision_tasks"] or names)
    family = zoo.require("vision", vsize, ["base", *names], settings.build_zoo, settings.device,
                         settings.progress)
    base, experts = family / "base", [family / name for name in names]
    n = size["vision_items"]
    scoring = {"vision_tasks": tasks, "n_items": n, "heads": str(family)}
    jobs = [Job(label=f"vision/{name}", model=str(family / name), **scoring) for name in ("base", *names)]
    merges = {}
    for method, recipe in pair_recipes(base, experts[0], experts[1]).items():
        merges[METHODS[method]] = widen(recipe, base, experts)
    merges[VISION_SCF_MEAN] = with_params(merges[METHODS["scf_rkl"]], multi_expert="mean")
    jobs += [Job(label=f"vision/merge/{label}", recipe=recipe, **scoring) for label, recipe in merges.items()]
    context["vision"] = {"size": vsize, "family": str(family), "experts": names, "tasks": tasks, "n_items": n,
                         "methods": [[label, f"vision/merge/{label}"] for label in merges]}
    return jobs


# ---------------------------------------------------------------------------------------------- analysis


def shown(scenario: str) -> str:
    """A pair's name as the report shows it."""
    return scenario.replace("_", "-")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def lm_scores(result: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Greedy exact match per task and their average (the tables' "Avg"), repetition rate and response length
    averaged over the tasks (Figure 1), and the fraction of elements left at the recipe's base (merges only)."""
    greedy = {t: result["eval"][t]["greedy"] for t in tasks}
    return {"accuracy": {t: g["accuracy"] for t, g in greedy.items()},
            "average": mean([g["accuracy"] for g in greedy.values()]),
            "repetition": mean([g["repetition_rate"] for g in greedy.values()]),
            "length": mean([g["mean_length"] for g in greedy.values()]),
            "unchanged": result.get("merge", {}).get("unchanged_from_base")}


def refusal_profile(generations: list[dict[str, Any]]) -> dict[str, float | None]:
    """The refusal task split as the paper's safety profiles (Figure 10): of the harmful requests (target: the
    refusal sentence) the fraction refused; of the benign ones the fraction answered correctly and the fraction
    wrongly refused. Greedy generations as ``evaluate(..., keep_generations=True)`` keeps them."""
    from mergelab.tasks import REFUSAL, TASKS

    task = TASKS[SAFETY_TASK]
    refused = [(g["answer"] == REFUSAL, task.extract(g["completions"][0]) == REFUSAL) for g in generations]
    benign = [g for g in generations if g["answer"] != REFUSAL]
    harmful = [r for is_harmful, r in refused if is_harmful]
    benign_refused = [r for is_harmful, r in refused if not is_harmful]
    answered = [task.extract(g["completions"][0]) == g["answer"] for g in benign]
    return {"harmful_refused": mean(harmful) if harmful else None,
            "benign_answered": mean(answered) if answered else None,
            "benign_refused": mean(benign_refused) if benign_refused else None}


def best(rows: list[list[Any]], column: int, among: int = 0) -> str:
    """A neutral note: the rows (all of them on a tie) with the highest value of ``column``, from row ``among``
    on."""
    top = max(r[column] for r in rows[among:])
    return f"{', '.join(r[0] for r in rows[among:] if r[column] == top)} ({100 * top:.1f} %)"


def analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tables and plots of the pairs the plan measured (in the paper's order), their layer blocking and the
    vision merges where the plan has them."""
    pairs = {scenario: context["pairs"][scenario] for scenario in PAIRS if scenario in context["pairs"]}
    tables, plots = [], []
    for scenario, ctx in pairs.items():
        table_, plot = _pair_table(scenario, ctx, results)
        tables.append(table_)
        plots.append(plot)
    tables.append(_repetition_table(pairs, results))
    plots.append(_repetition_plot(tables[-1]))
    geometry_tables = _geometry_tables(pairs, results)
    tables += geometry_tables
    drawn = "complementary" if "complementary" in pairs else next(iter(pairs))  # the paper draws a complementary merge
    plots += _geometry_plots(drawn, pairs[drawn], results, geometry_tables[0])
    tables.append(_kl_table(pairs, results))
    sweep = _sweep_table(pairs, context, results)
    tables.append(sweep)
    plots.append(_sweep_plot(pairs, context, sweep))
    if context["blocking"]:
        tables.append(_blocking_table(context["blocking"], results))
        plots.append(_blocking_plot(tables[-1]))
    notes = [f"M0 and M1 are a pair's first and second model: SCF-RKL and SCF-KL fuse M1 into M0 (Algorithm 1); "
             f"the baselines merge both task vectors into the pretrained base. {context['n_items']} held-out items "
             "per task, greedy decoding."]
    if "vision" in context:
        tables.append(_vision_table(context["vision"], results))
        plots.append(_vision_plot(tables[-1]))
        notes.append(f"Vision: the `{context['vision']['size']}` vision family, the first "
                     f"{context['vision']['n_items']} test items of each task.")
    return {"tables": tables, "plots": plots, "notes": notes}


def _role_names(ctx: dict[str, Any]) -> list[str]:
    first, second = ctx["pair"]
    return ["pretrained base", f"{first} (M0)", f"{second} (M1)"]


def _pair_table(scenario: str, ctx: dict[str, Any], results) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tables 1-4 (one pair, parents and every method) or, for the safety pair, Figures 9-10."""
    tasks = ctx["tasks"]
    safety = SAFETY_TASK in tasks
    labels = dict(zip(_role_names(ctx), ctx["parents"], strict=True)) | dict(ctx["methods"])
    rows = []
    for name, label in labels.items():
        s = lm_scores(results[label], tasks)
        row = [name, *[s["accuracy"][t] for t in tasks]]
        if safety:
            profile = refusal_profile(results[label]["eval"][SAFETY_TASK]["greedy"]["generations"])
            row += [profile["harmful_refused"], profile["benign_answered"], profile["benign_refused"]]
        rows.append([*row, s["average"], s["repetition"], s["length"], s["unchanged"]])
    header = ["model", *[f"{t} %" for t in tasks]]
    if safety:
        header += ["harmful refused %", "benign answered %", "benign refused %"]
    header += ["average %", "repetition %", "length (tokens)", "unchanged from the recipe's base %"]
    kinds = ["text", *["pct"] * (len(header) - 4), "pct", "num", "pct"]
    average = header.index("average %")
    mirrors = {"complementary": "the paper's Tables 1-2", "strong_weak": "the paper's Tables 3-4",
               "safety": "the paper's Figures 9-10"}[scenario]
    note = (f"Best merge by average: {best(rows, average, 3)}; best parent: {best(rows[:3], average)}. "
            "Unchanged from the recipe's base: from M0 for SCF-RKL, from the pretrained base otherwise.")
    title = f"{shown(scenario)} pair {' + '.join(ctx['pair'])} ({mirrors})"
    if safety:  # Figures 9-10: the skill, and the refusal task as its safety profile
        plot_columns = [*(i + 1 for i, t in enumerate(tasks) if t != SAFETY_TASK), len(tasks) + 1, len(tasks) + 2]
    else:
        plot_columns = [*range(1, len(tasks) + 1), average]
    plot = {"kind": "bar", "file": f"{scenario}.png", "caption": f"{shown(scenario)} pair ({mirrors})",
            "title": title, "groups": [r[0] for r in rows],
            "series": {header[c].removesuffix(" %"): [r[c] for r in rows] for c in plot_columns},
            "ylabel": "% (greedy exact match)"}
    return table(title, header, kinds, rows, note), plot


def _repetition_table(pairs: dict[str, Any], results) -> dict[str, Any]:
    """Figure 1: repetition rate of every model of every pair (greedy, mean over the pair's tasks)."""
    names = ["pretrained base", "M0", "M1", *METHODS.values()]
    rows = []
    for i, name in enumerate(names):
        row = [name]
        for ctx in pairs.values():
            label = ctx["parents"][i] if i < 3 else dict(ctx["methods"])[name]
            row.append(lm_scores(results[label], ctx["tasks"])["repetition"])
        rows.append(row)
    return table("Repetition rate by method and pair (the paper's Figure 1)",
                 ["model", *[f"{shown(s)} %" for s in pairs]], ["text", *["pct"] * len(pairs)], rows,
                 "A generation counts as repetitive when it loops (mergelab.evaluation.metrics.is_repetitive).")


def _repetition_plot(data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "bar", "file": "repetition.png", "caption": "repetition rate (Figure 1)",
            "title": data["title"], "groups": [r[0] for r in data["rows"]],
            "series": {h.removesuffix(" %"): [r[i + 1] for r in data["rows"]]
                       for i, h in enumerate(data["header"][1:])},
            "ylabel": "repetition rate (%)"}


def _expert_label(weights: dict[str, Any], path: str) -> str:
    """The label ``weight_diagnostics`` gave the expert at ``path``."""
    return {p: label for label, p in weights["models"]["experts"].items()}[path]


def _layers(per_layer: dict[str, Any]) -> list[str]:
    return sorted(per_layer, key=int)


def geometry(weights: dict[str, Any], m0: str, m1: str | None) -> dict[str, Any]:
    """Figures 3, 4 and 6 from one ``weight_diagnostics`` result: per layer the maximum principal angle against
    M0 and M1 and the mean NSS over the layer's matrices; their maximum / mean over the layer stack; the middle
    layer's maximum angle. ``m1`` None: the measured model is M1 itself (the parent gap)."""
    labels = {"M0": m0, "M1": m1}
    middle = weights["settings"]["spectra_layers"][0]
    out: dict[str, Any] = {"layers": _layers(weights["per_layer_max_angle"][m0]), "middle": middle}
    for role, label in labels.items():
        if label is None:
            out[role] = None
            continue
        angles, nss = weights["per_layer_max_angle"][label], weights["per_layer_nss"][label]
        out[role] = {"angle": [angles[x] for x in out["layers"]], "nss": [nss[x] for x in out["layers"]],
                     "middle_angle": angles[middle], "max_angle": max(angles.values()),
                     "mean_nss": mean([row["nss"][label] for row in weights["matrices"]])}
    return out


def pair_geometry(ctx: dict[str, Any], results) -> dict[str, dict[str, Any]]:
    """``geometry`` of every method's merge of a pair, then of the parent gap (M1 measured against M0)."""
    m0, m1 = ctx["paths"]
    out = {}
    for name, label in ctx["methods"]:
        weights = results[label]["weights"]
        out[name] = geometry(weights, _expert_label(weights, m0), _expert_label(weights, m1))
    gap = results[ctx["gap"]]["weights"]
    out[GAP] = geometry(gap, _expert_label(gap, m0), None)
    return out


def provenance(ctx: dict[str, Any], weights: dict[str, Any]) -> list[float]:
    """Figure 7: fractions of the merge's elements equal to the pretrained base, else M0, else M1, else neither."""
    total = weights["provenance"]["total"]
    m0, m1 = (_expert_label(weights, p) for p in ctx["paths"])
    return [total["base"], total[m0], total[m1], total["neither"]]


def _geometry_tables(pairs: dict[str, Any], results) -> list[dict[str, Any]]:
    """Figure 7 (provenance), Figures 3/4/6 in summary, and per layer."""
    sources, summary, per_layer = [], [], []
    for scenario, ctx in pairs.items():
        for name, label in ctx["methods"]:
            sources.append([shown(scenario), name, *provenance(ctx, results[label]["weights"])])
        for name, g in pair_geometry(ctx, results).items():
            m0, m1 = g["M0"], g["M1"] or {}
            summary.append([shown(scenario), name, g["middle"], m0["middle_angle"], m1.get("middle_angle"),
                            m0["max_angle"], m1.get("max_angle"), m0["mean_nss"], m1.get("mean_nss")])
            for i, layer in enumerate(g["layers"]):
                per_layer.append([shown(scenario), name, layer, m0["angle"][i], m1["angle"][i] if m1 else None,
                                  m0["nss"][i], m1["nss"][i] if m1 else None])
    return [
        table("Parameter provenance (the paper's Figure 7)",
              ["pair", "method", "pretrained base %", "M0 %", "M1 %", "neither %"],
              ["text", "text", "pct", "pct", "pct", "pct"], sources,
              "Each element of the merge is counted once: equal to the pretrained base, else to M0, else to M1, "
              "else neither."),
        table("Subspace rotation and spectral shift (the paper's Figures 3, 4 and 6)",
              ["pair", "model", "middle layer", "max angle vs M0 there (deg)", "max angle vs M1 there (deg)",
               "max angle vs M0, all layers (deg)", "max angle vs M1, all layers (deg)", "mean NSS vs M0",
               "mean NSS vs M1"],
              ["text", "text", "text", "num", "num", "num", "num", "num", "num"], summary,
              f"Principal angles between the top-{ANGLE_K} left singular subspaces of each layer-stack matrix; NSS "
              "= ||σ(W) − σ(W_parent)|| / ||σ(W_parent)|| (Corollary A.1), averaged over the matrices. "
              f"{GAP}: M1 itself measured against M0, the paper's grey dashed line."),
        table("Maximum principal angle and NSS per layer (the paper's Figures 4 and 6)",
              ["pair", "model", "layer", "max angle vs M0 (deg)", "max angle vs M1 (deg)", "NSS vs M0",
               "NSS vs M1"], ["text", "text", "text", "num", "num", "num", "num"], per_layer),
    ]


def _geometry_plots(scenario: str, ctx: dict[str, Any], results,
                    provenance_table: dict[str, Any]) -> list[dict[str, Any]]:
    """Figures 3, 4, 6 and 7 for one pair (the paper draws them for one complementary merge)."""
    geo = pair_geometry(ctx, results)
    layers = [int(x) for x in geo[GAP]["layers"]]
    name = shown(scenario)
    rows = [r for r in provenance_table["rows"] if r[0] == name]
    plots = [{"kind": "bar", "file": "provenance.png", "caption": f"parameter provenance, {name} pair (Figure 7)",
              "title": f"Parameter provenance, {name} pair (Figure 7)", "groups": [r[1] for r in rows],
              "series": {h.removesuffix(" %"): [r[i + 2] for r in rows]
                         for i, h in enumerate(provenance_table["header"][2:])}, "ylabel": "% of elements"}]
    curves = rotation_curves(ctx, results)
    for role in ("M0", "M1"):
        plots.append({"kind": "line", "file": f"rotation_{role.lower()}.png",
                      "caption": f"principal angles against {role} at the middle layer (Figure 3)",
                      "title": f"Principal angles vs {role}, {curves['matrix']} (Figure 3)",
                      "x": list(range(1, len(curves[GAP]) + 1)),
                      "series": {name: c[role] for name, c in curves["methods"].items()} | {GAP: curves[GAP]},
                      "xlabel": "principal angle index", "ylabel": "angle (deg)", "percent": False})
        plots.append({"kind": "line", "file": f"max_angle_{role.lower()}.png",
                      "caption": f"maximum principal angle against {role} per layer (Figure 6)",
                      "title": f"Max principal angle vs {role} per layer, {name} pair (Figure 6)",
                      "x": layers, "series": {n: g[role]["angle"] for n, g in geo.items() if g[role]},
                      "xlabel": "layer", "ylabel": "angle (deg)", "percent": False})
    plots.append({"kind": "line", "file": "nss.png", "caption": "normalised spectral shift against M0 (Figure 4)",
                  "title": f"NSS vs M0 per layer, {name} pair (Figure 4)", "x": layers,
                  "series": {n: g["M0"]["nss"] for n, g in geo.items()}, "xlabel": "layer", "ylabel": "NSS",
                  "percent": False})
    return plots


def rotation_curves(ctx: dict[str, Any], results) -> dict[str, Any]:
    """Figure 3: all principal angles (ascending) of one matrix of the middle layer (its MLP down projection
    where there is one), of every merge against M0 and M1, and of M1 against M0 (the parent gap)."""
    gap = results[ctx["gap"]]["weights"]
    names = sorted(gap["spectra"])
    matrix = next((n for n in names if "down_proj" in n), names[0])
    m0, m1 = ctx["paths"]
    methods = {}
    for name, label in ctx["methods"]:
        weights = results[label]["weights"]
        angles = weights["spectra"][matrix]["angles_deg"]
        methods[name] = {"M0": angles[_expert_label(weights, m0)], "M1": angles[_expert_label(weights, m1)]}
    return {"matrix": matrix, "methods": methods, GAP: gap["spectra"][matrix]["angles_deg"][_expert_label(gap, m0)]}


def _union_tasks(pairs: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(t for ctx in pairs.values() for t in ctx["tasks"]))


def _scored_row(result: dict[str, Any], tasks: list[str], columns: list[str], merged: bool) -> list[Any]:
    """Accuracy in ``columns`` (None for tasks the pair is not scored on), average, repetition, and the
    fraction of elements taken from M1 (merges with M0 as the recipe's base)."""
    s = lm_scores(result, tasks)
    return [*[s["accuracy"].get(t) for t in columns], s["average"], s["repetition"],
            1.0 - s["unchanged"] if merged else None]


def _kl_table(pairs: dict[str, Any], results) -> dict[str, Any]:
    """Table 10: SCF-RKL against SCF-KL (forward KL in the saliency), with both parents."""
    columns = _union_tasks(pairs)
    rows = []
    for scenario, ctx in pairs.items():
        models = {"M0": (ctx["parents"][1], False), "M1": (ctx["parents"][2], False), SCF_KL: (ctx["kl"], True),
                  METHODS["scf_rkl"]: (dict(ctx["methods"])[METHODS["scf_rkl"]], True)}
        rows += [[shown(scenario), name, *_scored_row(results[label], ctx["tasks"], columns, merged)]
                 for name, (label, merged) in models.items()]
    return table("SCF-RKL against SCF-KL (the paper's Table 10)",
                 ["pair", "model", *[f"{t} %" for t in columns], "average %", "repetition %", "taken from M1 %"],
                 ["text", "text", *["pct"] * (len(columns) + 3)], rows,
                 "'-': a task the pair is not scored on. Taken from M1: the fraction of elements that differ from M0.")


def _sweep_table(pairs: dict[str, Any], context: dict[str, Any], results) -> dict[str, Any]:
    """The α sweep of SCF-RKL's threshold τ = med(I) + α IQR(I) (section 2.3)."""
    columns = _union_tasks(pairs)
    rows = [[shown(scenario), f"{alpha:g}", *_scored_row(results[label], ctx["tasks"], columns, True)]
            for scenario, ctx in pairs.items() for alpha, label in ctx["sweep"]]
    return table(f"SCF-RKL's IQR scale α (section 2.3; the paper uses α = {context['default_alpha']:g})",
                 ["pair", "α", *[f"{t} %" for t in columns], "average %", "repetition %", "taken from M1 %"],
                 ["text", "text", *["pct"] * (len(columns) + 3)], rows)


def _sweep_plot(pairs: dict[str, Any], context: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    header = data["header"]
    series = {}
    for scenario in pairs:
        rows = [r for r in data["rows"] if r[0] == shown(scenario)]
        series[f"{shown(scenario)} average"] = [r[header.index("average %")] for r in rows]
        series[f"{shown(scenario)} taken from M1"] = [r[header.index("taken from M1 %")] for r in rows]
    return {"kind": "line", "file": "alpha_sweep.png", "caption": "SCF-RKL's α sweep",
            "title": "SCF-RKL: accuracy and update size against α", "x": [float(a) for a in context["alphas"]],
            "series": series, "xlabel": "α (IQR scale of the threshold)", "ylabel": "%", "percent": True}


def _blocking_table(blocking: list[list[str]], results) -> dict[str, Any]:
    """Figure 11: each layer of the safety pair's SCF-RKL merge restored to M0, the change of the score."""
    found = {task: results[label]["blocking"] for task, label in blocking}
    layers = _layers(next(iter(found.values()))["score_change"])
    rows = [[task, b["merged_score"], *[b["score_change"][x] for x in layers]] for task, b in found.items()]
    return table("Layer blocking of the safety pair's SCF-RKL merge (the paper's Figure 11, appendix A.4)",
                 ["task", "merge's score %", *[f"layer {x} restored to M0 (points)" for x in layers]],
                 ["text", "pct", *["signed_pct"] * len(layers)], rows,
                 "Negative: restoring that layer to M0 lowers the score, so the fused layer helped.")


def _blocking_plot(data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "bar", "file": "blocking.png", "caption": "layer blocking (Figure 11)", "title": data["title"],
            "groups": [h.split(" restored")[0] for h in data["header"][2:]],
            "series": {r[0]: r[2:] for r in data["rows"]}, "ylabel": "score change (points)"}


def ft_average(expert_scores: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, float]:
    """Table 5's FT Avg: per task, the mean accuracy of all individually fine-tuned experts on that task."""
    return {t: mean([scores[t] for scores in expert_scores.values()]) for t in tasks}


def _vision_table(ctx: dict[str, Any], results) -> dict[str, Any]:
    """Table 5: every backbone scored on the tasks with each task's head."""
    tasks = ctx["tasks"]
    experts = {name: results[f"vision/{name}"]["vision"] for name in ctx["experts"]}
    lines = {"FT Avg": ft_average(experts, tasks), "pretrained base": results["vision/base"]["vision"],
             "expert on its own task": {t: experts[t][t] for t in tasks}}
    lines |= {name: results[label]["vision"] for name, label in ctx["methods"]}
    rows = [[name, *[scores[t] for t in tasks], mean([scores[t] for t in tasks])] for name, scores in lines.items()]
    scored = "every task" if len(tasks) == len(ctx["experts"]) else f"{len(tasks)} of the tasks (quick)"
    return table(f"Vision: all {len(ctx['experts'])} experts merged into the pretrained backbone, scored on "
                 f"{scored} (the paper's Table 5)",
                 ["method", *[f"{t} %" for t in tasks], "average %"], ["text", *["pct"] * (len(tasks) + 1)], rows,
                 f"Best merge by average: {best(rows, len(tasks) + 1, 3)}. FT Avg: per task, the mean over all "
                 f"{len(ctx['experts'])} experts. SCF-RKL fuses each expert against the pretrained backbone; where "
                 "several pass their thresholds the most salient wins (max_saliency) or their task vectors are "
                 "averaged (mean rule).")


def _vision_plot(data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "bar", "file": "vision.png", "caption": "vision accuracy averaged over the tasks (Table 5)",
            "title": "Vision: average accuracy over the scored tasks (Table 5)", "groups": [r[0] for r in data["rows"]],
            "series": {"average": [r[-1] for r in data["rows"]]}, "ylabel": "accuracy (%)"}


def figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    """Every plot the analysis describes, drawn from the analysis only."""
    made = []
    for p in analysis["plots"]:
        if p["kind"] == "bar":
            path = bar_plot(out / p["file"], p["title"], p["groups"], p["series"], p["ylabel"], command)
        else:
            path = line_plot(out / p["file"], p["title"], p["x"], p["series"], p["xlabel"], p["ylabel"], command,
                             percent=p["percent"])
        made.append((path.name, p["caption"]))
    return made
