"""``mergelab demo`` end to end on the untrained test-size zoo: plumbing, and report numbers equal the JSON."""

import json

from mergelab.cli import main
from mergelab.study.demo import METHODS, SCENARIOS
from mergelab.study.report import fmt


def test_demo_report_numbers_come_from_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "test", "--items", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # the same tables and the plots inline (rendered: test_report_html)
    assert page.count('<img src="data:image/png;base64,') == len(SCENARIOS)
    for scenario, (first, second, tasks) in SCENARIOS.items():
        data = results["scenarios"][scenario]
        assert set(data["rows"]) == {"parent:base", f"parent:{first}", f"parent:{second}", *METHODS}
        assert (out / f"{scenario}.png").stat().st_size > 1000
        for name, row in data["rows"].items():
            line = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[1:len(tasks) + 1] == [fmt(row[f"acc:{t}"]) for t in tasks]
            assert cells[len(tasks) + 1] == fmt(row["average"])
            assert cells[len(tasks) + 2] == fmt(row["repetition_rate"])
            assert name in printed
            assert f"<td>{name}</td>" + "".join(f"<td>{c}</td>" for c in cells[1:]) in page
        # SCF-RKL keeps most of its base (the first expert) untouched; dense task arithmetic changes nearly all
        rows = data["rows"]
        assert rows["scf_rkl"]["unchanged_from_recipe_base"] > rows["task_arithmetic"]["unchanged_from_recipe_base"]
