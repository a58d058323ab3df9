"""What a new user meets in the first hour besides mistakes (those are in test_user_mistakes.py): the rule for
relative model paths, --overwrite of a previous merge, the Python API, diagnose provenance of a bfloat16
merge, --version, help texts with examples, -v/-q, one progress display per zoo build, readable plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file
from tinymodels import make_base, make_expert, write_recipe

import mergelab
from mergelab.cli import build_parser, main
from mergelab.diagnostics import report as diagnostics_report
from mergelab.diagnostics.weights import weight_diagnostics
from mergelab.errors import OutputError, RecipeError
from mergelab.model_refs import resolve_model_ref
from mergelab.study.protocol import PROTOCOLS, protocol_module
from mergelab.tasks import TASKS


@pytest.fixture(scope="module")
def sparse_family(tmp_path_factory):
    """A base and two experts that each moved half of the elements (a fixed random half)."""
    root = tmp_path_factory.mktemp("family")
    base = make_base(root / "base")
    experts = [make_expert(base, root / f"expert{i}", seed=7 + i, density=0.5) for i in range(2)]
    return root, base, experts


def recipe(base: Path, experts: list[Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts], **extra}


# ------------------------------------------------------------------------------------------ relative paths


def test_relative_model_paths_beside_the_recipe_or_in_the_working_directory(tmp_path, monkeypatch):
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    (recipes / "models" / "a").mkdir(parents=True)
    (work / "models" / "b").mkdir(parents=True)
    (work / "recipes").mkdir()
    monkeypatch.chdir(work)
    assert resolve_model_ref("models/a", recipes).resolve() == (recipes / "models" / "a").resolve()
    assert resolve_model_ref("models/b", recipes).resolve() == (work / "models" / "b").resolve()
    assert resolve_model_ref("models/b", None).resolve() == (work / "models" / "b").resolve()
    (recipes / "models" / "b").mkdir()  # now 'models/b' names two different folders
    with pytest.raises(RecipeError, match="could mean") as error:
        resolve_model_ref("models/b", recipes)
    assert str((recipes / "models" / "b").resolve()) in str(error.value)
    assert str((work / "models" / "b").resolve()) in str(error.value)
    monkeypatch.chdir(recipes)  # the recipe in the working directory: one folder, not two
    assert resolve_model_ref("models/b", Path(".")).resolve() == (recipes / "models" / "b").resolve()


def test_a_recipe_mixing_folders_is_refused_not_merged(sparse_family, tmp_path, monkeypatch):
    """The issue's case: './base' in the working directory and beside the recipe, experts only beside it."""
    _, base, experts = sparse_family
    beside = tmp_path / "recipes"
    beside.mkdir()
    for model in (base, *experts):
        (beside / model.name).symlink_to(model)
    work = tmp_path / "work"
    work.mkdir()
    make_base(work / "base", seed=3)
    path = write_recipe(beside / "r.yml", recipe(Path("./base"), [Path(e.name) for e in experts]))
    monkeypatch.chdir(work)
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ --overwrite


