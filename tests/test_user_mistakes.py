"""The mistakes a newcomer makes in the first hour, each run through the real ``mergelab`` command in a
subprocess: a non-zero exit, at most three lines on stderr and no traceback, the offending file, key or
folder named, and nothing written or deleted anywhere under the working folder (the tree is hashed before and
after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tinymodels import make_family, write_recipe

from mergelab.api import merge


@dataclass(frozen=True)
class Mistake:
    name: str
    argv: list[str]
    names: list[str]  # what the message must mention (file, key, folder, the fix)
    cwd: str = "."


def ta(base: str, experts: list[str], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts], **extra}


GOOD = ta("models/base", ["models/expert0", "models/expert1"])

MISTAKES = [
    Mistake("recipe file missing", ["merge", "recipe.yaml", "out"], ["recipe.yaml", "does not exist"]),
    Mistake("YAML syntax error", ["merge", "broken.yml", "out"], ["broken.yml:4:", "not valid YAML"]),
    Mistake("recipe is a list", ["merge", "list.yml", "out"], ["list.yml", "mapping"]),
    Mistake("models: []", ["merge", "empty.yml", "out"], ["empty.yml", "'models' is empty"]),
    Mistake("models and slices", ["merge", "both.yml", "out"], ["both.yml", "'models' and 'slices'"]),
    Mistake("misspelt top-level key", ["merge", "typo_key.yml", "out"], ["merge_metod", "merge_method"]),
    Mistake("unknown method", ["merge", "typo_method.yml", "out"], ["typo_method.yml", "'tie'", "ties"]),
    Mistake("unknown parameter", ["merge", "typo_param.yml", "out"], ["typo_param.yml", "densty", "density"]),
    Mistake("unknown dtype", ["merge", "typo_dtype.yml", "out"], ["bf17", "bfloat16"]),
    Mistake("missing model folder", ["merge", "missing_model.yml", "out"], ["models/expert9", "does not exist"]),
    Mistake("Hub id", ["merge", "hub.yml", "out"], ["Qwen/Qwen2.5-0.5B", "huggingface-cli download"]),
    Mistake("PEFT adapter as a model", ["merge", "adapter.yml", "out"], ["lora_adapter", "base model 'x'"]),
    Mistake("GGUF file as a model", ["merge", "gguf.yml", "out"], ["model-q4.gguf", "GGUF", "save_pretrained"]),
    Mistake("weights file instead of folder", ["merge", "file.yml", "out"], ["model.safetensors", "folder"]),
    Mistake("pickled checkpoint", ["merge", "pickled.yml", "out"], ["pickled", "--allow-pickle"]),
    Mistake("name in recipe folder and cwd", ["merge", "sub/recipe.yml", "out"],
            ["models/base", "beside the recipe", "working directory"]),
    Mistake("output is the working directory", ["merge", "good.yml", "."], ["working directory"]),
    Mistake("output is a parent folder", ["merge", "../good.yml", ".."], ["..", "working directory"], cwd="notes"),
    Mistake("output exists, no --overwrite", ["merge", "good.yml", "notes"], ["notes", "--overwrite"]),
    Mistake("--overwrite of a user folder", ["merge", "good.yml", "notes", "--overwrite"],
            ["notes", "not a previous mergelab output"]),
    Mistake("--overwrite of a merge with a user file", ["merge", "good.yml", "previous", "--overwrite"],
            ["previous", "my_eval.txt"]),
    Mistake("output holds the inputs", ["merge", "good.yml", "models", "--overwrite"], ["models", "holds input"]),
    Mistake("output inside an input", ["merge", "good.yml", "models/base/merged"], ["models/base", "inside input"]),
    Mistake("a user folder named like the partial output", ["merge", "good.yml", "notes2", "--resume"],
            ["notes2.partial", "not an interrupted merge"]),
    Mistake("output is a file", ["merge", "good.yml", "notes/todo.txt"], ["notes/todo.txt", "not a folder"]),
    Mistake("no output folder", ["merge", "good.yml"], ["OUT_DIR"]),
    Mistake("bad --shard-size", ["merge", "good.yml", "out", "--shard-size", "5X"], ["--shard-size", "5X"]),
    Mistake("--device cuda without a GPU", ["merge", "good.yml", "out", "--device", "cuda"], ["--device", "cpu"]),
    Mistake("check a missing recipe", ["check", "recipe.yaml"], ["recipe.yaml"]),
    Mistake("eval a Hub id", ["eval", "Qwen/Qwen2.5-0.5B", "--tasks", "addition"], ["huggingface-cli download"]),
    Mistake("eval an adapter", ["eval", "lora_adapter", "--tasks", "addition"], ["lora_adapter", "adapter"]),
    Mistake("eval a missing folder", ["eval", "merged_model", "--tasks", "addition"], ["merged_model"]),
    Mistake("eval a model without a tokenizer", ["eval", "models/base", "--tasks", "addition"],
            ["models/base", "tokenizer"]),
    Mistake("eval an unknown option value", ["eval", "models/base", "--split", "dev"], ["--split", "dev"]),
    Mistake("diagnose with an adapter expert", ["diagnose", "previous", "--base", "models/base", "--experts",
                                                "lora_adapter", "--out", "diag"], ["lora_adapter", "adapter"]),
    Mistake("diagnose into a model folder", ["diagnose", "previous", "--base", "models/base", "--experts",
                                             "models/expert0", "--out", "previous/diag"], ["previous", "--out"]),
    Mistake("diagnose with a zero subspace", ["diagnose", "previous", "--base", "models/base", "--experts",
                                              "models/expert0", "--out", "diag", "--k", "0"], ["--k", "'0'"]),
    Mistake("zoo unknown family", ["zoo", "build", "tinylm"], ["tinylm", "tiny-lm"]),
    Mistake("zoo unknown size", ["zoo", "build", "tiny-lm", "--size", "huge"], ["huge", "test"]),
    Mistake("zoo show before build", ["zoo", "show", "tiny-lm", "--out", "zoo/none"], ["zoo/none", "zoo build"]),
    Mistake("study unknown protocol", ["study", "scf-rkl"], ["scf-rkl", "scf"]),
    Mistake("demo unknown size", ["demo", "--size", "huge", "--out", "demo"], ["huge"]),
    Mistake("unknown command", ["merg", "good.yml", "out"], ["merg", "merge"]),
]


def build_world(root: Path) -> None:
    """Models, recipes and the user's own files, as a newcomer's working folder might hold them."""
    base, _ = make_family(root / "models", 2)
    recipes = {
        "good.yml": GOOD,
        "list.yml": [GOOD],
        "empty.yml": {"merge_method": "task_arithmetic", "base_model": "models/base", "models": []},
        "both.yml": {**GOOD, "slices": [{"sources": [{"model": "models/base", "layer_range": [0, 2]}]}]},
        "typo_key.yml": {("merge_metod" if k == "merge_method" else k): v for k, v in GOOD.items()},
        "typo_method.yml": {**GOOD, "merge_method": "tie"},
        "typo_param.yml": {**GOOD, "merge_method": "ties", "parameters": {"densty": 0.5}},
        "typo_dtype.yml": {**GOOD, "dtype": "bf17"},
        "missing_model.yml": ta("models/base", ["models/expert0", "models/expert9"]),
        "hub.yml": ta("models/base", ["models/expert0", "Qwen/Qwen2.5-0.5B"]),
        "adapter.yml": ta("models/base", ["models/expert0", "lora_adapter"]),
        "gguf.yml": ta("models/base", ["models/expert0", "model-q4.gguf"]),
        "file.yml": ta("models/base", ["models/expert0", "models/expert1/model.safetensors"]),
        "pickled.yml": ta("models/base", ["models/expert0", "pickled"]),
    }
    for name, recipe in recipes.items():
        write_recipe(root / name, recipe)
    broken = "merge_method: linear\nmodels:\n  - model: models/base\n  model: [models/expert0\n"
    (root / "broken.yml").write_text(broken)  # the second entry lost its dash
    (root / "sub" / "models" / "base").mkdir(parents=True)  # also a 'models/base' beside sub/recipe.yml
    write_recipe(root / "sub" / "recipe.yml", ta("models/base", ["../models/expert0"]))
    adapter = root / "lora_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "x"}')
    (adapter / "adapter_model.safetensors").write_bytes((root / "models/expert0/model.safetensors").read_bytes())
    (root / "model-q4.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    shutil.copytree(root / "models/expert1", root / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("ask about the learning rate\n")
    shutil.copytree(root / "notes", root / "notes2.partial")
    merge(root / "good.yml", root / "previous")
    (root / "previous" / "my_eval.txt").write_text("accuracy 0.71\n")
    (root / "zoo").mkdir()


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content digest (folders: '-')."""
    return {str(p.relative_to(root)): ("-" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("newcomer")
    build_world(root)
    return root


def test_there_are_at_least_twenty_mistakes():
    assert len(MISTAKES) >= 20 and len({m.name for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_mistake_gets_one_short_sentence_and_changes_nothing(world, mistake):
    before = tree(world)
    env = dict(os.environ, MERGELAB_ZOO=str(world / "zoo"), PYTHONDONTWRITEBYTECODE="1", COLUMNS="100")
    proc = subprocess.run([sys.executable, "-m", "mergelab.cli", *mistake.argv], cwd=world / mistake.cwd,
                          capture_output=True, text=True, env=env, timeout=600)
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in err, err
    assert len(err.splitlines()) <= 3, err
    said = err + proc.stdout  # `check` prints its report, problems included, on stdout
    for word in mistake.names:
        assert word in said, f"{word!r} not in: {said}"
    assert tree(world) == before, "the mistake wrote or deleted something"

