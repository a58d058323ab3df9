"""``eval`` and ``diagnose`` end to end through their argparse sub-commands, on tiny character-level models
and on a merge of the ``--size test`` zoo's members."""

from __future__ import annotations

import argparse
import json

import pytest
from test_eval_runner import make_char_model
from tinymodels import make_expert

from mergelab.diagnostics import cli as diagnose_cli
from mergelab.evaluation import cli as eval_cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mergelab")
    subparsers = parser.add_subparsers(required=True)
    eval_cli.register(subparsers)
    diagnose_cli.register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_char_model(root / "base")
    experts = [make_expert(base, root / f"e{i}", seed=30 + i) for i in range(2)]
    return root, base, experts


def test_eval_command_writes_json_and_prints_a_table(family, capsys):
    root, base, _ = family
    text = root / "heldout.txt"
    text.write_text("first paragraph of text\n\nsecond one")
    out = root / "results.json"
    code = run(
        [
            "eval",
            str(base),
            "--tasks",
            "addition",
            "reverse",
            "--items",
            "3",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--ppl-file",
            str(text),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"addition", "reverse"}
    assert results["tasks"]["addition"]["n_items"] == 3
    assert "pass@2" in results["tasks"]["addition"]["sampled"]
    assert results["heldout_text"]["n_tokens"] == len("first paragraph of text") - 1 + len("second one") - 1
    printed = capsys.readouterr().out
    assert "addition" in printed and "perplexity" in printed


def test_diagnose_command_writes_json_plots_and_summary(family):
    root, base, experts = family
    out = root / "diag"
    code = run(
        [
            "diagnose",
            str(experts[0]),
            "--base",
            str(base),
            "--experts",
            *map(str, experts),
            "--out",
            str(out),
            "--k",
            "4",
            "--probes",
            "3",
            "--probe-length",
            "8",
            "--nl-layers",
            "1",
            "--block-task",
            "addition",
            "--block-items",
            "2",
        ]
    )
    assert code == 0
    results = json.loads((out / "diagnostics.json").read_text())
    assert set(results) >= {"weights", "activations", "layer_blocking", "timing"}
    # the 'merge' is expert e0 itself: every element comes from e0 and its KL to e0 is zero
    assert results["weights"]["provenance"]["total"]["e0"] == pytest.approx(1.0)
    assert results["activations"]["models"]["e0"]["kl_parent_to_merged"] == pytest.approx(0.0, abs=1e-9)
    assert set(results["layer_blocking"]["score_change"]) == {"0", "1"}
    for png in (
        "weights_layers.png",
        "cosine.png",
        "geometry.png",
        "activations.png",
        "nl_score.png",
        "layer_blocking.png",
    ):
        assert (out / png).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "## Weight space" in summary and "## Function space" in summary and "Layer blocking" in summary


def test_diagnose_with_task_prompts_as_probes(family):
    root, base, experts = family
    result = diagnose_cli.diagnose(
        experts[1],
        base,
        experts[:1],
        root / "diag_prompts",
        weights=False,
        n_probes=4,
        probe_length=12,
        probe_task="reverse",
        nl_layers=[],
        progress=False,
    )
    probes = result["activations"]["probes"]
    assert probes["kind"] == "prompts" and probes["n"] == 4 and probes["tokens"] <= 4 * 12


def test_eval_and_diagnose_on_the_test_zoo(tmp_path):
    from mergelab import zoo
    from mergelab.api import merge

    folder = zoo.build("tiny-lm", "test", members=["base", "addition", "reverse"], progress=False)
    base, addition, reverse = (folder / name for name in ("base", "addition", "reverse"))
    merged = merge({"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
                    "models": [{"model": str(addition)}, {"model": str(reverse)}]}, tmp_path / "merged")
    assert run(["eval", str(merged), "--tasks", "addition", "reverse", "--items", "4",
                "--out", str(tmp_path / "r.json")]) == 0
    assert set(json.loads((tmp_path / "r.json").read_text())["tasks"]) == {"addition", "reverse"}
    assert run(["diagnose", str(merged), "--base", str(base), "--experts", str(addition), str(reverse),
                "--out", str(tmp_path / "d"), "--probes", "2", "--probe-length", "8", "--nl-layers"]) == 0
    summary = (tmp_path / "d" / "summary.md").read_text()
    assert "provenance" in summary.lower()
