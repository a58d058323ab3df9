"""``mergelab study PROTOCOL --zoo smollm2``: what each protocol plans (which members each merge reads, what is
measured) and how its analysis turns held-out perplexities into the papers' tables, on hand-made results.

The plans are checked without building the zoo (``zoo.require`` returns a folder name); the end-to-end runs at
the zoo's ``test`` size are in BENCHMARKS.md (they take minutes of CPU each)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mergelab import zoo
from mergelab.study import smollm2
from mergelab.study.protocol import PROTOCOLS, StudySettings, protocol_module

FOLDER = Path("/zoo/smollm2-test")


@pytest.fixture
def settings(monkeypatch) -> StudySettings:
    monkeypatch.setattr(zoo, "require", lambda family, size, names, *args: FOLDER)
    return StudySettings(quick=True, zoo="smollm2", zoo_size="test", progress=False)


def _models(recipe: dict) -> list[str]:
    return [Path(m["model"]).name for m in recipe["models"]]


@pytest.mark.parametrize("full", [False, True])
def test_every_protocol_has_a_smollm2_variant_with_unique_labels(settings, full):
    if full:
        settings = StudySettings(zoo="smollm2", progress=False)
    for name in PROTOCOLS:
        module = protocol_module(name, "smollm2")
        jobs, _ = module.plan(settings)
        labels = [job.label for job in jobs]
        assert len(labels) == len(set(labels)) and jobs
        for job in jobs:
            assert job.heldout and job.heldout["size"] == settings.size() and job.heldout["domains"]
            # karcher and in-the-wild score perplexity only: no generation in their jobs
            assert job.heldout["continuations"] == (name in ("scf", "long-to-short"))
            assert bool(job.tasks) == (name in ("scf", "long-to-short"))


def test_long_to_short_merges_reasoning_into_short(settings):
    jobs, context = protocol_module("long-to-short", "smollm2").plan(settings)
    merges = [job for job in jobs if job.recipe]
    assert {job.label for job in jobs if job.model} == {"base", "short", "reasoning"}
    for job in merges:
        assert Path(job.recipe["base_model"]).name == "short" and _models(job.recipe) == ["reasoning"]
        assert job.tasks == ["gsm8k"] and job.eval_options["chat"]
    assert context["task"] == "gsm8k" and context["parents"] == ["base", "short", "reasoning"]


def test_scf_fuses_each_pair_directly_and_baselines_go_through_the_base(settings):
    jobs, context = protocol_module("scf", "smollm2").plan(settings)
    by_label = {job.label: job for job in jobs}
    for pair, (first, second) in smollm2.PAIRS.items():
        scf = by_label[f"{pair}:SCF-RKL"].recipe
        assert Path(scf["base_model"]).name == first and _models(scf) == [second]
        ta = by_label[f"{pair}:TA"].recipe
        assert Path(ta["base_model"]).name == "base" and _models(ta) == [first, second]
        assert by_label[f"{pair}:SCF-KL"].recipe["merge_method"] == "scf_kl"
    assert context["methods"][-1] == "SCF-KL"


def test_karcher_merges_the_first_m_experts_of_the_fixed_order(settings):
    jobs, context = protocol_module("karcher", "smollm2").plan(settings)
    for job in jobs:
        if job.recipe:
            m = int(job.label.rsplit("=", 1)[1])
            assert _models(job.recipe) == list(smollm2.KARCHER_ORDER[:m])
            assert ("base_model" in job.recipe) != (job.recipe["merge_method"] == "karcher")
    assert context["order"] == list(smollm2.KARCHER_ORDER[: max(context["ms"])])


def test_karcher_diagnoses_activations_of_figure_2s_methods_at_the_largest_m_only(settings):
    from mergelab.zoo.smollm2 import SIZES, heldout_texts

    jobs, context = protocol_module("karcher", "smollm2").plan(settings)
    top = max(context["ms"])
    diagnosed = {job.label for job in jobs if job.activations}
    assert diagnosed == {f"{label}|m={top}" for label in ("Karcher", "TIES")}  # test size: Lerp is not planned
    probes = next(job.activations for job in jobs if job.activations)
    order = context["order"]
    assert probes["experts"] == [str(FOLDER / e) for e in order] and probes["base"] == str(FOLDER / "base")
    domains = [smollm2.OWN_DOMAIN[e] for e in order]
    assert probes["prompts"] == [t for d in domains for t in heldout_texts(d, SIZES["test"])[:4]]


def test_in_the_wild_draws_subsets_of_the_seven_fine_tunes(settings):
    jobs, context = protocol_module("in-the-wild", "smollm2").plan(settings)
    assert context["pool"] == list(smollm2.WILD_POOL) and "low_quality" in context["pool"]
    for n, subsets in context["subsets"].items():
        assert all(len(s) == int(n) == len(set(s)) and set(s) <= set(smollm2.WILD_POOL) for s in subsets)


def _result(ppl: dict[str, float], repetition: float = 0.0) -> dict:
    return {"heldout": {d: {"perplexity": {"perplexity": p}, "continuation": {"repetition_rate": 1.0},
                            "continuation_sampled": {"repetition_rate": repetition}} for d, p in ppl.items()},
            "eval": {"gsm8k": {"greedy": {"accuracy": 0.1, "mean_length": 100.0, "repetition_rate": repetition,
                                          "distinct_2": 0.5, "format_rate": 1.0 - repetition}}}}


def test_relative_perplexity_is_the_geometric_mean_of_the_ratios():
    base = _result({"code": 10.0, "prose": 20.0})
    merged = _result({"code": 20.0, "prose": 10.0})
    assert smollm2.relative_perplexity(merged, base, ["code", "prose"]) == pytest.approx(1.0)
    assert smollm2.relative_perplexity(merged, base, ["code"]) == pytest.approx(2.0)


def test_karcher_analysis_ranks_lower_perplexity_first():
    order = ["reasoning", "code"]
    base = {"gsm8k": 4.0, "code": 8.0}
    results = {"parent:base": _result(base), "parent:reasoning": _result({"gsm8k": 2.0, "code": 8.0}),
               "parent:code": _result({"gsm8k": 4.0, "code": 4.0}),
               "Karcher|m=2": _result({"gsm8k": 2.0, "code": 8.0}),  # relative sqrt(0.5 * 1)
               "TIES|m=2": _result({"gsm8k": 4.0, "code": 16.0})}  # relative sqrt(1 * 2)
    analysis = smollm2._karcher_analyse({"ms": [2], "order": order, "methods": ["Karcher", "TIES"]}, results)
    rows = analysis["tables"][0]["rows"]
    assert rows[0][1] == pytest.approx(math.sqrt(0.5)) and rows[1][1] == pytest.approx(math.sqrt(2.0))
    assert rows[2][1] == pytest.approx(0.5)  # the best expert on its own domain
    assert "m=2: Karcher" in analysis["tables"][0]["note"]


def test_in_the_wild_counts_merges_above_the_base():
    domains = smollm2.DOMAINS
    base = _result(dict.fromkeys(domains, 10.0))
    results = {"parent:base": base, **{f"parent:{e}": _result(dict.fromkeys(domains, 10.0))
                                       for e in smollm2.WILD_POOL}}
    results["parent:code"] = _result(dict.fromkeys(domains, 5.0))  # the best fine-tune: score ln 2
    results["TA|n=2|s=0"] = _result(dict.fromkeys(domains, 8.0))  # above the base
    results["TA|n=2|s=1"] = _result(dict.fromkeys(domains, 20.0))  # below it
    context = {"pool": list(smollm2.WILD_POOL), "methods": ["TA"], "subsets": {"2": [["a", "b"], ["c", "d"]]}}
    tables = smollm2._wild_analyse(context, results)["tables"]
    expected = (-math.log(0.8) - math.log(2.0)) / 2
    assert tables[1]["rows"][0][1] == f"50 / {expected:+.2f}"
    assert tables[2]["title"].endswith("code (Table 2)") and tables[2]["rows"][0][1].startswith("0 / ")


def test_scf_table_reads_both_repetition_rates_per_pair_domain():
    context = {"pairs": {"complementary": ["reasoning", "code"]}, "methods": ["SCF-RKL", "TA"]}
    ppl = dict.fromkeys(smollm2.DOMAINS, 10.0)
    results = {"base": _result(ppl), "reasoning": _result(ppl), "code": _result(ppl),
               "complementary:SCF-RKL": _result(ppl, 0.25), "complementary:TA": _result(ppl, 0.75)}
    (tab,) = smollm2._scf_analyse(context, results)["tables"]
    header = tab["header"]
    sampled = header.index("code sampled continuation repetition %")
    assert header[sampled - 1] == "code greedy continuation repetition %"
    rows = {row[0]: row for row in tab["rows"]}
    assert rows["SCF-RKL"][sampled] == 0.25 and rows["TA"][sampled] == 0.75 and rows["TA"][sampled - 1] == 1.0
    assert rows["TA"][header.index("GSM8K repetition %")] == 0.75
    assert rows["TA"][header.index("GSM8K answers in the #### format %")] == 0.25


def test_long_to_short_sweeps_ta_in_lambda_and_scores_the_task_vectors_nonlinearity(settings):
    jobs, context = protocol_module("long-to-short", "smollm2").plan(settings)
    by_label = {job.label: job for job in jobs}
    for value in (0.25, 0.5, 0.75):
        recipe = by_label[f"TA (λ={value})"].recipe
        assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"] == {"lambda": value}
    probed = [job.label for job in jobs if job.activations]
    assert probed == ["reasoning"]
    diagnostics = by_label["reasoning"].activations
    assert Path(diagnostics["base"]).name == "short" and diagnostics["nl_layers"] is None
    assert diagnostics["alpha"] == 0.5 and diagnostics["whole_alphas"] == [0.25, 0.5, 0.75]
    assert {"TA (λ=0.25)", "TA (λ=0.75)"} <= set(context["methods"])


def test_linearity_table_sets_each_lambda_beside_the_straight_line_between_the_parents():
    from mergelab.study import l2s_linearity

    def job(length: float, ppl: float) -> dict:
        return {"eval": {"gsm8k": {"greedy": {"accuracy": 0.0, "mean_length": length}}},
                "heldout": {"gsm8k": {"perplexity": {"perplexity": ppl}}}}

    layer_scores = [0.5, 0.4, 0.45, 0.1, 0.2, 0.05]  # decreasing with a few swaps
    results = {"short": job(4.0, 8.0), "TA (λ=0.25)": job(4.0, 7.0), "TA (λ=0.5)": job(5.0, 6.0),
               "TA (λ=0.75)": job(60.0, 5.5), "reasoning": job(124.0, 5.0)}
    results["reasoning"]["activations"] = {
        "nl_score": {"merged": {str(i): s for i, s in enumerate(layer_scores)}},
        "nl_score_whole": {"merged": {"0.25": 0.1, "0.5": 0.3, "0.75": 0.2}}}
    analysis = l2s_linearity.analyse(results)
    behaviour, per_layer = analysis["tables"]
    rows = {row[1]: row for row in behaviour["rows"]}
    assert [row[0] for row in behaviour["rows"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rows["TA (λ=0.75)"][4] == pytest.approx(4.0 + 0.75 * 120.0) and rows["TA (λ=0.75)"][3] == 60.0
    assert rows["TA (λ=0.5)"][6] == 0.3 and rows["short"][6] is None and rows["reasoning"][5] == 5.0
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(ranks(np.arange(6.0)), ranks(np.array(layer_scores)))[0, 1]
    assert f"Spearman correlation with the layer index {rho:+.2f}" in per_layer["note"]
    assert f"Mean NL over the 6 layers {np.mean(layer_scores):.3f}" in per_layer["note"]
    assert [row[1] for row in per_layer["rows"]] == layer_scores


def test_smollm2_long_to_short_tables_show_the_answer_format_and_end_with_the_linearity_tables(settings):
    from mergelab.study import long_to_short

    _, context = protocol_module("long-to-short", "smollm2").plan(settings)
    results = {label: _result({"gsm8k": 6.0}, 0.25) for label in [*context["parents"], *context["methods"]]}
    results["reasoning"]["activations"] = {"nl_score": {"merged": {"0": 0.3, "1": 0.1}},
                                           "nl_score_whole": {"merged": {"0.25": 0.2, "0.5": 0.3, "0.75": 0.2}}}
    analysis = smollm2.PROTOCOLS["long-to-short"].analyse(context, results)
    main = analysis["tables"][0]
    assert main["header"][-1] == "answers in the task's format %" and {r[-1] for r in main["rows"]} == {0.75}
    assert len(analysis["tables"]) == len(long_to_short.analyse(context, results)["tables"]) + 2
    assert analysis["tables"][-1]["title"].startswith("NL score per layer")


def test_smollm2_arith_runs_tiny_lms_long_to_short_jobs_on_its_pair_with_the_linearity_probes(monkeypatch):
    from mergelab.errors import MergelabError
    from mergelab.study import long_to_short

    asked = []
    monkeypatch.setattr(zoo, "require", lambda family, size, names, *args: asked.append(family) or FOLDER)
    settings = StudySettings(quick=True, zoo="smollm2-arith", progress=False)
    jobs, context = protocol_module("long-to-short", "smollm2-arith").plan(settings)
    assert asked == ["smollm2-arith"] and settings.size() == "full"
    by_label = {job.label: job for job in jobs}
    assert {job.label for job in jobs if job.model} == {"base", "arith_short", "arith_long"}
    assert Path(by_label["arith_long"].activations["base"]).name == "arith_short"
    for value in (0.25, 0.5, 0.75):
        recipe = by_label[f"TA (λ={value})"].recipe
        assert recipe["parameters"] == {"lambda": value} and Path(recipe["base_model"]).name == "arith_short"
        assert _models(recipe) == ["arith_long"] and by_label[f"TA (λ={value})"].tasks == [long_to_short.TASK]
    assert [j.label for j in jobs if j.label in long_to_short.methods()] == list(long_to_short.methods())
    with pytest.raises(MergelabError, match="the long-to-short and the safety pair only"):
        protocol_module("karcher", "smollm2-arith")


def test_smollm2_arith_scf_fuses_the_refusal_model_into_the_arithmetic_model(monkeypatch):
    """Section 5.3's setting: the reasoning model (arith_long) is M0, the safety model (refusal) M1; scored on
    both skills with the generations kept for the refusal split; no other pair, no vision."""
    from mergelab.study import scf_pairs

    asked = []
    monkeypatch.setattr(zoo, "require", lambda family, size, names, *args: asked.append((family, names)) or FOLDER)
    jobs, context = protocol_module("scf", "smollm2-arith").plan(
        StudySettings(quick=True, zoo="smollm2-arith", progress=False))
    assert asked == [("smollm2-arith", ["arith_long", "base", "refusal"])]
    assert list(context["pairs"]) == ["safety"] and "vision" not in context
    ctx = context["pairs"]["safety"]
    assert ctx["pair"] == ["arith_long", "refusal"] and ctx["tasks"] == ["arith_long", "refusal"]
    by_label = {job.label: job for job in jobs}
    alphas = scf_pairs.SIZES["quick"]["alphas"]
    assert len(jobs) == 3 + 6 + 1 + 1 + (len(alphas) - 1) + 2  # parents, methods, SCF-KL, gap, sweep, blocking
    scf = by_label["safety/SCF-RKL"].recipe
    assert Path(scf["base_model"]).name == "arith_long" and _models(scf) == ["refusal"]
    ta = by_label["safety/TA"].recipe
    assert Path(ta["base_model"]).name == "base" and _models(ta) == ["arith_long", "refusal"]
    assert all(job.eval_options["keep_generations"] for job in jobs if job.tasks)
    assert [task for task, _ in context["blocking"]] == ["refusal", "arith_long"]
    assert {Path(by_label[label].blocking["base"]).name for _, label in context["blocking"]} == {"arith_long"}


def test_smollm2_arith_linearity_table_has_no_perplexity_column():
    from mergelab.study import smollm2_arith

    def job(length: float) -> dict:
        return {"eval": {"arith_long": {"greedy": {"accuracy": 0.5, "mean_length": length, "repetition_rate": 0.0},
                                        "sampled": {}}}}

    labels = ["base", "arith_short", "arith_long", "TA (λ=0.25)", "TA (λ=0.5)", "TA (λ=0.75)"]
    results = {label: job(3.0 + i) for i, label in enumerate(labels)}
    results["arith_long"]["activations"] = {"nl_score": {"merged": {"0": 0.2, "1": 0.1}},
                                            "nl_score_whole": {"merged": {"0.5": 0.1}}}
    context = {"samples": 1, "methods": labels[3:]}
    behaviour = smollm2_arith.PROTOCOLS["long-to-short"].analyse(context, results)["tables"][-2]
    assert behaviour["header"][-2:] == ["length if linear in λ", "NL score at α = λ (whole task vector)"]
    assert [row[1] for row in behaviour["rows"]] == ["arith_short", *labels[3:], "arith_long"]
