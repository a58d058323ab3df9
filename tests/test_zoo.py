"""The zoo: a test-size tiny-lm family builds, loads in transformers, is cached, resumable, deterministic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab import zoo
from mergelab.errors import MergelabError
from mergelab.tasks import TASKS
from mergelab.zoo import builder, corpus, tinylm
from mergelab.zoo.builder import FamilyPlan, Member


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return zoo.build("tiny-lm", "test", out=tmp_path_factory.mktemp("zoo") / "tiny-lm", progress=False)


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_zoo_json_describes_every_member(family):
    record = json.loads((family / "zoo.json").read_text())
    names = [m.name for m in tinylm.plan("test").members]
    assert list(record["members"]) == names and len(names) == 2 + len(TASKS) + 1 + 12
    assert sorted(p.name for p in family.iterdir() if p.is_dir()) == sorted(names)
    for name, member in record["members"].items():
        assert member["parent"] == (None if name == "base" else "base")
        assert {"data", "steps", "hyper", "scores", "build_seconds", "key"} <= set(member)
    assert set(record["members"]["base"]["scores"]) == set(TASKS)
    assert record["scenarios"]["strong_weak"] == ["addition", "weak_addition"]
    assert all(m in names for pair in record["scenarios"].values() for m in pair)
    assert record["licences"] and record["disk_bytes"] > 0 and record["complete"]


def test_members_load_in_transformers_and_generate(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, arch in [("addition", "LlamaForCausalLM"), ("base_qwen2", "Qwen2ForCausalLM")]:
        model = AutoModelForCausalLM.from_pretrained(family / name)
        tokenizer = AutoTokenizer.from_pretrained(family / name)
        assert type(model).__name__ == arch
        enc = tokenizer(["Add: 12 + 30 ="], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, enc["input_ids"].shape[1] + 4) or tokenizer.eos_token_id in out[0].tolist()
    qwen = load_file(family / "base_qwen2" / "model.safetensors")
    assert qwen["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0  # continued training moved the biases


def test_tokenizer_splits_digits_and_round_trips(family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family / "base")
    text = "Add: 347 + 58 = 405\ndef f(x):\n    return x"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in tokenizer(" 347", add_special_tokens=False)["input_ids"]]
    assert [p.strip() for p in pieces if p.strip()] == ["3", "4", "7"]


def test_second_build_is_a_cache_hit(family):
    before = _mtimes(family)
    assert zoo.build("tiny-lm", "test", out=family, progress=False) == family
    assert _mtimes(family) == before


def test_rebuilt_member_is_bitwise_identical_and_others_are_reused(family):
    """Resume: a missing member is rebuilt, the rest reused; determinism: the rebuild has the same weights."""
    original = load_file(family / "reverse" / "model.safetensors")
    others = {k: v for k, v in _mtimes(family).items() if not k.startswith(("reverse/", "zoo.json"))}
    (family / "reverse.partial").mkdir()  # what a killed build leaves behind
    (family / "reverse.partial" / "config.json").write_text("{half written")
    shutil.rmtree(family / "reverse")
    zoo.build("tiny-lm", "test", out=family, progress=False)
    rebuilt = load_file(family / "reverse" / "model.safetensors")
    assert original.keys() == rebuilt.keys()
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)
    assert not (family / "reverse.partial").exists()
    assert {k: v for k, v in _mtimes(family).items() if k in others} == others


def test_training_data_never_contains_a_test_prompt(family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family / "base")
    test_prompts = {
        e.prompt for t in TASKS.values() for e in t.examples("test", 2000 if t.name != "addition" else 1500)
    }
    items = tinylm._supervised_items(tokenizer, {name: 1.0 for name in TASKS}, 8 * 400, corrupt=0.5, seed=3)
    assert len(items) >= 8 * 399
    assert not {tokenizer.decode(prompt) for prompt, _ in items} & test_prompts
    assert not any(text.startswith(tuple(test_prompts)) for text in tinylm._skill_texts(50))
    for task in TASKS.values():  # the base's plain-words items come from the training split too
        phrased_test = {task.phrased(e)[0] for e in task.examples("test", 1500)}
        assert not {prompt for prompt, _ in tinylm._phrased(task, 3000)} & phrased_test


def _fake_plan(settings: dict, fail: str | None = None) -> FamilyPlan:
    def make(name):
        def run(out: Path, built: dict[str, Path], device: str) -> dict:
            (out / "model.safetensors").write_text(f"{name} {settings[name]}")
            if name == fail:
                raise KeyboardInterrupt  # killed mid-member
            return {"made_from": sorted(built)}

        return run

    members = [
        Member("a", None, {"v": settings["a"]}, make("a")),
        Member("b", "a", {"v": settings["b"]}, make("b")),
        Member("c", None, {"v": settings["c"]}, make("c")),
    ]
    return FamilyPlan("fake", "test", {}, members, {}, {}, (Path(builder.__file__),))


def test_changed_recipe_rebuilds_that_member_and_its_children_only(tmp_path):
    builder.build_plan(_fake_plan({"a": 1, "b": 1, "c": 1}), tmp_path, "cpu", progress=False)
    first = _mtimes(tmp_path)
    builder.build_plan(_fake_plan({"a": 2, "b": 1, "c": 1}), tmp_path, "cpu", progress=False)
    second = _mtimes(tmp_path)
    assert second["c/model.safetensors"] == first["c/model.safetensors"]
    assert second["a/model.safetensors"] != first["a/model.safetensors"]
    assert second["b/model.safetensors"] != first["b/model.safetensors"]  # its parent changed
    assert (tmp_path / "a" / "model.safetensors").read_text() == "a 2"


def test_a_docstring_or_comment_edit_keeps_the_members_but_a_code_edit_rebuilds(tmp_path):
    module = tmp_path / "family.py"
    plan = FamilyPlan("fake", "test", {}, [], {}, {}, (module,))
    module.write_text('"""Doc."""\n\ndef steps():\n    """Steps."""\n    return 48  # per member\n')
    built = builder.code_version(plan)
    module.write_text('"""Other doc."""\n\n\ndef steps():\n    """Other."""\n    # measured\n    return 48\n')
    assert builder.code_version(plan) == built
    module.write_text('"""Doc."""\n\ndef steps():\n    """Steps."""\n    return 49  # per member\n')
    assert builder.code_version(plan) != built


def test_killed_member_leaves_nothing_and_keeps_finished_members(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        builder.build_plan(_fake_plan({"a": 1, "b": 1, "c": 1}, fail="b"), tmp_path, "cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert json.loads((tmp_path / "a" / builder.MEMBER_RECORD).read_text())["name"] == "a"


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(MergelabError, match="tiny-lm"):
        zoo.build("tiny-llm")
    with pytest.raises(MergelabError, match="test, demo, full"):
        zoo.build("tiny-lm", size="huge")
    with pytest.raises(MergelabError, match="vision"):
        zoo.build("vision", size="demo")
    with pytest.raises(MergelabError, match="cpu"):
        zoo.build("tiny-lm", device="tpu", out=tmp_path)
    with pytest.raises(MergelabError, match="pool_11"):
        zoo.member("tiny-lm", "nobody", out=tmp_path)
    with pytest.raises(MergelabError, match="python3.11-doc"):
        corpus.prose(1000, sources=tmp_path / "missing")
    assert not any(tmp_path.iterdir())


def test_cli_builds_and_lists(family, capsys, monkeypatch, tmp_path):
    import argparse

    from mergelab.zoo import cli

    parser = argparse.ArgumentParser(prog="mergelab")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "build", "tiny-lm", "--out", str(family)])
    assert args.func(args) == 0 and str(family) in capsys.readouterr().out
    args = parser.parse_args(["zoo", "show", "tiny-lm", "--out", str(family)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads((family / "zoo.json").read_text())
    assert lines[0].split(" | ")[4:] == [*TASKS][:-1] + [f"{[*TASKS][-1]} |"]
    base_row = next(line for line in lines if line.startswith("| base |"))
    assert base_row.split(" | ")[4] == f"{100 * record['members']['base']['scores']['addition']['accuracy']:.1f}"
    assert sum(line.startswith("| ") for line in lines) == 1 + len(record["members"])
    monkeypatch.setenv("MERGELAB_ZOO", str(tmp_path))
    args = parser.parse_args(["zoo", "list"])
    assert args.func(args) == 0
    assert "not built" in capsys.readouterr().out
    args = parser.parse_args(["zoo", "show", "vision"])
    with pytest.raises(MergelabError, match="mergelab zoo build vision --size test"):
        args.func(args)


def test_named_members_build_with_their_parents_only(tmp_path):
    plan = _fake_plan({"a": 1, "b": 1, "c": 1})
    builder.build_plan(plan, tmp_path, "cpu", progress=False, members=["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "zoo.json"]
    record = json.loads((tmp_path / "zoo.json").read_text())
    assert list(record["members"]) == ["a", "b"] and record["complete"] is False
    assert record["members"]["b"]["made_from"] == ["a"]
    first = _mtimes(tmp_path)
    builder.build_plan(plan, tmp_path, "cpu", progress=False, members=["a", "b"])
    assert _mtimes(tmp_path) == first  # a cache hit: nothing rewritten, not even zoo.json
    builder.build_plan(plan, tmp_path, "cpu", progress=False)
    record = json.loads((tmp_path / "zoo.json").read_text())
    assert list(record["members"]) == ["a", "b", "c"] and record["complete"] is True
    assert {k: v for k, v in _mtimes(tmp_path).items() if k.startswith(("a/", "b/"))} == {
        k: v for k, v in first.items() if k.startswith(("a/", "b/"))
    }
    with pytest.raises(MergelabError, match="no member 'd'; its members are: a, b, c"):
        builder.build_plan(plan, tmp_path, "cpu", progress=False, members=["d"])


def test_every_family_module_offers_the_sizes_the_zoo_lists():
    from mergelab.zoo import vision

    assert tuple(tinylm.SIZES) == zoo.sizes("tiny-lm")
    assert tuple(vision.SIZES) == zoo.sizes("vision")


def test_importing_the_zoo_and_its_cli_loads_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys, mergelab.zoo, mergelab.zoo.cli, mergelab.zoo.builder;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_zoo_show_table_has_scores_and_held_out_perplexities():
    from mergelab.zoo.cli import markdown

    def member(parent, scores=None, perplexity=None):
        return {"parent": parent, "steps": 3, "build_seconds": 1.4, "scores": scores or {},
                **({"perplexity": perplexity} if perplexity else {})}

    record = {"family": "f", "size": "full", "complete": True, "disk_bytes": 2e6, "build_seconds_total": 90,
              "members": {
                  "base": member(None),
                  "math": member("base", {"gsm8k": {"accuracy": 0.25, "base_accuracy": 0.02}}),
                  "code": member("base", perplexity={"heldout_code": {"perplexity": 7.126, "base_perplexity": 7.8}}),
              }}
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown(record).splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["member", "parent", "steps", "build s", "gsm8k", "heldout_code perplexity"]
    assert rows[1] == ["base", "-", "3", "1", "", ""]
    assert rows[2] == ["math", "base", "3", "1", "25.0 (2.0)", ""]
    assert rows[3] == ["code", "base", "3", "1", "", "7.13 (7.80)"]
