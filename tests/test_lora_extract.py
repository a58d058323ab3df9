"""extract-lora: the adapter loads in peft and reproduces the fine-tune at full rank; at lower ranks its error is
the Eckart–Young error of an independent numpy SVD; a rank above a matrix's is refused with nothing written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tinymodels import load_folder, make_base, make_expert

from mergelab.cli import main
from mergelab.errors import RecipeError
from mergelab.lora.extract import RankRule, extract_lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = make_base(root / "base")
    return base, make_expert(base, root / "tuned", seed=7)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_adapter_reproduces_the_finetune_in_peft(pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tuned = pair
    out = tmp_path / "adapter"
    # k/v projections are 16 x 32 (grouped-query attention): full rank 16; the rest 32
    assert main(["extract-lora", str(tuned), str(out), "--base", str(base), "--rank", "32",
                 "--rank-for", "k_proj=16", "--rank-for", "v_proj=16"]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    reference = AutoModelForCausalLM.from_pretrained(tuned).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=2e-5, rtol=1e-5)
    generated = model.generate(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=5,
                               do_sample=False)
    assert torch.equal(generated, reference.generate(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long),
                                                     max_new_tokens=5, do_sample=False))
    record = json.loads((out / "lora_extraction.json").read_text())
    assert max(e["relative_error"] for e in record["modules"].values()) < 1e-5


def test_truncated_error_is_eckart_young_of_a_numpy_svd(pair, tmp_path):
    base, tuned = pair
    record = extract_lora(tuned, base, tmp_path / "r4", RankRule(rank=4), progress=False)
    before, after = load_folder(base), load_folder(tuned)
    from safetensors.torch import load_file

    factors = load_file(tmp_path / "r4" / "adapter_model.safetensors")
    assert len(record["modules"]) == 14
    residual, energy = {2: 0.0, 4: 0.0, 16: 0.0}, 0.0
    for module, entry in record["modules"].items():
        delta = (after[module + ".weight"].double() - before[module + ".weight"].double()).numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        expected = math.sqrt((sigma[4:] ** 2).sum() / (sigma ** 2).sum())
        energy += (sigma ** 2).sum()
        for k in residual:
            residual[k] += (sigma[k:] ** 2).sum()
        assert entry["rank"] == 4
        assert entry["relative_error"] == pytest.approx(expected, rel=1e-4)
        assert entry["error_at_rank"][8] == pytest.approx(math.sqrt((sigma[8:] ** 2).sum() / (sigma ** 2).sum()),
                                                          rel=1e-4)
        a = factors[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        b = factors[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        assert a.shape == (4, delta.shape[1]) and b.shape == (delta.shape[0], 4)
        assert np.linalg.norm(delta - b @ a) / np.linalg.norm(delta) == pytest.approx(expected, rel=1e-4)
    for k, value in residual.items():  # the whole model's curve: residual energy over all matrices
        assert record["error_at_rank"][k] == pytest.approx(math.sqrt(value / energy), rel=1e-4)


def test_energy_threshold_keeps_the_fewest_triplets_reaching_it(pair, tmp_path):
    base, tuned = pair
    record = extract_lora(tuned, base, tmp_path / "e", RankRule(energy=0.5), progress=False)
    before, after = load_folder(base), load_folder(tuned)
    for module, entry in record["modules"].items():
        delta = (after[module + ".weight"].double() - before[module + ".weight"].double()).numpy()
        energy = np.cumsum(np.linalg.svd(delta, compute_uv=False) ** 2)
        assert entry["rank"] == int(np.argmax(energy >= 0.5 * energy[-1])) + 1
        assert entry["energy_kept"] >= 0.5


def test_rank_above_a_matrix_is_refused_and_nothing_written(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "too_big"
    assert main(["extract-lora", str(tuned), str(out), "--base", str(base), "--rank", "17"]) == 2
    err = capsys.readouterr().err
    assert "rank 17 exceeds the largest rank 16 of tensor 'model.layers.0.self_attn.k_proj.weight'" in err
    assert not out.exists() and not (tmp_path / "too_big.partial").exists()
    with pytest.raises(RecipeError, match="--rank R or --energy"):
        RankRule()
    assert main(["extract-lora", str(base), str(out), "--base", str(base), "--rank", "4"]) == 2
    assert "there is no task vector to extract" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "too_big.partial").exists()


def test_a_partial_folder_from_an_interrupted_run_is_refused_or_replaced(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "adapter"
    (tmp_path / "adapter.partial").mkdir()
    (tmp_path / "adapter.partial" / "adapter_model.safetensors.tmp").write_bytes(b"half")
    args = ["extract-lora", str(tuned), str(out), "--base", str(base), "--rank", "2"]
    assert main(args) == 2
    assert "adapter.partial was left by an interrupted run; delete it or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "lora_extraction.json"]
    assert not (tmp_path / "adapter.partial").exists()
