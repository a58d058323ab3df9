"""``slices:`` recipes (frankenmerges, passthrough stacking, per-slice parameters) against mergekit 0.1.5."""

import json

import pytest
import torch
from tinymodels import load_folder, make_base, make_expert, run_mergekit, write_recipe

from mergelab.api import merge
from mergelab.cli import main


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    base = make_base(root / "base", layers=6)
    return root, base, make_expert(base, root / "e0", seed=1), make_expert(base, root / "e1", seed=2)


def test_passthrough_stacking_is_exact_and_renumbers_layers(deep, tmp_path):
    root, base, e0, _ = deep
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(e0), "layer_range": [2, 6]}]},
    ]}
    ours_dir = merge(recipe, tmp_path / "ours")
    ours, b, e = load_folder(ours_dir), load_folder(base), load_folder(e0)
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    for out_layer, (src, layer) in enumerate([(b, i) for i in range(4)] + [(e, i) for i in range(2, 6)]):
        name = f"model.layers.{out_layer}.mlp.down_proj.weight"
        assert torch.equal(ours[name], src[f"model.layers.{layer}.mlp.down_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], e["lm_head.weight"])
    theirs = load_folder(run_mergekit(recipe, tmp_path))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ours_dir)
    assert model.config.num_hidden_layers == 8
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False)


def test_passthrough_scale_and_half_precision_outputs(deep, tmp_path):
    root, base, e0, _ = deep
    for out_dtype in ("float16", "bfloat16"):
        recipe = {"merge_method": "passthrough", "dtype": "float32", "out_dtype": out_dtype, "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3], "parameters": {"scale": [0.5, 1.0]}}]},
            {"sources": [{"model": str(e0), "layer_range": [3, 6]}]},
        ]}
        ours = load_folder(merge(recipe, tmp_path / f"ours-{out_dtype}"))
        theirs = load_folder(run_mergekit(recipe, tmp_path, f"mk-{out_dtype}"))
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype
            torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=0, atol=1e-3, msg=k)


def test_merged_slices_with_gradients_filters_and_precedence(deep, tmp_path):
    root, base, e0, e1 = deep
    recipe = {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"density": 0.5, "int8_mask": True, "lambda": 0.9},
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]},
                         {"model": str(e0), "layer_range": [0, 3], "parameters": {"weight": [0.2, 0.8]}},
                         {"model": str(e1), "layer_range": [0, 3], "parameters": {"weight": 0.5}}],
             "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
            {"sources": [{"model": str(base), "layer_range": [3, 6]},
                         {"model": str(e0), "layer_range": [3, 6], "parameters": {"weight": 0.5}},
                         {"model": str(e1), "layer_range": [3, 6], "parameters": {"weight": 0.5}}]},
        ],
    }
    # mergekit elects signs on weighted task vectors; ask for the same so the comparison is exact
    recipe_ours = json.loads(json.dumps(recipe))
    recipe_ours["parameters"]["vote"] = "weighted"
    ours = load_folder(merge(recipe_ours, tmp_path / "ours"))
    theirs = load_folder(run_mergekit(recipe, tmp_path))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=2e-6, msg=k)


def test_int8_mask_does_not_change_results(deep, tmp_path):
    root, base, e0, e1 = deep
    models = [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.4}} for e in (e0, e1)]
    a = load_folder(merge({"merge_method": "ties", "base_model": str(base), "models": models}, tmp_path / "a"))
    b = load_folder(merge({"merge_method": "ties", "base_model": str(base), "models": models,
                           "parameters": {"int8_mask": True}}, tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_without_base_matches_mergekit(deep, tmp_path):
    root, base, e0, e1 = deep
    recipe = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(e0), "parameters": {"weight": 0.3}},
                         {"model": str(e1), "parameters": {"weight": 0.7}}]}
    ours = load_folder(merge(recipe, tmp_path / "ours"))
    theirs = load_folder(run_mergekit(recipe, tmp_path))
    for k in ours:  # float32 sums in a different order may round to the neighbouring bfloat16 value
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=2**-7, atol=1e-6, msg=k)


@pytest.mark.parametrize("bad, message", [
    ({"slices": [{"sources": [{"model": "BASE", "layer_range": [4, 2]}]}]}, "empty or outside"),
    ({"slices": [{"sources": [{"model": "BASE", "layer_range": [0, 9]}]}]}, "empty or outside"),
    ({"slices": [{"sources": [{"model": "BASE", "layer_range": [0, 2]}, {"model": "E0", "layer_range": [0, 3]}]}],
      "merge_method": "linear"}, "same length"),
    ({"slices": [{"sources": [{"model": "BASE", "layer_range": [0, 2]}]}],
      "models": [{"model": "BASE"}]}, "gives both 'models' and 'slices'"),
    ({"slices": [{"sources": [{"model": "BASE", "layer_range": [0, 2]}, {"model": "E0", "layer_range": [0, 2]}]}]},
     "cannot merge 2"),
])
def test_bad_slices(deep, tmp_path, capsys, bad, message):
    root, base, e0, _ = deep
    recipe = {"merge_method": "passthrough", **bad}
    text = json.dumps(recipe).replace("BASE", str(base)).replace("E0", str(e0))
    path = write_recipe(tmp_path / "bad.yml", json.loads(text))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
