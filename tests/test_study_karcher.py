"""``mergelab study karcher``: the quick protocol at the test zoo size, its report against its raw results, and
the metric formulas on hand-made numbers (Fisher-Rao Karcher paper, sec. 4.1, Figures 1-2, Tables 1, 3-7)."""

from __future__ import annotations

import json
import random

import pytest

from mergelab.study import karcher
from mergelab.study.protocol import StudySettings, run_study
from mergelab.tasks import TASKS

SETTINGS = StudySettings(quick=True, zoo_size="test", build_zoo=True, progress=False)
METHODS = {  # the paper's baselines (sec. 4.1) -> the merge method each recipe must use
    "Karcher": "karcher", "Lerp": "linear", "Multi-SLERP": "multislerp", "Model Stock": "model_stock",
    "TIES": "ties", "DARE-linear": "dare_linear", "DARE-TIES": "dare_ties", "DELLA-linear": "della_linear",
    "DELLA-TIES": "della", "SCE": "sce", "SCF-KL (arcee-fusion style)": "scf_kl",
}
REFERENCES = ("base (reference)", "best merged expert per task (reference)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("karcher-study")
    run_study("karcher", out, SETTINGS, workers=2)
    return out, json.loads((out / "results.json").read_text())


def report_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Title -> body rows (cells as text) of every table in report.md."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip("|").split("|")])
    return {t: rows[1:] for t, rows in tables.items()}  # drop the header row


def pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def num(value):
    return f"{value:.4g}"


def one(tables, *words):
    found = [rows for title, rows in tables.items() if all(w in title for w in words)]
    assert len(found) == 1, (words, list(tables))
    return found[0]


def own_tasks(family):
    """Expert -> its own tasks, straight from the zoo's definitions."""
    if family == "vision":
        from mergelab.zoo.vision import TASKS as VISION

        return {name: [name] for name in VISION}
    from mergelab.zoo.tinylm import POOL

    return {name: [t for t in TASKS if t in mix] for name, (mix, *_rest) in POOL.items()}


def union(family, experts):
    own = own_tasks(family)
    order = list(own) if family == "vision" else list(TASKS)
    return [t for t in order if any(t in own[e] for e in experts)]


def accuracies(family, job):
    if family == "vision":
        return job["vision"]
    return {t: f["greedy"]["accuracy"] for t, f in job["eval"].items()}


def test_quick_plan_invariants(study):
    """Same experts (the first m of the seeded order) for every method, the right recipes and tasks."""
    _, results = study
    jobs, context = karcher.plan(SETTINGS)
    by_label = {job.label: job for job in jobs}
    assert set(by_label) == set(results["jobs"])
    assert context["methods"] == list(METHODS)
    for family, names in (("tiny-lm", sorted(own_tasks("tiny-lm"))), ("vision", sorted(own_tasks("vision")))):
        fam = context["families"][family]
        order = random.Random(0).sample(names, len(names))
        assert fam["order"] == order and fam["ms"] == [2, 4]
        assert results["context"]["families"][family]["order"] == order
        folder = fam["folder"]
        for name in ["base", *order[:4]]:
            job = by_label[f"{family} | {name}"]
            assert job.model == f"{folder}/{name}" and job.recipe is None
        for label, method in METHODS.items():
            for m in (2, 4):
                job = by_label[f"{family} | {label} | m={m}"]
                assert job.recipe["merge_method"] == method
                assert [e["model"] for e in job.recipe["models"]] == [f"{folder}/{e}" for e in order[:m]]
                assert job.recipe.get("base_model") == (None if method in ("karcher", "linear") else f"{folder}/base")
                assert (job.vision_tasks if family == "vision" else job.tasks) == union(family, order[:m])
                assert (job.activations is not None) == (family == "tiny-lm" and m == 4 and label in
                                                         ("Karcher", "Lerp", "TIES"))
        assert len([j for j in jobs if j.label.startswith(family)]) == 5 + 2 * len(METHODS)


def test_scale_tables_match_raw_results(study):
    """Figure 1 / tables 3-5: every cell is the mean accuracy over the merged experts' tasks, recomputed."""
    out, results = study
    tables = report_tables((out / "report.md").read_text())
    jobs = results["jobs"]
    for family in ("tiny-lm", "vision"):
        order = results["context"]["families"][family]["order"]
        expected = {}
        for label in METHODS:
            values = []
            for m in (2, 4):
                scores = accuracies(family, jobs[f"{family} | {label} | m={m}"])
                tasks = union(family, order[:m])
                values.append(sum(scores[t] for t in tasks) / len(tasks))
            expected[label] = values
        base = accuracies(family, jobs[f"{family} | base"])
        parents = {e: accuracies(family, jobs[f"{family} | {e}"]) for e in order[:4]}
        expected[REFERENCES[0]] = [sum(base[t] for t in union(family, order[:m])) / len(union(family, order[:m]))
                                   for m in (2, 4)]
        expected[REFERENCES[1]] = []
        for m in (2, 4):
            tasks = union(family, order[:m])
            expected[REFERENCES[1]].append(sum(max(parents[e][t] for e in order[:m]) for t in tasks) / len(tasks))
        rows = one(tables, f"{family}: mean accuracy", "Figure 1")
        assert [r[0] for r in rows] == [*METHODS, *REFERENCES]
        for row in rows:
            values = expected[row[0]]
            assert row[1:] == [pct(values[0]), pct(values[1]), pct((values[0] + values[1]) / 2)], row
        # the computed note names the best method at each m
        note = next(t["note"] for t in results["analysis"]["tables"] if t["title"].startswith(f"{family}: mean"))
        for i, m in enumerate((2, 4)):
            top = max(expected[label][i] for label in METHODS)
            best = [label for label in METHODS if expected[label][i] == top]
            assert f"m={m}: {' = '.join(best) if len(best) <= 3 else f'{len(best)} methods tie'}" in note
        rank = [1 + sum(expected[label][i] > expected["Karcher"][i] for label in METHODS) for i in range(2)]
        assert f"Karcher's rank among the 11 methods: m=2: {rank[0]}, m=4: {rank[1]}." in note


def test_per_task_tables_match_raw_results(study):
    """Table 1: accuracy per task at m = 2 and the largest m up to 5 (here 4), parents on every task."""
    out, results = study
    tables = report_tables((out / "report.md").read_text())
    jobs = results["jobs"]
    for family in ("tiny-lm", "vision"):
        order = results["context"]["families"][family]["order"]
        shown = union(family, order[:4])
        rows = one(tables, f"{family}: accuracy (%) per task", "Table 1")
        expected = []
        for m in (2, 4):
            merged = union(family, order[:m])
            for label in METHODS:
                scores = accuracies(family, jobs[f"{family} | {label} | m={m}"])
                expected.append([label, str(m), *[pct(scores[t]) if t in merged else "-" for t in shown],
                                 pct(sum(scores[t] for t in merged) / len(merged))])
        for name in ["base", *order[:4]]:
            scores = accuracies(family, jobs[f"{family} | {name}"])
            expected.append([name, "-", *[pct(scores[t]) for t in shown], pct(sum(scores[t] for t in shown) /
                                                                                 len(shown))])
        assert rows == expected


def test_activation_tables_match_raw_results(study):
    """Figure 2 / table 7 and the KL table at the largest m, from the activations diagnostics."""
    out, results = study
    tables = report_tables((out / "report.md").read_text())
    diagnosed = {label: results["jobs"][f"tiny-lm | {label} | m=4"]["activations"] for label in ("Karcher", "Lerp",
                                                                                                  "TIES")}
    order = results["context"]["families"]["tiny-lm"]["order"][:4]
    first = diagnosed["Karcher"]["models"]
    assert set(first) == {"merged", "base", *order}
    stats = ("variance", "effective_rank", "numerical_rank")
    per_layer = {label: d["models"]["merged"]["per_layer"] for label, d in diagnosed.items()}
    per_layer["base"] = first["base"]["per_layer"]
    per_layer["experts (mean)"] = {s: [sum(first[e]["per_layer"][s][i] for e in order) / len(order)
                                       for i in range(2)] for s in stats}
    expected = [[label, str(layer), *[num(values[s][layer]) for s in stats]]
                for label, values in per_layer.items() for layer in range(2)]  # the test zoo has 2 layers
    assert one(tables, "Figure 2") == expected
    kl = [[label, num(sum(d["models"][e]["kl_parent_to_merged"] for e in order) / 4),
           num(sum(d["models"][e]["kl_merged_to_parent"] for e in order) / 4),
           num(d["models"]["base"]["kl_parent_to_merged"]), num(d["models"]["merged"]["next_token_entropy"])]
          for label, d in diagnosed.items()]
    assert one(tables, "Function distance") == kl
    # the probes are the test prompts of the merged experts' tasks, 4 per task
    assert diagnosed["Karcher"]["probes"]["kind"] == "prompts"
    assert diagnosed["Karcher"]["probes"]["n"] == 4 * len(union("tiny-lm", order))


def test_figures_exist(study):
    out, results = study
    report = (out / "report.md").read_text()
    for name in ("figure1_tiny_lm.png", "figure1_vision.png", "figure2_variance.png", "figure2_effective_rank.png"):
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in report
    assert results["command"] in report


def test_metric_formulas_on_hand_made_numbers():
    scores = {"a": 0.5, "b": 1.0, "c": 0.0}
    assert karcher.mean_accuracy(scores, ["a", "b"]) == pytest.approx(0.75)
    assert karcher.mean_accuracy(scores, []) is None
    experts = [{"a": 0.2, "b": 0.9}, {"a": 0.6, "b": 0.1}]
    assert karcher.best_expert_mean(experts, ["a", "b"]) == pytest.approx((0.6 + 0.9) / 2)
    assert karcher.ranks({"x": 0.5, "y": 0.7, "z": 0.5, "w": None}) == {"y": 1, "x": 2, "z": 2}
    assert karcher.best_methods({"x": 0.5, "y": 0.7}) == "y"
    assert karcher.best_methods({"x": 0.7, "y": 0.7}) == "x = y"
    assert karcher.best_methods({k: 0.0 for k in "abcd"}) == "4 methods tie"
    assert karcher.best_methods({"x": None}) == "-"


def test_expert_order_and_tasks():
    order = karcher.expert_order("tiny-lm")
    assert sorted(order) == [f"pool_{i:02d}" for i in range(12)]
    assert order == karcher.expert_order("tiny-lm")  # fixed
    assert karcher.merged_tasks("tiny-lm", ["pool_00", "pool_01"]) == ["addition", "sort_digits"]
    assert karcher.merged_tasks("tiny-lm", ["pool_09"]) == []  # code-only member: no evaluation task
    assert karcher.merged_tasks("vision", ["digits", "rotated"]) == ["rotated", "digits"]
    assert karcher.zoo_size("vision", "demo") == "full" and karcher.zoo_size("vision", "test") == "test"
    assert karcher.zoo_size("tiny-lm", "demo") == "demo"
