"""The random-token diagonal Fisher (FIM-Merging eq. 7, Algorithm 1 step 1) against per-sample gradients
computed independently with torch.func, its cache, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from tinymodels import make_base

from mergelab.checkpoint.reader import open_model
from mergelab.errors import CheckpointError, RecipeError
from mergelab.fisher import FisherSettings, diagonal_fisher


def reference_fisher(folder, samples: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """(1/N) Σ_i (∇ −log p(x_i))² with per-sample gradients from torch.func.vmap(grad), float64."""
    from torch.func import functional_call, grad, vmap
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    vocab = model.config.vocab_size
    tokens = torch.randint(vocab, (samples, length), generator=torch.Generator().manual_seed(seed))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def nll(p, sequence):
        logits = functional_call(model, p, (sequence[None],)).logits[0]
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        return -log_probs.gather(1, sequence[1:, None]).sum()

    per_sample = vmap(grad(nll), in_dims=(None, 0))(params, tokens)
    return {name: g.square().mean(dim=0) for name, g in per_sample.items()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fisher"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("fisher") / "base", layers=2, hidden=32, vocab=96)


def test_fisher_equals_mean_squared_per_sequence_gradients(base, cache):
    settings = FisherSettings(samples=3, length=8, seed=7)
    fisher = diagonal_fisher(open_model(base), settings)
    expected = reference_fisher(base, 3, 8, 7)
    assert set(fisher.elements) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(fisher.elements[name].double(), value, rtol=2e-4, atol=1e-10)


def test_layer_scores_are_means_over_the_named_tensors(base, cache):
    fisher = diagonal_fisher(open_model(base), FisherSettings(samples=2, length=6, seed=1))
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    together = torch.cat([fisher.elements[n].double().reshape(-1) for n in names])
    assert fisher.layer_scores({1: names})[1] == pytest.approx(float(together.mean()), rel=1e-12)


def test_cache_is_keyed_by_model_and_settings(base, cache, tmp_path):
    reader = open_model(base)
    settings = FisherSettings(samples=2, length=6, seed=3)
    first = diagonal_fisher(reader, settings)
    again = diagonal_fisher(reader, settings)
    assert not first.cached and again.cached and again.path == first.path and first.path.parent == cache
    for name in first.elements:
        torch.testing.assert_close(again.elements[name], first.elements[name], rtol=0, atol=0)
    other_seed = diagonal_fisher(reader, FisherSettings(samples=2, length=6, seed=4))
    assert not other_seed.cached and other_seed.path != first.path
    other_model = make_base(tmp_path / "other", layers=2, hidden=32, vocab=96, seed=5)
    assert not diagonal_fisher(open_model(other_model), settings).cached


@pytest.mark.parametrize("settings, message", [
    (FisherSettings(samples=0), "fisher_samples"),
    (FisherSettings(samples=5000), "fisher_samples"),
    (FisherSettings(length=1), "fisher_length"),
    (FisherSettings(length=65), "fisher_length"),  # the tiny models allow 64 positions
])
def test_out_of_range_settings_are_refused(base, cache, settings, message):
    with pytest.raises(RecipeError, match=message):
        diagonal_fisher(open_model(base), settings)


def test_config_without_vocab_size_is_refused(base, cache, tmp_path):
    import shutil

    folder = shutil.copytree(base, tmp_path / "novocab")
    config = json.loads((folder / "config.json").read_text())
    del config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vocab_size"):
        diagonal_fisher(open_model(folder), FisherSettings(samples=1, length=4))


def test_model_transformers_cannot_load_is_refused(base, cache, tmp_path):
    import shutil

    folder = shutil.copytree(base, tmp_path / "alien")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "not_a_real_architecture"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot load.*task_arithmetic"):
        diagonal_fisher(open_model(folder), FisherSettings(samples=1, length=4))
