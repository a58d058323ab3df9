"""``mergelab study in-the-wild``: the quick protocol end to end at the test zoo size, and its metric formulas.

The report's numbers are re-derived here from the raw job results (and the norms and cosines from the zoo's
weight files) with straightforward numpy, written from the paper's definitions (Tables 1-3, Fig. 4, appendix D).
"""

from __future__ import annotations

import copy
import json
import math
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergelab.study import in_the_wild as itw
from mergelab.study.protocol import StudySettings, run_study
from mergelab.study.report import render_table

POOL = [f"pool_{i:02d}" for i in range(12)]
QUICK_N = {"2": 2, "4": 2, "12": 1}


@pytest.fixture(scope="module")
def study(tmp_path_factory, zoo_root):
    out = tmp_path_factory.mktemp("in-the-wild")
    run_study("in-the-wild", out, StudySettings(quick=True, zoo_size="test", build_zoo=True, progress=False),
              workers=2)
    return out, json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------- independent re-derivations


def mean_acc(result: dict, tasks: list[str]) -> float:
    return float(np.mean([result["eval"][t]["greedy"]["accuracy"] for t in tasks]))


def expected_cell(scores: list[float], reference: float) -> tuple[float, float]:
    """Tables 1-3: % of merges strictly above the reference, mean difference in accuracy points."""
    s = np.asarray(scores, dtype=np.float64)
    return 100.0 * float(np.mean(s > reference)), 100.0 * float(np.mean(s - reference))