def test_overwrite_replaces_a_previous_merge_and_nothing_else(sparse_family, tmp_path, capsys):
    _, base, experts = sparse_family
    path = write_recipe(tmp_path / "r.yml", recipe(base, experts))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out)]) == 0
    first = {name: t.clone() for name, t in load_file(out / "model.safetensors").items()}  # not a view of the file
    (out / "model.safetensors").write_bytes(b"damaged")  # a previous merge is replaced whole
    assert main(["merge", str(path), str(out), "--overwrite"]) == 0
    second = load_file(out / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    (out / "notes.md").write_text("my notes")
    assert main(["merge", str(path), str(out), "--overwrite"]) == 2
    assert "notes.md" in capsys.readouterr().err and (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()
    (out / "mergelab.json").write_text("{}")  # not a record a merge wrote
    assert main(["merge", str(path), str(out), "--overwrite"]) == 2
    assert "not a previous mergelab output" in capsys.readouterr().err


def test_python_api_is_mergelab_merge_and_speaks_in_keywords(sparse_family, tmp_path):
    _, base, experts = sparse_family
    out = mergelab.merge(recipe(base, experts), tmp_path / "out")
    assert (out / "mergelab.json").is_file()
    with pytest.raises(OutputError) as error:
        mergelab.merge(recipe(base, experts), out)
    assert "overwrite=True" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(RecipeError) as error:
        mergelab.merge(recipe(base, experts), tmp_path / "cuda", device="cuda")
    assert "device='cpu'" in str(error.value) and "--device" not in str(error.value)
    assert mergelab.merge(recipe(base, experts), out, overwrite=True) == out


# ------------------------------------------------------------------------------------------ diagnose


def test_provenance_of_bfloat16_and_float32_outputs_agree(sparse_family, tmp_path):
    """Task arithmetic (weights 1) leaves an element at the base where both experts did, takes an expert's value
    where only that expert moved, and makes a new value where both moved. Those fractions, counted straight from
    the files, are the provenance of the merge, in float32 and in bfloat16 alike (where the old float64
    comparison said "neither" for nearly everything in bfloat16)."""
    _, base, experts = sparse_family
    base_t, e0_t, e1_t = (load_file(folder / "model.safetensors") for folder in (base, *experts))
    moved0 = {n: e0_t[n] != base_t[n] for n in base_t}
    moved1 = {n: e1_t[n] != base_t[n] for n in base_t}
    total = sum(t.numel() for t in base_t.values())

    def share(mask) -> float:
        return sum(int(mask(n).sum()) for n in base_t) / total

    expected = {"base": share(lambda n: ~moved0[n] & ~moved1[n]), "expert0": share(lambda n: moved0[n] & ~moved1[n]),
                "expert1": share(lambda n: ~moved0[n] & moved1[n]), "neither": share(lambda n: moved0[n] & moved1[n])}
    assert min(expected.values()) > 0.15  # each case is well represented
    provenance = {}
    for dtype in ("float32", "bfloat16"):
        out = mergelab.merge(recipe(base, experts, dtype=dtype), tmp_path / dtype)
        provenance[dtype] = weight_diagnostics(out, base, experts, svd=False, progress=False)["provenance"]
    assert provenance["float32"]["total"]["base"] == pytest.approx(expected["base"], abs=1e-9)
    assert provenance["float32"]["compared_in"] == "float32" and not provenance["float32"]["parents_rounded"]
    assert provenance["bfloat16"]["compared_in"] == "bfloat16" and provenance["bfloat16"]["parents_rounded"]
    for source, fraction in expected.items():  # rounding may move a tiny update onto its parent: 1 %
        assert provenance["bfloat16"]["total"][source] == pytest.approx(fraction, abs=0.01), source


# ------------------------------------------------------------------------------------------ help and output


def all_helps() -> dict[str, str]:
    """The --help text of the main command and every sub-command."""
    parser = build_parser()
    helps = {"mergelab": parser.format_help()}

    def walk(p, name):
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub_name, sub in action.choices.items():
                    helps[f"{name} {sub_name}"] = sub.format_help()
                    walk(sub, f"{name} {sub_name}")

    walk(parser, "mergelab")
    return helps


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mergelab {mergelab.__version__}"


def test_every_help_shows_an_example_and_no_markup_or_paper_numbers():
    helps = all_helps()
    assert {"mergelab merge", "mergelab check", "mergelab eval", "mergelab diagnose", "mergelab zoo build",
            "mergelab demo", "mergelab study"} <= set(helps)
    for name, text in helps.items():
        if name not in ("mergelab zoo list", "mergelab zoo show"):
            assert "examples:" in text and f"\n  {name}" in text, name
        assert "``" not in text, name
        assert not re.search(r"paper \d{3}|shared/papers", text), name
    tasks_help = " ".join(helps["mergelab eval"].split())
    assert all(f"{name} (" in tasks_help for name in TASKS)
    diagnose_help = " ".join(helps["mergelab diagnose"].split())
    assert "Lin et al. 2026 (SCF-RKL), appendix A.4" in diagnose_help


def test_report_texts_cite_author_and_year():
    """Every protocol, on either zoo, names its paper by author and year (anonymous submissions: their status)."""
    for zoo in ("tiny-lm", "smollm2"):
        for name in PROTOCOLS:
            paper = protocol_module(name, zoo).PAPER
            assert not re.search(r"paper \d{3}|shared/papers", paper), paper
            assert re.search(r"20\d\d|preprint|under double-blind review", paper), paper


def test_verbose_and_quiet_map_to_logging_levels_for_merge(sparse_family, tmp_path):
    _, base, experts = sparse_family
    path = write_recipe(tmp_path / "r.yml", recipe(base, experts))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")

    def run(*flags: str, out: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mergelab.cli", *flags, str(path), str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert run("merge", out="plain") == ""
    verbose = run("merge", "-v", out="verbose")
    assert "INFO: recipe" in verbose and f"INFO: input {base}" in verbose and "task_arithmetic" in verbose
    assert "INFO" in run("-v", "merge", out="verbose_before")
    assert run("merge", "-q", out="quiet") == ""


def test_zoo_build_shows_one_progress_display(tmp_path):
    """transformers' loading and saving bars and the per-member training bars are gone: the zoo's own bar is
    the only one (tqdm redraws it with carriage returns; every line starts with its description)."""
    proc = subprocess.run([sys.executable, "-m", "mergelab.cli", "zoo", "build", "tiny-lm", "--size", "test",
                           "--members", "base", "addition", "--out", str(tmp_path / "zoo")],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert lines and all(line.startswith("zoo tiny-lm (test)") for line in lines), lines


def test_activation_and_layer_plots_are_readable(tmp_path, monkeypatch):
    """Integer layer ticks, a y label on every panel, and overlapping series told apart by marker and dash."""
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    per_layer = {"variance": [0.1, 0.2, 0.3], "effective_rank": [3.0, 2.5, 2.0], "numerical_rank": [4, 4, 4]}
    results = {"activations": {"models": {name: {"per_layer": per_layer} for name in ("merged", "base", "e0", "e1")},
                               "nl_score": {"e0": {"0": 0.1, "1": 0.2, "2": 0.15}}},
               "layer_blocking": {"task": "addition", "score_change": {"0": -0.1, "1": 0.05, "2": 0.0}}}
    diagnostics_report._plots(results, tmp_path)
    axes = [ax for fig in saved for ax in fig.axes]
    assert len(axes) == 5
    for ax in axes:
        assert ax.get_ylabel() and ax.get_xlabel() == "layer"
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        styles = [(line.get_marker(), line.get_linestyle()) for line in ax.get_lines() if line.get_label()[0] != "_"]
        assert len(set(styles)) == len(styles)  # identical curves (here all four) stay distinguishable


def test_diagnose_summary_says_the_provenance_dtype(sparse_family, tmp_path):
    """summary.md says in which dtype provenance was compared."""
    _, base, experts = sparse_family
    out = mergelab.merge(recipe(base, experts, dtype="bfloat16"), tmp_path / "bf16")
    results = {"weights": weight_diagnostics(out, base, experts, svd=False, progress=False)}
    diagnostics_report.write_report(results, tmp_path / "diag", command="mergelab diagnose bf16")
    summary = (tmp_path / "diag" / "summary.md").read_text()
    assert "compared in bfloat16, the merged model's dtype (the parents rounded to it" in summary
    assert json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["weights"]["provenance"]["compared_in"] \
        == "bfloat16"
