"""``report.html`` in a real browser: Debian's headless Chromium loads the page that ``diagnose`` wrote, and
the page must show every table row of the markdown report and every figure decoded (inline base64 PNG, so the
page stands alone), and a screenshot of it must not be blank. Chromium is a test dependency (CI installs it):
without it these tests fail rather than skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from test_eval_runner import make_char_model
from tinymodels import make_expert

from mergelab.diagnostics.cli import diagnose
from mergelab.document import Figure, Paragraph, Report, Table, html, markdown
from mergelab.study.report import bar_plot

CHROMIUM = "/usr/bin/chromium"

# loads the report in an iframe and writes what the browser made of it into its own DOM, for --dump-dom
PROBE = """<!DOCTYPE html><html><body><pre id="out">not loaded</pre>
<iframe id="report" src="report.html" width="1200" height="900"></iframe>
<script>
document.getElementById("report").addEventListener("load", () => {
  const page = document.getElementById("report").contentDocument;
  const rows = [...page.querySelectorAll("tbody tr")].map(r => [...r.cells].map(c => c.textContent));
  const images = [...page.images].map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                                             inline: i.src.startsWith("data:image/png;base64,")}));
  const made = [...page.querySelectorAll(".made")].map(p => p.textContent);
  document.getElementById("out").textContent = JSON.stringify({rows, images, made});
});
</script></body></html>"""


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (the README's test command does)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def rendered(folder: Path, tmp: Path) -> dict:
    """What Chromium shows of ``folder/report.html``: table rows (cell texts), images, command captions."""
    (folder / "probe.html").write_text(PROBE)
    dom = chromium(tmp, "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                   (folder / "probe.html").as_uri()).stdout
    match = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert match and match.group(1) != "not loaded", dom[:500]
    return json.loads(match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def markdown_rows(text: str) -> list[list[str]]:
    """Body rows of every pipe table in a markdown file, in order (cells stripped of inline-code backticks)."""
    lines, rows, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip().replace("`", "") for c in lines[i].strip()[1:-1].split("|")])
                i += 1
        else:
            i += 1
    return rows


def assert_not_blank(png: Path) -> None:
    pixels = mpimg.imread(png)[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    non_white = (pixels < 0.95).any(axis=-1).mean()
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.02 and colours > 20, (non_white, colours)  # text, tables and coloured plots


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("html")
    base = make_char_model(root / "base")
    experts = [make_expert(base, root / f"e{i}", seed=50 + i) for i in range(2)]
    out = root / "diag"
    diagnose(experts[0], base, experts, out, k=4, n_probes=2, probe_length=8, nl_layers=[1], progress=False,
             command="mergelab diagnose e0 --base base --experts e0 e1 --out diag")
    return out


def test_diagnose_report_renders_its_tables_and_figures_in_chromium(diagnosed, tmp_path):
    page = rendered(diagnosed, tmp_path)
    assert page["rows"] == markdown_rows((diagnosed / "summary.md").read_text())
    assert len(page["rows"]) >= 8
    plots = sorted(p.name for p in diagnosed.glob("*.png"))
    assert len(page["images"]) == len(plots) >= 4
    assert all(shown["complete"] and shown["inline"] for shown in page["images"])
    sizes = sorted((i["width"], i["height"]) for i in page["images"])
    assert sizes == sorted(mpimg.imread(diagnosed / f).shape[1::-1] for f in plots)  # decoded at full size
    assert page["made"] and all("mergelab diagnose e0" in m for m in page["made"])
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", (diagnosed / "report.html").as_uri())
    assert_not_blank(shot)


def test_report_html_stands_alone(diagnosed, tmp_path):
    """Moved away from its PNG files, the page still shows every figure (they are embedded)."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(diagnosed / "report.html", alone / "report.html")
    page = rendered(alone, tmp_path)
    assert page["images"] and all(i["complete"] and i["width"] > 100 for i in page["images"])


def test_markdown_and_html_render_the_same_blocks(tmp_path):
    plot = bar_plot(tmp_path / "bars.png", "scores", ["a", "b"], {"x": [0.5, 0.25]}, "%", "mergelab demo")
    report = Report("A <title> & more").add(
        Paragraph("See [results.json](results.json) and `code <b>`."),
        Table(["model", "score %"], [["a", "50.0"], ["b <i>", "25.0"]], command="mergelab demo --size test"),
        Figure(plot.name, "scores per model", "mergelab demo --size test"))
    text, page = markdown(report), html(report, tmp_path)
    assert "| b <i> | 25.0 |" in text and "![scores per model](bars.png)" in text
    assert "<td>b &lt;i&gt;</td><td>25.0</td>" in page and "<code>code &lt;b&gt;</code>" in page
    assert '<a href="results.json">results.json</a>' in page and "A &lt;title&gt; &amp; more" in page
    assert page.count("Made by <code>mergelab demo --size test</code>") == 2
    assert "data:image/png;base64," in page and "bars.png" not in page  # embedded, not linked