def report_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Every markdown table of the report, by its section title: rows of cell texts (header included)."""
    tables, title, rows = {}, None, []
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            tables[title], rows = rows, []
    if rows:
        tables[title] = rows
    return tables


def close(text: str, value: float | None, kind: str) -> bool:
    """A rendered cell against the value it should show, to within its printed precision."""
    if value is None:
        return text == "-"
    if kind == "pct":
        return abs(float(text) - 100 * value) <= 0.05 + 1e-9
    if kind == "signed_pct":
        return abs(float(text) - 100 * value) <= 0.05 + 1e-9 and text[0] in "+-"
    if kind == "num":
        return math.isclose(float(text), value, rel_tol=5e-4, abs_tol=1e-12)
    if kind == "interference":
        above, gain = value
        got_above, got_gain = text.split(" / ")
        return abs(float(got_above) - above) <= 0.5 + 1e-9 and abs(float(got_gain) - gain) <= 0.005 + 1e-9
    return text == str(value)


def check_rows(rendered: list[list[str]], expected: list[list], kinds: list[str]) -> None:
    assert len(rendered) == len(expected) + 1  # header row
    for got, want in zip(rendered[1:], expected, strict=True):
        assert len(got) == len(want) == len(kinds)
        for text, value, kind in zip(got, want, kinds, strict=True):
            assert close(text, value, kind), (got[0], text, value, kind)


def interference_rows(results: dict, context: dict, reference: float) -> list[list]:
    tasks = context["tasks"]
    experts = [mean_acc(results[f"parent:{e}"], tasks) for e in POOL]
    rows = []
    for m in context["methods"]:
        row = [m, reference, expected_cell(experts, reference)]
        for n in map(str, context["n_values"]):  # results.json sorts the keys of context["subsets"]
            row.append(expected_cell([mean_acc(results[f"main:{m}|n={n}|s={i}"], tasks)
                                      for i in range(len(context["subsets"][n]))], reference))
        rows.append(row)
    return rows


def folder_tensors(folder: Path) -> dict[str, np.ndarray]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update({k: v.astype(np.float64) for k, v in load_file(file).items()})
    return found


# ------------------------------------------------------------------------- pure formulas


def test_interference_on_hand_made_numbers():
    # two of four strictly above 0.50 (0.50 itself is not above); differences +2, -3, +5, 0 points: mean +1
    above, gain = itw.interference([0.52, 0.47, 0.55, 0.50], 0.50)
    assert above == pytest.approx(50.0)
    assert gain == pytest.approx(1.0)
    assert itw.interference_cell(above, gain) == "50 / +1.00"
    above, gain = itw.interference([0.40, 0.45], 0.50)
    assert (above, gain) == (pytest.approx(0.0), pytest.approx(-7.5))
    assert itw.interference_cell(above, gain) == "0 / -7.50"
    assert itw.interference([0.6, 0.7, 0.8], 0.5) == (pytest.approx(100.0), pytest.approx(20.0))


def test_mean_std_is_population_std():
    assert itw.mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert itw.mean_std([5.0]) == (5.0, 0.0)


def test_mean_accuracy_is_unweighted_task_mean():
    result = {"eval": {"a": {"greedy": {"accuracy": 0.2}}, "b": {"greedy": {"accuracy": 0.6}},
                       "c": {"greedy": {"accuracy": 1.0}}}}
    assert itw.mean_accuracy(result, ["a", "b"]) == pytest.approx(0.4)
    assert itw.mean_accuracy(result, ["a", "b", "c"]) == pytest.approx(0.6)


def test_subsets_are_distinct_uniform_and_nested():
    for n in (2, 4, 6, 8, 10):
        drawn = itw.sample_subsets(POOL, n, 15)
        assert len(drawn) == 15 and len({tuple(s) for s in drawn}) == 15
        assert all(len(s) == n and s == sorted(s) and set(s) <= set(POOL) for s in drawn)
        assert itw.sample_subsets(POOL, n, 2) == drawn[:2]  # quick is a prefix of full
        assert itw.sample_subsets(POOL, n, 15) == drawn  # seeded
    assert itw.sample_subsets(POOL, 12, 15) == [POOL]
    # asking for every subset of 2 gives each of the 66 exactly once
    every = itw.sample_subsets(POOL, 2, 66)
    assert sorted(map(tuple, every)) == list(combinations(POOL, 2))
    with pytest.raises(ValueError):
        itw.sample_subsets(POOL, 11, 13)


def test_homogeneous_groups_share_a_skill():
    from mergelab.tasks import TASKS
    from mergelab.zoo.tinylm import POOL as MIXES

    groups = itw.homogeneous_groups()
    assert len(groups) == 2
    members = [e for g in groups.values() for e in g["experts"]]
    assert len(members) == len(set(members)) == 6
    for skill, group in groups.items():
        assert len(group["experts"]) == 3
        assert all(skill in MIXES[e][0] for e in group["experts"])
        assert set(group["suite"]) == {t for e in group["experts"] for t in MIXES[e][0] if t in TASKS}


# ------------------------------------------------------------------------- the quick study


def test_plan_follows_the_protocol(study):
    out, results = study
    jobs, context = itw.plan(StudySettings(quick=True, zoo_size="test", progress=False))
    assert json.loads(json.dumps(context)) == results["context"]
    assert sorted(results["jobs"]) == sorted(job.label for job in jobs)
    assert {n: len(s) for n, s in context["subsets"].items()} == QUICK_N
    by_label = {job.label: job for job in jobs}
    for n, subsets in context["subsets"].items():
        assert subsets == itw.sample_subsets(POOL, int(n), 15)[: QUICK_N[n]]
        for i, subset in enumerate(subsets):
            for m, (name, params) in itw.METHODS.items():
                recipe = by_label[f"main:{m}|n={n}|s={i}"].recipe
                assert sorted(Path(x["model"]).name for x in recipe["models"]) == subset  # same subsets
                assert recipe["merge_method"] == name and recipe["parameters"] == params
                assert ("base_model" in recipe) == (name != "karcher")
    # the paper's settings (sec. 3.2, 4.2)
    assert itw.METHODS["TA"][1] == {"lambda": 1.0, "normalize": True}
    assert itw.METHODS["TIES"][1] == {"lambda": 0.1, "density": 0.1, "normalize": True}
    assert itw.METHODS["TIES+SB"][1]["lambda"] == 0.1 and itw.METHODS["TA+SB"][1]["beta"] == 0.2
    # two-point sweeps on all twelve experts
    sweeps = [job for job in jobs if job.label.startswith("sweep:")]
    assert all(sorted(Path(x["model"]).name for x in job.recipe["models"]) == POOL for job in sweeps)
    ta = {(j.recipe["parameters"]["normalize"], j.recipe["parameters"]["lambda"]) for j in sweeps
          if j.recipe["merge_method"] == "task_arithmetic"}
    assert ta == {(True, 1.0), (True, 1.9), (False, 1.0), (False, 1.9)}
    ties = {(j.recipe["parameters"]["density"], j.recipe["parameters"]["lambda"]) for j in sweeps
            if j.recipe["merge_method"] == "ties"}
    assert ties == {(0.1, 0.1), (1.0, 0.1), (0.1, 1.0)}
    for method in ("task_arithmetic_sb", "ties_sb"):
        assert {j.recipe["parameters"]["beta"] for j in sweeps if j.recipe["merge_method"] == method} == {0.2, 0.5}
    # every merge records its task-vector norm; the full-pool ones every expert's task vector too
    for job in jobs:
        if job.recipe is not None:
            recorded = [Path(e).name for e in job.weights["experts"]]
            assert recorded == ([] if len(job.recipe["models"]) < 12 else POOL)
    homogeneous = {j.label: sorted(Path(x["model"]).name for x in j.recipe["models"]) for j in jobs
                   if j.label.startswith("homogeneous:")}
    assert len(homogeneous) == 3 * len(itw.SIZES["quick"]["homogeneous_methods"])
    groups = context["homogeneous"]["groups"]
    for m in context["homogeneous"]["methods"]:
        for skill, group in groups.items():
            assert homogeneous[f"homogeneous:{m}|{skill}"] == group["experts"]
        assert homogeneous[f"homogeneous:{m}|all"] == sorted(e for g in groups.values() for e in g["experts"])


def expected_tables(jobs: dict, context: dict) -> list[tuple[list[list], list[str]]]:
    """(rows, column kinds) of every report table, in order, derived from the raw job results."""
    tasks, methods, ns = context["tasks"], context["methods"], [str(n) for n in context["n_values"]]
    counts = {n: len(context["subsets"][n]) for n in ns}
    base = mean_acc(jobs["parent:base"], tasks)
    experts = [mean_acc(jobs[f"parent:{e}"], tasks) for e in POOL]
    best = experts[int(np.argmax(experts))]
    columns = len(ns) + 1
    interference = ["text", "pct", *["interference"] * columns]
    per_task = ["text", *["pct"] * (len(tasks) + 1)]

    def norm(label: str) -> float:
        return jobs[label]["weights"]["task_vector_norm"]["merged"]["total"]

    def point(label: str) -> list[float]:
        return [mean_acc(jobs[label], tasks), norm(label)]

    full = jobs[f"main:{methods[0]}|n=12|s=0"]["weights"]
    expert_norms = [full["task_vector_norm"][e]["total"] for e in POOL]
    order = [full["cosine"]["labels"].index(e) for e in POOL]
    signs = full["sign_counts"]
    sweeps = context["sweeps"]
    groups = context["homogeneous"]["groups"]
    homogeneous = [["base (no merge)"]]
    for group in groups.values():
        homogeneous[0] += [mean_acc(jobs["parent:base"], group["suite"])] * 2 + [None]
    for m in context["homogeneous"]["methods"]:
        row = [m]
        for skill, group in groups.items():
            alone = mean_acc(jobs[f"homogeneous:{m}|{skill}"], group["suite"])
            together = mean_acc(jobs[f"homogeneous:{m}|all"], group["suite"])
            row += [alone, together, together - alone]
        homogeneous.append(row)
    return [
        ([[m, *[jobs[f"parent:{m}"]["eval"][t]["greedy"]["accuracy"] for t in tasks], mean_acc(jobs[f"parent:{m}"],
                                                                                              tasks)]
          for m in ["base", *POOL]], per_task),
        (interference_rows(jobs, context, base), interference),
        (interference_rows(jobs, context, best), interference),
        ([[m, float(np.mean(experts)), *[float(np.mean([mean_acc(jobs[f"main:{m}|n={n}|s={i}"], tasks)
                                                         for i in range(counts[n])])) for n in ns]] for m in methods],
         ["text", *["pct"] * columns]),
        ([[m, float(np.mean(expert_norms)), *[float(np.mean([norm(f"main:{m}|n={n}|s={i}") for i in range(counts[n])]))
                                               for n in ns]] for m in methods], ["text", *["num"] * columns]),
        ([[m, *[jobs[f"main:{m}|n=12|s=0"]["eval"][t]["greedy"]["accuracy"] for t in tasks],
           mean_acc(jobs[f"main:{m}|n=12|s=0"], tasks)] for m in methods], per_task),
        ([[a, *[full["cosine"]["global"][i][j] for j in order]] for a, i in zip(POOL, order)],
         ["text", *["num"] * 12]),
        ([[a, *["-" if a == b else "{positive}/{negative}".format(**(signs.get(f"{a}|{b}") or signs[f"{b}|{a}"]))
                for b in POOL]] for a in POOL], ["text"] * 13),
        ([[lam, *point(f"sweep:TA|normalize=True|lambda={lam}"), *point(f"sweep:TA|normalize=False|lambda={lam}")]
          for lam in sweeps["ta_lambda"]], ["num", "pct", "num", "pct", "num"]),
        ([[d, lam, *point(f"sweep:TIES|density={d}|lambda={lam}")] for d, lam in sweeps["ties_points"]],
         ["num", "num", "pct", "num"]),
        ([[b, *point(f"sweep:TA+SB|beta={b}"), *point(f"sweep:TIES+SB|beta={b}")] for b in sweeps["beta"]],
         ["num", "pct", "num", "pct", "num"]),
        (homogeneous, ["text", *["pct", "pct", "signed_pct"] * len(groups)]),
    ]


def test_report_numbers_equal_the_raw_results(study):
    out, results = study
    jobs, context = results["jobs"], results["context"]
    rendered = report_tables((out / "report.md").read_text())
    titles = [t["title"] for t in results["analysis"]["tables"]]
    assert len(rendered) == len(titles) == 12
    for title, (rows, kinds) in zip(titles, expected_tables(jobs, context), strict=True):
        check_rows(rendered[title], rows, kinds)
    experts = [mean_acc(jobs[f"parent:{e}"], context["tasks"]) for e in POOL]
    assert POOL[int(np.argmax(experts))] in titles[2]
    # the default sweep points are the main protocol's full-pool merges (same content, run once)
    assert jobs["sweep:TA|normalize=True|lambda=1.0"]["key"] == jobs["main:TA|n=12|s=0"]["key"]
    assert jobs["sweep:TIES+SB|beta=0.2"]["key"] == jobs["main:TIES+SB|n=12|s=0"]["key"]


def test_norms_and_cosines_match_the_weight_files(study):
    """Figure 4 and appendix D from the zoo's safetensors: TA (normalised, λ = 1) merges the task-vector mean,
    and without normalisation the sum; the cosines are those of the flattened task vectors."""
    out, results = study
    jobs, context = results["jobs"], results["context"]
    family = Path(context["family"])
    base = folder_tensors(family / "base")
    deltas = {e: {k: v - base[k] for k, v in folder_tensors(family / e).items()} for e in POOL}
    names = sorted(base)

    def norm_of_mean(subset: list[str]) -> float:
        return math.sqrt(sum(float(np.sum(np.mean([deltas[e][k] for e in subset], axis=0) ** 2)) for k in names))

    for n, subsets in context["subsets"].items():
        for i, subset in enumerate(subsets):
            stored = jobs[f"main:TA|n={n}|s={i}"]["weights"]["task_vector_norm"]["merged"]["total"]
            assert stored == pytest.approx(norm_of_mean(subset), rel=1e-5)
    assert jobs["sweep:TA|normalize=False|lambda=1.9"]["weights"]["task_vector_norm"]["merged"]["total"] == \
        pytest.approx(1.9 * 12 * norm_of_mean(POOL), rel=1e-5)
    rendered = report_tables((out / "report.md").read_text())
    titles = [t["title"] for t in results["analysis"]["tables"]]
    expert_norms = [math.sqrt(sum(float(np.sum(deltas[e][k] ** 2)) for k in names)) for e in POOL]
    ta_norms = [float(np.mean([norm_of_mean(s) for s in context["subsets"][str(n)]])) for n in context["n_values"]]
    ta_row = next(r for r in rendered[titles[4]] if r[0] == "TA")
    check_rows([rendered[titles[4]][0], ta_row], [["TA", float(np.mean(expert_norms)), *ta_norms]],
               ["text", *["num"] * (len(QUICK_N) + 1)])
    flat = {e: np.concatenate([deltas[e][k].ravel() for k in names]) for e in POOL}
    cosines = [[a, *[float(flat[a] @ flat[b] / np.linalg.norm(flat[a]) / np.linalg.norm(flat[b])) for b in POOL]]
               for a in POOL]
    check_rows(rendered[titles[6]], cosines, ["text", *["num"] * 12])


def test_figures_exist(study):
    out, results = study
    markdown = (out / "report.md").read_text()
    for name in ("accuracy_vs_n", "norm_vs_n", "cosine", "ta_lambda", "ties_norm_accuracy", "ties_density",
                 "sb_beta", "homogeneous"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name}.png)\n\nMade by `{results['command']}`." in markdown  # each figure with its command


def test_analysis_on_synthetic_scores(study):
    """Every table on made-up accuracies (the test zoo scores ~0 everywhere): random per-task accuracies for
    every model, and one merge tied exactly with the base, which must not count as above it."""
    _, results = study
    context = results["context"]
    rng = random.Random(7)
    fake = copy.deepcopy(results["jobs"])
    for result in fake.values():
        for task in result["eval"].values():
            task["greedy"]["accuracy"] = rng.randrange(21) / 20
    fake["main:TIES|n=2|s=1"]["eval"] = copy.deepcopy(fake["parent:base"]["eval"])
    analysis = itw.analyse(context, fake)
    for table, (rows, kinds) in zip(analysis["tables"], expected_tables(fake, context), strict=True):
        check_rows(report_tables(f"## x\n\n{render_table(table)}\n")["x"], rows, kinds)
    tasks = context["tasks"]
    base, other = mean_acc(fake["parent:base"], tasks), mean_acc(fake["main:TIES|n=2|s=0"], tasks)
    ties = next(row for row in analysis["tables"][1]["rows"] if row[0] == "TIES")
    assert ties[3] == itw.interference_cell(50.0 * (other > base), 50.0 * (other - base))
    by_n12 = {m: mean_acc(fake[f"main:{m}|n=12|s=0"], tasks) for m in context["methods"]}
    assert analysis["notes"][0].startswith(f"Best method by mean accuracy at n = 12: {max(by_n12, key=by_n12.get)};")
