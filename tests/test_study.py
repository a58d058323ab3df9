"""The study framework (jobs, executors, resume, report) through the quick long-to-short protocol on the
untrained test zoo: plumbing, report cells equal the raw job results, local and Ray give the same results."""

import json
import os
import shutil
import time

import pytest

from mergelab.errors import MergelabError
from mergelab.study.executors import connect_ray
from mergelab.study.jobs import Job, job_key
from mergelab.study.long_to_short import PARENTS, TASK
from mergelab.study.protocol import StudySettings, protocol_module, run_study
from mergelab.study.report import cell, render_table, table_block

SETTINGS = StudySettings(quick=True, zoo_size="test", build_zoo=True, progress=False)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "local"
    return out, run_study("long-to-short", out, SETTINGS, workers=2)


def without_timings(jobs):
    return {label: {k: v for k, v in result.items() if k != "seconds"} for label, result in jobs.items()}


def report_rows(report: str, title: str) -> dict[str, list[str]]:
    """The rows (first cell -> the other cells) of the markdown table under the heading ``## title``."""
    lines = report.split(f"## {title}\n", 1)[1].strip().splitlines()
    rows = [ln for ln in lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("|")), None)]][2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {c[0]: c[1:] for c in cells}


def test_report_cells_are_the_job_results(local):
    out, study = local
    saved = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    jobs = saved["jobs"]
    assert set(jobs) == {*PARENTS, *saved["context"]["methods"]}
    tables = saved["analysis"]["tables"]
    page = (out / "report.html").read_text()
    for table in tables:  # every table is rendered from the JSON and nothing else, in both pages
        assert render_table(table) in report
        block = table_block(table)
        assert "".join(f"<td>{c}</td>" for c in block.rows[0]) in page
    assert page.count('<img src="data:image/png;base64,') == report.count("![")

    main = report_rows(report, tables[0]["title"])
    for label, result in jobs.items():
        greedy = result["eval"][TASK]["greedy"]
        unchanged = result.get("merge", {}).get("unchanged_from_base")
        assert main[label] == [cell(greedy["accuracy"], "pct"), cell(greedy["mean_length"], "num"),
                               cell(greedy["repetition_rate"], "pct"), cell(unchanged, "pct")]
    consistency = report_rows(report, tables[1]["title"])
    for label, result in jobs.items():
        sampled = result["eval"][TASK]["sampled"]
        assert consistency[label] == [cell(sampled[f"self_consistency@{k}"], "pct") for k in (1, 2, 4)]
    alphas = report_rows(report, tables[2]["title"])
    record = jobs["FIM-TA"]["merge"]["prepare"]
    for i, layer in enumerate(record["layers"]):
        assert alphas[str(layer)][0] == cell(record["experts"][0]["alpha"][i], "num")
    # parents are scored as they are; merges say how much of their base they left untouched
    assert all("merge" not in jobs[name] for name in PARENTS)
    assert 0 < jobs["TIES (λ=0.5, r=0.2)"]["merge"]["unchanged_from_base"] <= 1
    for name in ("accuracy_vs_length.png", "alpha_per_layer.png"):
        assert (out / name).stat().st_size > 1000 and name in report


def test_ray_executor_gives_identical_results(local, tmp_path):
    pytest.importorskip("ray")
    _, study = local
    on_ray = run_study("long-to-short", tmp_path / "ray", SETTINGS, executor="ray", workers=2)
    assert on_ray["executor"] == "ray"
    assert len(list((tmp_path / "ray" / "jobs" / "results").glob("*.json"))) == len(study["jobs"])
    assert without_timings(on_ray["jobs"]) == without_timings(study["jobs"])
    assert on_ray["analysis"] == study["analysis"]


def test_a_killed_study_resumes_and_recomputes_only_what_is_missing(local, tmp_path):
    out, study = local
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "jobs", resumed / "jobs")
    results = sorted((resumed / "jobs" / "results").glob("*.json"))
    lost = results[0]
    lost.unlink()
    (resumed / "jobs" / "merges").mkdir(exist_ok=True)
    (resumed / "jobs" / "merges" / f"{lost.stem}.partial").mkdir()  # what a killed merge leaves
    before = {p: p.stat().st_mtime_ns for p in results[1:]}
    time.sleep(0.01)
    again = run_study("long-to-short", resumed, SETTINGS, workers=1)
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in results[1:]} == before  # finished jobs are never recomputed
    assert without_timings(again["jobs"]) == without_timings(study["jobs"])
    assert not any((resumed / "jobs" / "merges").iterdir())


def test_job_keys_follow_content_not_labels(tmp_path):
    from tinymodels import make_base, make_expert

    base = make_base(tmp_path / "base")
    expert = make_expert(base, tmp_path / "expert", seed=1)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(expert)}]}
    first = Job(label="a", recipe=recipe, tasks=["addition"])
    assert job_key(first) == job_key(Job(label="b", recipe=recipe, tasks=["addition"]))
    assert job_key(first) != job_key(Job(label="a", recipe={**recipe, "parameters": {"lambda": 0.5}},
                                         tasks=["addition"]))
    assert job_key(first) != job_key(Job(label="a", recipe=recipe, tasks=["addition"], n_items=7))
    changed = job_key(first)
    weights = expert / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert job_key(first) != changed  # an input rewritten since: the stored result no longer applies


def test_bad_inputs_say_what_to_do(tmp_path, monkeypatch):
    from mergelab.cli import main

    with pytest.raises(MergelabError, match="valid protocols"):
        protocol_module("nope")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "nope"])
    assert exit_info.value.code == 2
    started = time.perf_counter()
    with pytest.raises(MergelabError, match="does not answer"):
        connect_ray("127.0.0.1:1", 1)
    assert time.perf_counter() - started < 10
    monkeypatch.setenv("MERGELAB_ZOO", str(tmp_path / "empty-zoo"))
    with pytest.raises(MergelabError, match="mergelab zoo build tiny-lm --size test"):
        run_study("long-to-short", tmp_path / "out", StudySettings(quick=True, zoo_size="test", progress=False))
    with pytest.raises(MergelabError, match="Unknown executor"):
        run_study("long-to-short", tmp_path / "out", SETTINGS, executor="slurm")
