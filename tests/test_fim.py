"""FIM-Merging (Algorithm 1): the α mapping against a numpy re-implementation of eq. 8-11, and end-to-end
fim_ta / fim_ties merges whose applied per-layer α and FIM-weighted trimming are recovered from the output
tensors and checked against a Fisher computed independently (torch.func, in test_fisher)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fisher import reference_fisher
from tinymodels import load_folder, make_base, make_expert

from mergelab.api import merge
from mergelab.errors import CheckpointError, RecipeError
from mergelab.methods.fim import layer_alphas, plot_alphas

SAMPLES, LENGTH, SEED = 3, 8, 11
SETTINGS = {"fisher_samples": SAMPLES, "fisher_length": LENGTH, "fisher_seed": SEED}


def numpy_alphas(importance) -> np.ndarray:
    """Algorithm 1, step 3, written out: log, minus median, sharpness 1/range, α = 1 − σ(θ(ŝ − max ŝ))."""
    s = np.log(np.asarray(importance, dtype=np.float64))
    centred = s - np.median(s)
    sharpness = 1.0 / np.ptp(centred)
    return 1.0 - 1.0 / (1.0 + np.exp(-sharpness * (centred - centred.max())))


@pytest.fixture(autouse=True)
def fisher_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fim")
    base = make_base(root / "base", layers=3, hidden=32, vocab=96)
    return base, make_expert(base, root / "expert", seed=3)


def recipe(method, base, expert, **parameters):
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(expert)}],
            "parameters": {**SETTINGS, **parameters}}


def layer_names(tensors, layer):
    prefix = f"model.layers.{layer}."
    return [n for n in tensors if n.startswith(prefix) and "norm" not in n]


@pytest.mark.parametrize("importance", [
    [3.0, 0.5, 7.0, 1e-3, 42.0],
    [2.0, 2.0, 5.0, 1.0],  # a tie, even count (median between two values)
    [1e-30, 1e30, 1.0],
])
def test_alphas_follow_algorithm_1(importance):
    np.testing.assert_allclose(layer_alphas(importance), numpy_alphas(importance), rtol=1e-12)
    alphas = layer_alphas(importance)
    assert alphas[int(np.argmax(importance))] == pytest.approx(0.5)
    assert alphas[int(np.argmin(importance))] == pytest.approx(1 - 1 / (1 + np.exp(1)))


def test_alphas_without_spread_are_one_half():
    assert layer_alphas([4.2]) == [0.5]
    assert layer_alphas([3.0, 3.0, 3.0]) == [0.5, 0.5, 0.5]
    # an untouched layer (zero importance) counts as the least important
    np.testing.assert_allclose(layer_alphas([0.0, 1.0, 10.0]), numpy_alphas([1.0, 1.0, 10.0]), rtol=1e-12)


def expected_layer_alphas(base, expert, score):
    fisher = reference_fisher(base, SAMPLES, LENGTH, SEED)
    b, e = load_folder(base), load_folder(expert)
    importance = []
    for layer in range(3):
        names = layer_names(b, layer)
        f_layer = torch.cat([fisher[n].reshape(-1) for n in names]).mean().item()
        d_layer = torch.cat([(e[n].double() - b[n].double()).reshape(-1) for n in names]).square().mean().item()
        importance.append({"fim_norm": f_layer * d_layer, "fim": f_layer, "norm": d_layer}[score])
    return numpy_alphas(importance), fisher


@pytest.mark.parametrize("score", ["fim_norm", "fim", "norm"])
def test_fim_ta_applies_the_per_layer_alpha(pair, tmp_path, score):
    base, expert = pair
    out = merge(recipe("fim_ta", base, expert, score=score, **{"lambda": 0.8}), tmp_path / "out")
    alphas, _ = expected_layer_alphas(base, expert, score)
    assert len(set(np.round(alphas, 6))) == 3
    merged, b, e = load_folder(out), load_folder(base), load_folder(expert)

    def applied(name):
        delta = (e[name].double() - b[name].double()).reshape(-1)
        return float((merged[name].double() - b[name].double()).reshape(-1) @ delta / (delta @ delta))

    for layer in range(3):
        for name in layer_names(b, layer) + [f"model.layers.{layer}.input_layernorm.weight"]:
            assert applied(name) == pytest.approx(0.8 * alphas[layer], rel=1e-5), name
    assert applied("model.embed_tokens.weight") == pytest.approx(0.8 * alphas.mean(), rel=1e-5)
    record = json.loads((out / "mergelab.json").read_text())
    np.testing.assert_allclose(record["prepare"]["experts"][0]["alpha"], alphas, rtol=1e-4)
    assert record["prepare"]["score"] == score and record["finish"]["rescaled"] == {}
    assert plot_alphas(record, tmp_path / "alpha.png").stat().st_size > 0


def test_fim_ties_keeps_the_top_fisher_weighted_entries(pair, tmp_path):
    base, expert = pair
    out = merge(recipe("fim_ties", base, expert, density=0.3, calibrate=False), tmp_path / "out")
    alphas, fisher = expected_layer_alphas(base, expert, "fim_norm")
    merged, b, e = load_folder(out), load_folder(base), load_folder(expert)
    for layer in range(3):
        for name in layer_names(b, layer):
            delta = (e[name].double() - b[name].double()).numpy().reshape(-1)
            importance = fisher[name].numpy().reshape(-1) * np.abs(delta)
            keep = np.zeros(delta.size, dtype=bool)
            keep[np.argsort(-importance, kind="stable")[: int(0.3 * delta.size)]] = True
            alpha = alphas[layer] * (0.7 if "gate_proj" in name else 1.0)
            expected = b[name].double().numpy().reshape(-1) + alpha * delta * keep
            np.testing.assert_allclose(merged[name].double().numpy().reshape(-1), expected, rtol=1e-5, atol=1e-6)
    record = json.loads((out / "mergelab.json").read_text())
    assert record["tensors"]["model.layers.1.mlp.up_proj.weight"]["fim_kept"] == pytest.approx(0.3, abs=1e-3)


def update_norm_ratios(base, folder):
    """Independent measure: ‖h_{l+1} − h_l‖ over the probe tokens (hidden_states of transformers), merged/base,
    for layers 0 and 1 (layer 2's output is the final-normed one); with layer 0 unchanged, layer 1 sees the
    base's input, so this is the layer's own deviation as calibration measures it."""
    from transformers import AutoModelForCausalLM

    from mergelab.fisher import FisherSettings, random_tokens

    probes = random_tokens(FisherSettings(SAMPLES, LENGTH, SEED + 1), 96)

    def norms(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        totals = np.zeros(2)
        with torch.no_grad():
            for row in probes:
                hidden = model(input_ids=row[None], output_hidden_states=True).hidden_states
                totals += [float((hidden[i + 1] - hidden[i]).square().sum()) for i in range(2)]
        return np.sqrt(totals)

    return norms(folder) / norms(base)


def test_calibration_rescales_a_layer_that_is_off_and_leaves_the_others(pair, tmp_path):
    base, _ = pair
    expert = shutil.copytree(base, tmp_path / "loud")
    tensors = load_file(expert / "model.safetensors")
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        tensors[name] = tensors[name] * 4.0  # layer 1 writes a much louder residual update; others untouched
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    plain = merge(recipe("fim_ta", base, expert), tmp_path / "plain")
    out = merge(recipe("fim_ta", base, expert, calibrate=True), tmp_path / "calibrated")
    before = update_norm_ratios(base, plain)
    record = json.loads((out / "mergelab.json").read_text())["finish"]
    np.testing.assert_allclose(record["norm_ratio"][:2], before, rtol=1e-4)
    # layer 2 sees a louder input in the plain forward pass, but is measured on the base's hidden states
    assert record["calibrated_layers"] == [1] and before[0] == pytest.approx(1.0)
    assert record["norm_ratio"][2] == pytest.approx(1.0) and before[1] > 1.05
    factor = 1.0 / record["norm_ratio"][1]
    merged, uncalibrated = load_folder(out), load_folder(plain)
    for name in uncalibrated:
        scale = factor if name.startswith("model.layers.1.") and ("o_proj" in name or "down_proj" in name) else 1.0
        torch.testing.assert_close(merged[name], uncalibrated[name] * scale)
    after = update_norm_ratios(base, out)
    assert abs(after[1] - 1.0) < 0.5 * abs(before[1] - 1.0)


def test_bad_inputs_are_refused(pair, tmp_path):
    base, expert = pair
    with pytest.raises(RecipeError, match="fisher_samples"):
        merge(recipe("fim_ta", base, expert, fisher_samples=0), tmp_path / "a")
    with pytest.raises(RecipeError, match="fisher_length"):
        merge(recipe("fim_ta", base, expert, fisher_length=500), tmp_path / "b")
    alien_base, alien_expert = (shutil.copytree(p, tmp_path / p.name) for p in (base, expert))
    for folder in (alien_base, alien_expert):
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "not_a_real_architecture"
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="task_arithmetic"):
        merge(recipe("fim_ties", alien_base, alien_expert), tmp_path / "c")
    assert not (tmp_path / "c").exists()
