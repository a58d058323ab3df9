"""PEFT LoRA adapters as merge inputs: the adapted tensors equal peft's own merge_and_unload() (plain LoRA,
rsLoRA, DoRA, embedding LoRA, modules_to_save), whole and in row blocks; a recipe merge over adapters equals the
same merge over peft-materialised copies; wrong bases and NaN adapters are refused with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import load_folder, make_base, write_recipe

from mergelab.cli import main
from mergelab.config import parse_recipe
from mergelab.engine import MergeOptions, open_inputs, run_merge
from mergelab.errors import CompatibilityError
from mergelab.lora.adapted import AdaptedReader, open_input

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=LINEAR + ["embed_tokens"], modules_to_save=["lm_head"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=LINEAR,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=LINEAR),
}


def make_adapter(base, path, seed: int, **lora_kwargs):
    """A peft adapter on ``base`` with every adapter parameter randomised (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    return path


def peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    """peft's own answer: the adapter merged into the base by merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = make_base(root / "base")
    adapters = {name: make_adapter(base, root / name, seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}
    return root, base, adapters


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapted_tensors_equal_peft_merge_and_unload(models, variant):
    root, base, adapters = models
    expected = peft_merged(base, adapters[variant])
    reader = open_input(str(adapters[variant]), None)
    assert isinstance(reader, AdaptedReader) and reader.folder == base
    changed = 0
    for name in reader.names:
        got = reader.get(name)
        torch.testing.assert_close(got, expected[name], rtol=1e-6, atol=1e-6)
        rows = (3, min(11, got.shape[0]))
        torch.testing.assert_close(reader.get(name, rows), expected[name][rows[0]: rows[1]], rtol=1e-6, atol=1e-6)
        changed += not torch.equal(got, load_folder(base)[name])
    assert changed >= 14  # every adapted matrix moved
    reader.close()


def test_merge_over_adapters_equals_merge_over_materialised_copies(models, tmp_path):
    from transformers import AutoModelForCausalLM

    root, base, adapters = models
    copies = {}
    for name in ("lora", "dora"):
        model = AutoModelForCausalLM.from_pretrained(base)
        model.load_state_dict(peft_merged(base, adapters[name]))
        model.save_pretrained(tmp_path / f"full_{name}")
        copies[name] = tmp_path / f"full_{name}"

    def recipe(first, second):
        return {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                "parameters": {"weight": 0.7},
                "models": [{"model": str(first)}, {"model": str(second)}]}

    # small row blocks: the engine reads the adapted tensors block by block, as it does large tensors
    run_merge(parse_recipe(recipe(adapters["lora"], f"{base}+{adapters['dora']}")), tmp_path / "via_adapters",
              MergeOptions(progress=False, chunk_elements=200))
    run_merge(parse_recipe(recipe(copies["lora"], copies["dora"])), tmp_path / "via_copies",
              MergeOptions(progress=False))
    via_adapters, via_copies = load_folder(tmp_path / "via_adapters"), load_folder(tmp_path / "via_copies")
    assert via_adapters.keys() == via_copies.keys()
    for name in via_copies:
        torch.testing.assert_close(via_adapters[name], via_copies[name], rtol=1e-6, atol=1e-6)
    # diagnose compares the adapter merge with its full-weight equivalent, given as the "expert"
    assert main(["diagnose", str(tmp_path / "via_adapters"), "--base", str(base), "--experts",
                 str(tmp_path / "via_copies"), "--out", str(tmp_path / "diag"), "--no-activations"]) == 0
    weights = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["weights"]
    assert weights["cosine"]["global"][0][1] == pytest.approx(1.0, abs=1e-9)
    norms = weights["task_vector_norm"]
    assert norms[weights["cosine"]["labels"][0]]["total"] == pytest.approx(
        norms[weights["cosine"]["labels"][1]]["total"], rel=1e-6)


def test_adapter_for_another_base_is_refused(models, tmp_path, capsys):
    root, base, adapters = models
    other = make_base(tmp_path / "other", seed=5)  # same shapes, other weights
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(other),
                                               "models": [{"model": str(adapters["lora"]),
                                                           "parameters": {"weight": 1.0}}]})
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert f"was trained on {base}, not on the recipe's base_model" in capsys.readouterr().err
    wide = make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(CompatibilityError, match="trained for another base model"):
        open_input(f"{wide}+{adapters['dora']}", None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_nan_in_an_adapter_stops_the_merge(models, tmp_path, capsys):
    root, base, adapters = models
    broken = tmp_path / "broken"
    shutil.copytree(adapters["rslora"], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "dtype": "float32",
                                               "models": [{"model": str(broken), "parameters": {"weight": 1.0}}]})
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "'model.layers.1.mlp.up_proj.weight' contains NaN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_recipe_readers_open_every_form(models, tmp_path):
    root, base, adapters = models
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "lora"}, {"model": "base+dora"}]})
    readers = open_inputs(recipe, root, False)
    assert {type(r).__name__ for r in readers.values()} == {"AdaptedReader"}
    assert readers["base+dora"].adapter_folder == root / "dora"


def test_check_describes_adapter_inputs(models, tmp_path, capsys):
    root, base, adapters = models
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                               "models": [{"model": str(adapters["rslora"]),
                                                           "parameters": {"weight": 1.0}},
                                                          {"model": f"{base}+{adapters['dora']}",
                                                           "parameters": {"weight": 1.0}}]})
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    # rsLoRA: alpha / sqrt(r) with r=8, alpha 4 (and alpha 3 on q_proj; r=2 on down_proj)
    assert "peft LoRA adapter applied on read" in out and "rank 2/8" in out
    assert f"{4 / 8 ** 0.5:g}" in out and f"{3 / 8 ** 0.5:g}" in out and f"{4 / 2 ** 0.5:g}" in out
    assert "DoRA on 14" in out and "named as BASE+ADAPTER" in out


def test_bfloat16_base_rounds_once(tmp_path):
    """On a bfloat16 base, peft rounds the delta to bfloat16 and then the sum (two roundings); mergelab adds in
    float32 and rounds once. Both agree to one bfloat16 step, and mergelab's is the float32 sum correctly rounded."""
    base = make_base(tmp_path / "base16", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "lora16", seed=3, r=4, lora_alpha=8, target_modules=LINEAR)
    expected = peft_merged(base, adapter)
    reader = open_input(str(adapter), None)
    factors = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    got = reader.get(name)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected[name].float(), rtol=2 ** -7, atol=0.0)
    a = factors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].float()
    b = factors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].float()
    exact = load_folder(base)[name].float() + 2.0 * b @ a
    assert torch.equal(got, exact.to(torch.bfloat16))
    reader.close()
