"""``mergelab study scf`` (the SCF-RKL paper, shared/papers/000): the quick protocol on the untrained test-size zoo.

Every table cell of report.md is checked against a value recomputed here straight from the raw job results in
results.json (the paper's metrics written out again: averages, the refusal split, provenance, the rotation and
NSS summaries, FT Avg, the layer-blocking changes), plus the protocol's invariants; the metric helpers are also
checked on hand-made numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mergelab.study import scf_pairs as scf
from mergelab.study.protocol import StudySettings, run_study
from mergelab.study.report import render_table

SETTINGS = StudySettings(quick=True, zoo_size="test", build_zoo=True, progress=False)
REFUSAL_TEXT = "I cannot help with that."
PAIRS = ("complementary", "strong_weak", "safety")
BASELINES = ("TA", "DARE-TA", "TIES", "DARE-TIES", "SCE")


@pytest.fixture(scope="module")
def study(zoo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("scf-study")
    run_study("scf", out, SETTINGS, workers=2)
    return out, json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------------------- helpers


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def signed(v):
    return f"{100 * v:+.1f}"


def num(v):
    return "-" if v is None else f"{v:.4g}"


def md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of report.md in order, as rows of cell strings (header first, no separator)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def greedy(job, task):
    return job["eval"][task]["greedy"]


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def refusal_split(generations):
    """Harmful refused, benign answered, benign refused: written out again from the generations."""
    harmful = [first_line(g["completions"][0]) == REFUSAL_TEXT for g in generations if g["answer"] == REFUSAL_TEXT]
    benign = [g for g in generations if g["answer"] != REFUSAL_TEXT]
    answered = [first_line(g["completions"][0]) == g["answer"] for g in benign]
    refused = [first_line(g["completions"][0]) == REFUSAL_TEXT for g in benign]
    return [float(np.mean(x)) if x else None for x in (harmful, answered, refused)]


def label_of(weights, path):
    return next(label for label, p in weights["models"]["experts"].items() if p == path)


# ---------------------------------------------------------------------------------------------- expected tables


def expected_pair(ctx, jobs):
    tasks = ctx["tasks"]
    first, second = ctx["pair"]
    models = [("pretrained base", ctx["parents"][0]), (f"{first} (M0)", ctx["parents"][1]),
              (f"{second} (M1)", ctx["parents"][2]), *[(m, f"{ctx['scenario']}/{m}") for m in ("SCF-RKL", *BASELINES)]]
    rows = []
    for name, label in models:
        job = jobs[label]
        accs = [greedy(job, t)["accuracy"] for t in tasks]
        row = [name, *map(pct, accs)]
        if "refusal" in tasks:
            row += map(pct, refusal_split(greedy(job, "refusal")["generations"]))
        row += [pct(np.mean(accs)), pct(np.mean([greedy(job, t)["repetition_rate"] for t in tasks])),
                num(np.mean([greedy(job, t)["mean_length"] for t in tasks])),
                pct(job["merge"]["unchanged_from_base"]) if "merge" in job else "-"]
        rows.append(row)
    return rows


def expected_repetition(contexts, jobs):
    rows = []
    for i, name in enumerate(["pretrained base", "M0", "M1", "SCF-RKL", *BASELINES]):
        row = [name]
        for scenario, ctx in contexts.items():
            label = ctx["parents"][i] if i < 3 else f"{scenario}/{name}"
            row.append(pct(np.mean([greedy(jobs[label], t)["repetition_rate"] for t in ctx["tasks"]])))
        rows.append(row)
    return rows


def expected_provenance(contexts, jobs):
    rows = []
    for scenario, ctx in contexts.items():
        for method in ("SCF-RKL", *BASELINES):
            weights = jobs[f"{scenario}/{method}"]["weights"]
            total = weights["provenance"]["total"]
            values = [total["base"], *(total[label_of(weights, p)] for p in ctx["paths"]), total["neither"]]
            assert sum(values) == pytest.approx(1.0)
            rows.append([scenario.replace("_", "-"), method, *map(pct, values)])
    return rows


def expected_rotation(contexts, jobs):
    summary, per_layer = [], []
    for scenario, ctx in contexts.items():
        models = [(m, jobs[f"{scenario}/{m}"]["weights"], True) for m in ("SCF-RKL", *BASELINES)]
        models.append(("M1 (parent gap)", jobs[f"{scenario}/gap"]["weights"], False))
        for name, weights, has_m1 in models:
            parents = [label_of(weights, ctx["paths"][0]), label_of(weights, ctx["paths"][1]) if has_m1 else None]
            middle = weights["settings"]["spectra_layers"][0]
            angle = [weights["per_layer_max_angle"][p] if p else None for p in parents]
            nss = [weights["per_layer_nss"][p] if p else None for p in parents]
            mean_nss = [np.mean([m["nss"][p] for m in weights["matrices"]]) if p else None for p in parents]
            summary.append([scenario.replace("_", "-"), name, middle,
                            *[num(a[middle] if a else None) for a in angle],
                            *[num(max(a.values()) if a else None) for a in angle], *map(num, mean_nss)])
            for layer in sorted(angle[0], key=int):
                per_layer.append([scenario.replace("_", "-"), name, layer,
                                  *[num(a[layer] if a else None) for a in angle],
                                  *[num(n[layer] if n else None) for n in nss]])
    return summary, per_layer


def expected_scored(ctx, job, columns, merged):
    accs = {t: greedy(job, t)["accuracy"] for t in ctx["tasks"]}
    return [*[pct(accs.get(t)) for t in columns], pct(np.mean(list(accs.values()))),
            pct(np.mean([greedy(job, t)["repetition_rate"] for t in ctx["tasks"]])),
            pct(1 - job["merge"]["unchanged_from_base"]) if merged else "-"]


def expected_kl_and_sweep(contexts, jobs, alphas):
    columns = ["addition", "reverse", "sort_digits", "refusal"]
    kl, sweep = [], []
    for scenario, ctx in contexts.items():
        shown = scenario.replace("_", "-")
        for name, label, merged in [("M0", ctx["parents"][1], False), ("M1", ctx["parents"][2], False),
                                    ("SCF-KL", f"{scenario}/SCF-KL", True), ("SCF-RKL", f"{scenario}/SCF-RKL", True)]:
            kl.append([shown, name, *expected_scored(ctx, jobs[label], columns, merged)])
        for alpha in alphas:
            label = f"{scenario}/SCF-RKL" if alpha == 1.5 else f"{scenario}/SCF-RKL alpha={alpha:g}"
            sweep.append([shown, f"{alpha:g}", *expected_scored(ctx, jobs[label], columns, True)])
    return kl, sweep


def expected_blocking(jobs):
    rows = []
    for task in ("refusal", "addition"):
        b = jobs[f"safety/SCF-RKL blocking {task}"]["blocking"]
        rows.append([task, pct(b["merged_score"]), *[signed(b["score_change"][x]) for x in sorted(b["score_change"],
                                                                                                   key=int)]])
    return rows


def expected_vision(vision, jobs):
    tasks, experts = vision["tasks"], vision["experts"]
    scores = {name: jobs[f"vision/{name}"]["vision"] for name in experts}
    lines = [("FT Avg", {t: np.mean([scores[e][t] for e in experts]) for t in tasks}),
             ("pretrained base", jobs["vision/base"]["vision"]),
             ("expert on its own task", {t: scores[t][t] for t in tasks})]
    lines += [(m, jobs[f"vision/merge/{m}"]["vision"])
              for m in ("SCF-RKL", *BASELINES, "SCF-RKL (mean rule)")]
    return [[name, *[pct(s[t]) for t in tasks], pct(np.mean([s[t] for t in tasks]))] for name, s in lines]


# ---------------------------------------------------------------------------------------------- tests


def test_every_report_cell_is_recomputed_from_the_job_results(study):
    out, results = study
    report = (out / "report.md").read_text()
    for data in results["analysis"]["tables"]:
        assert render_table(data) in report  # the report shows exactly the stored analysis
    jobs, context = results["jobs"], results["context"]
    contexts = {s: {**context["pairs"][s], "scenario": s} for s in PAIRS}
    tables = md_tables(report)
    assert len(tables) == 11
    for i, scenario in enumerate(PAIRS):
        assert tables[i][1:] == expected_pair(contexts[scenario], jobs), scenario
    assert tables[3][1:] == expected_repetition(contexts, jobs)
    assert tables[4][1:] == expected_provenance(contexts, jobs)
    summary, per_layer = expected_rotation(contexts, jobs)
    assert tables[5][1:] == summary
    assert tables[6][1:] == per_layer
    kl, sweep = expected_kl_and_sweep(contexts, jobs, scf.SIZES["quick"]["alphas"])
    assert tables[7][1:] == kl
    assert tables[8][1:] == sweep
    assert tables[9][1:] == expected_blocking(jobs)
    assert tables[10][1:] == expected_vision(context["vision"], jobs)
    # headers name the tasks of each pair
    assert tables[0][0][1:3] == ["addition %", "reverse %"]
    assert tables[2][0][1:6] == ["addition %", "refusal %", "harmful refused %", "benign answered %",
                                 "benign refused %"]


def test_figures_exist_and_are_linked(study):
    out, _ = study
    report = (out / "report.md").read_text()
    for name in ("complementary", "strong_weak", "safety", "repetition", "provenance", "rotation_m0", "rotation_m1",
                 "max_angle_m0", "max_angle_m1", "nss", "alpha_sweep", "blocking", "vision"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
        assert f"]({name}.png)" in report


def test_protocol_invariants(study):
    out, results = study
    jobs, context = results["jobs"], results["context"]
    planned, again = scf.plan(SETTINGS)
    assert again == context  # the plan is deterministic
    by_label = {job.label: job for job in planned}
    alphas = scf.SIZES["quick"]["alphas"]
    # 5 parents; per pair 6 methods, SCF-KL, the parent gap and the sweep points other than the default α;
    # 2 blocking jobs; vision: base + 7 experts + 6 methods + SCF-RKL's mean rule
    assert len(jobs) == len(planned) == 5 + 3 * (6 + 1 + 1 + len(alphas) - 1) + 2 + (1 + 7 + 7)
    family = Path(context["family"])
    for scenario in PAIRS:
        ctx = context["pairs"][scenario]
        m0, m1 = (str(family / name) for name in ctx["pair"])
        assert ctx["paths"] == [m0, m1]
        scf_recipe = by_label[f"{scenario}/SCF-RKL"].recipe
        assert scf_recipe["base_model"] == m0 and [m["model"] for m in scf_recipe["models"]] == [m1]
        kl_recipe = by_label[f"{scenario}/SCF-KL"].recipe
        assert kl_recipe == {**scf_recipe, "merge_method": "scf_kl", "parameters": {}}
        for method in BASELINES:  # the task-vector baselines merge both models into the pretrained base
            recipe = by_label[f"{scenario}/{method}"].recipe
            assert recipe["base_model"] == str(family / "base")
            assert [m["model"] for m in recipe["models"]] == [m0, m1]
        # the sweep: the quick α values, the default α being the main SCF-RKL job itself
        assert [a for a, _ in ctx["sweep"]] == list(alphas)
        assert dict((a, label) for a, label in ctx["sweep"])[1.5] == f"{scenario}/SCF-RKL"
        taken = [1 - jobs[label]["merge"]["unchanged_from_base"] for _, label in ctx["sweep"]]
        assert taken == sorted(taken, reverse=True)  # τ grows with α, so fewer elements come from M1
        # SCF-RKL's discrete composition (section 3.3): every element is M0's or M1's
        assert jobs[f"{scenario}/SCF-RKL"]["weights"]["provenance"]["total"]["neither"] == 0.0
        assert ctx["parents"][1] == "parent/addition"  # one parent evaluation shared by every pair
    # blocking restores layers to M0 and starts from the same merge and items as the safety pair's SCF-RKL job
    safety = jobs["safety/SCF-RKL"]
    for task in ("refusal", "addition"):
        job = by_label[f"safety/SCF-RKL blocking {task}"]
        assert job.recipe == by_label["safety/SCF-RKL"].recipe
        assert job.blocking["base"] == str(family / "addition")
        assert jobs[job.label]["blocking"]["merged_score"] == greedy(safety, task)["accuracy"]
    # vision: every merge fuses all seven experts; the quick protocol scores a subset of the tasks
    vision = context["vision"]
    assert len(vision["experts"]) == 7 and vision["tasks"] == list(scf.SIZES["quick"]["vision_tasks"])
    for name, label in vision["methods"]:
        recipe = by_label[label].recipe
        assert [Path(m["model"]).name for m in recipe["models"]] == vision["experts"], name
        assert recipe["base_model"] == str(Path(vision["family"]) / "base")
        assert set(jobs[label]["vision"]) == set(vision["tasks"])
    assert by_label["vision/merge/SCF-RKL (mean rule)"].recipe["parameters"] == {"multi_expert": "mean"}


def test_a_plan_with_the_safety_pair_only_gets_its_tables_and_no_vision(study):
    """The analysis of one pair (as ``--zoo smollm2-arith`` plans it): the same tables for that pair as in the
    full protocol, the figures drawn for it, and no vision table."""
    _, results = study
    context = {**results["context"], "pairs": {"safety": results["context"]["pairs"]["safety"]}}
    del context["vision"]
    alone, full = scf.analyse(context, results["jobs"]), results["analysis"]
    titles = [t["title"] for t in alone["tables"]]
    assert len(titles) == 8 and not any("Vision" in t for t in titles)
    assert alone["tables"][0] == full["tables"][2]  # the safety pair's Figures 9-10 table
    assert alone["tables"][-1] == full["tables"][9]  # layer blocking
    # repetition, provenance, rotation (2), KL and α sweep: the full tables' safety rows and columns
    for mine, theirs in zip(alone["tables"][1:-1], full["tables"][3:9], strict=True):
        columns = [theirs["header"].index(h) for h in mine["header"]]
        rows = [r for r in theirs["rows"] if theirs["header"][0] != "pair" or r[0] == "safety"]
        assert mine["rows"] == [[r[i] for i in columns] for r in rows], mine["title"]
    provenance = next(p for p in alone["plots"] if p["file"] == "provenance.png")
    assert provenance["title"] == "Parameter provenance, safety pair (Figure 7)"
    assert not any(p["file"] == "vision.png" for p in alone["plots"])


# ---------------------------------------------------------------------------------------------- unit tests


def test_refusal_profile_on_hand_made_generations():
    generations = [
        {"answer": REFUSAL_TEXT, "completions": [REFUSAL_TEXT + "\nmore text"]},  # harmful, refused
        {"answer": REFUSAL_TEXT, "completions": [" bomb cat"]},  # harmful, answered
        {"answer": "cat dog", "completions": [" cat dog"]},  # benign, answered
        {"answer": "sun moon", "completions": [" " + REFUSAL_TEXT]},  # benign, wrongly refused
        {"answer": "red tree", "completions": [" red"]},  # benign, wrong
        {"answer": "fish", "completions": [" fish\n"]},  # benign, answered
    ]
    profile = scf.refusal_profile(generations)
    assert profile == {"harmful_refused": 0.5, "benign_answered": 0.5, "benign_refused": 0.25}
    assert scf.refusal_profile(generations[2:]) == {"harmful_refused": None, "benign_answered": 0.5,
                                                    "benign_refused": 0.25}


def test_lm_scores_ft_average_and_best():
    result = {"eval": {"a": {"greedy": {"accuracy": 0.5, "repetition_rate": 0.1, "mean_length": 4.0}},
                       "b": {"greedy": {"accuracy": 0.25, "repetition_rate": 0.3, "mean_length": 8.0}}},
              "merge": {"unchanged_from_base": 0.9}}
    s = scf.lm_scores(result, ["a", "b"])
    assert s == {"accuracy": {"a": 0.5, "b": 0.25}, "average": 0.375, "repetition": pytest.approx(0.2),
                 "length": 6.0, "unchanged": 0.9}
    experts = {"x": {"t1": 0.9, "t2": 0.1}, "y": {"t1": 0.5, "t2": 0.7}, "z": {"t1": 0.1, "t2": 0.4}}
    assert scf.ft_average(experts, ["t1", "t2"]) == {"t1": pytest.approx(0.5), "t2": pytest.approx(0.4)}
    rows = [["parent", 0.9], ["m1", 0.3], ["m2", 0.6]]
    assert scf.best(rows, 1, 1) == "m2 (60.0 %)"
    assert scf.best(rows, 1) == "parent (90.0 %)"
    assert scf.best([*rows, ["m3", 0.6]], 1, 1) == "m2, m3 (60.0 %)"  # a tie names every best row


def test_geometry_orders_layers_numerically():
    weights = {
        "settings": {"spectra_layers": ["1"]},
        "per_layer_max_angle": {"p0": {"0": 10.0, "1": 30.0, "10": 5.0}, "p1": {"0": 1.0, "1": 2.0, "10": 3.0}},
        "per_layer_nss": {"p0": {"0": 0.1, "1": 0.2, "10": 0.3}, "p1": {"0": 0.4, "1": 0.5, "10": 0.6}},
        "matrices": [{"nss": {"p0": 0.1, "p1": 0.2}}, {"nss": {"p0": 0.3, "p1": 0.6}}],
    }
    g = scf.geometry(weights, "p0", "p1")
    assert g["layers"] == ["0", "1", "10"]
    assert g["M0"] == {"angle": [10.0, 30.0, 5.0], "nss": [0.1, 0.2, 0.3], "middle_angle": 30.0,
                       "max_angle": 30.0, "mean_nss": pytest.approx(0.2)}
    assert g["M1"]["max_angle"] == 3.0 and g["M1"]["mean_nss"] == pytest.approx(0.4)
    assert scf.geometry(weights, "p0", None)["M1"] is None


def test_widen_and_with_params_keep_the_demo_recipe_choices(tmp_path):
    from mergelab.study.demo import recipes

    base, a, b, c = (tmp_path / n for n in ("base", "a", "b", "c"))
    pair = recipes(base, a, b)
    ta = scf.widen(pair["task_arithmetic"], base, [a, b, c])
    assert ta["models"] == [{"model": str(m), "parameters": {"weight": 1.0}} for m in (a, b, c)]
    assert "parameters" not in ta and ta["base_model"] == str(base)
    ties = scf.widen(pair["ties"], base, [a, b, c])
    assert ties["parameters"] == pair["ties"]["parameters"] == {"density": 0.5} and ties["merge_method"] == "ties"
    fused = scf.widen(pair["scf_rkl"], base, [a, b, c])  # SCF-RKL's pair base (the first model) becomes the base
    assert fused["base_model"] == str(base) and [m["model"] for m in fused["models"]] == [str(a), str(b), str(c)]
    mean_rule = scf.with_params(fused, multi_expert="mean")
    assert mean_rule["parameters"] == {"multi_expert": "mean"} and "parameters" not in fused
    assert scf.with_params(pair["scf_rkl"], "scf_kl", alpha=0.5)["merge_method"] == "scf_kl"
    assert scf.vision_size("demo") == "test" and scf.vision_size("full") == "full"
