"""``--compat mergekit`` on the command line and in a recipe: parameters mergekit ignores are dropped with a
one-line warning instead of refused, and without compat ``merge``/``check`` say where the output will differ."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from tinymodels import load_folder, make_family

from mergelab.api import merge
from mergelab.cli import main
from mergelab.errors import RecipeError


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat_cli")
    base, experts = make_family(root, 2, layers=2, dtype=torch.bfloat16)
    return str(base), [str(e) for e in experts]


def write(tmp_path, recipe):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_ignored_parameters_warn_under_compat_and_are_refused_without(family, tmp_path, caplog):
    base, experts = family
    recipe = {"merge_method": "sce", "base_model": base, "dtype": "bfloat16",
              "parameters": {"normalize": True, "select_topk": 0.5},
              "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts]}
    with pytest.raises(RecipeError, match="no parameter 'normalize'"):
        merge(recipe, tmp_path / "strict")
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        assert main(["merge", write(tmp_path, recipe), str(tmp_path / "out"), "--compat", "mergekit"]) == 0
    ignored = [r.getMessage() for r in caplog.records if "ignores parameter" in r.getMessage()]
    assert len(ignored) == 3 and all("\n" not in m for m in ignored)  # normalize once, weight per model
    assert load_folder(tmp_path / "out")["model.norm.weight"].dtype == torch.bfloat16


def test_compat_in_the_recipe_equals_the_flag(family, tmp_path):
    base, experts = family
    recipe = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
              "models": [{"model": e, "parameters": {"weight": w, "density": 0.5}} for e, w in zip(experts, (0.3, 1))]}
    assert main(["merge", write(tmp_path, recipe), str(tmp_path / "flag"), "--compat", "mergekit"]) == 0
    in_recipe = load_folder(merge({**recipe, "compat": "mergekit"}, tmp_path / "key"))
    default = load_folder(merge(recipe, tmp_path / "default"))
    flag = load_folder(tmp_path / "flag")
    assert all(torch.equal(flag[n], in_recipe[n]) for n in flag)
    assert any(not torch.equal(flag[n], default[n]) for n in flag)  # bf16 arithmetic and the weighted vote


def test_differences_are_printed_without_compat(family, tmp_path, capsys):
    base, experts = family
    recipe = {"merge_method": "karcher", "base_model": base, "dtype": "bfloat16",
              "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.3, 0.7))]}
    path = write(tmp_path, recipe)
    main(["check", path, "--no-similarity"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("differs from mergekit:")]
    assert len(lines) == 3
    assert any("bfloat16" in line for line in lines) and any("base into the mean" in line for line in lines)
    main(["check", path, "--no-similarity", "--compat", "mergekit"])
    assert "differs from mergekit" not in capsys.readouterr().out


def test_keys_mergekit_ignores_are_dropped_under_compat(family, tmp_path, caplog):
    base, experts = family
    recipe = {"merge_method": "linear", "dtype": "bfloat16", "lora_merge_cache": "/tmp/x",
              "models": [{"model": e, "parameters": {"weight": 1.0}, "revision": "main"} for e in experts]}
    path = write(tmp_path, recipe)
    assert main(["merge", path, str(tmp_path / "strict")]) == 2
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        assert main(["merge", path, str(tmp_path / "out"), "--compat", "mergekit"]) == 0
    dropped = [r.getMessage() for r in caplog.records if "mergekit ignores key" in r.getMessage()]
    assert len(dropped) == 3 and any("'lora_merge_cache' at top level" in m for m in dropped)
