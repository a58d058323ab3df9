"""The random-token diagonal Fisher (FIM-Merging eq. 7, Algorithm 1 step 1) against per-sample gradients
computed independently with torch.func, unit by unit from the checkpoint and with the whole model, its bound on
memory (one unit's weights at a time), its cache, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import make_base

from mergelab.checkpoint.reader import open_model
from mergelab.errors import CheckpointError, RecipeError
from mergelab.fisher import FisherSettings, compute_fisher, diagonal_fisher, random_tokens
from mergelab.fisher_units import unit_fisher
from mergelab.streamed_lm import StreamedLM, StreamingUnsupported


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


def make_gemma2(path):
    """A tiny Gemma 2: its model scales the embedding and soft-caps the logits outside the units, so its units do
    not form a chain and the Fisher must run it whole."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(3)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=30.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


MODELS = {
    "llama": lambda path: make_base(path, layers=2, hidden=32, vocab=96),
    "llama-tied": lambda path: make_base(path, layers=3, hidden=32, vocab=96, tie=True, seed=2),
    "qwen2-bf16": lambda path: make_base(path, arch="qwen2", layers=2, hidden=32, vocab=96, dtype=torch.bfloat16),
    "gemma2": make_gemma2,
}


@pytest.mark.parametrize("streamed", [True, False], ids=["unit-by-unit", "whole"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_fisher_equals_mean_squared_per_sequence_gradients(model, streamed, tmp_path):
    folder = MODELS[model](tmp_path / model)
    compute_fisher(open_model(folder), FisherSettings(samples=3, length=8, seed=7), tmp_path / "f.safetensors",
                   streamed=streamed)
    computed = load_file(tmp_path / "f.safetensors")
    expected = reference_fisher(folder, 3, 8, 7)
    assert set(computed) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(computed[name].double(), value, rtol=2e-4, atol=1e-10)


@pytest.mark.parametrize("model", ["llama", "llama-tied", "qwen2-bf16"])
def test_unit_by_unit_holds_one_unit_and_agrees_with_the_whole_model(model, tmp_path):
    """The bound itself: while the Fisher runs, at most one unit's parameters are off the meta device; and its
    result is the whole model's up to float32 summation order (the tied weight's two parts)."""
    folder = MODELS[model](tmp_path / model)
    reader = open_model(folder)
    lm = StreamedLM(reader, "cpu")
    live = []
    materialize = lm.materialize

    def counted(unit, requires_grad=False):
        loaded = materialize(unit, requires_grad)
        live.append(sum(any(p.device.type != "meta" for p in u.parameters()) for u in lm.units))
        return loaded

    lm.materialize = counted
    computed: dict[str, torch.Tensor] = {}
    tokens = random_tokens(FisherSettings(samples=4, length=10, seed=1), 96)
    unit_fisher(lm, tokens, lambda name, value: computed.__setitem__(name, computed.get(name, 0) + value))
    assert live and max(live) == 1
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    compute_fisher(reader, FisherSettings(samples=4, length=10, seed=1), tmp_path / "w.safetensors", streamed=False)
    whole = load_file(tmp_path / "w.safetensors")
    assert set(computed) == set(whole)
    for name, value in whole.items():
        torch.testing.assert_close(computed[name], value, rtol=1e-6, atol=0)


def test_a_model_whose_units_are_no_chain_is_refused_by_the_unit_pass(tmp_path):
    lm = StreamedLM(open_model(make_gemma2(tmp_path / "gemma2")), "cpu")
    with pytest.raises(StreamingUnsupported):
        unit_fisher(lm, random_tokens(FisherSettings(samples=1, length=6), 96), lambda name, value: None)


@pytest.mark.parametrize("model", ["llama-tied", "qwen2-bf16"])
def test_streamed_forward_gives_the_loaded_models_logits(model, tmp_path, monkeypatch):
    """Bit for bit, with bf16 tensors converted a few rows at a time."""
    from transformers import AutoModelForCausalLM

    import mergelab.streamed_lm

    monkeypatch.setattr(mergelab.streamed_lm, "READ_BYTES", 100)
    folder = MODELS[model](tmp_path / "m")
    lm = StreamedLM(open_model(folder), "cpu")
    tokens = random_tokens(FisherSettings(samples=2, length=12), 96)
    with torch.no_grad(), lm.streaming():
        streamed = lm.model(input_ids=tokens, use_cache=False).logits
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(streamed, whole(input_ids=tokens, use_cache=False).logits)
    assert all(p.device.type == "meta" for p in lm.model.parameters())


def test_an_interrupted_fisher_leaves_no_file(base, cache, monkeypatch):
    import mergelab.fisher_units as units

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(units, "backward_chunk", fail)
    with pytest.raises(KeyboardInterrupt):
        diagonal_fisher(open_model(base), FisherSettings(samples=2, length=6, seed=11))
    assert not cache.exists() or not any(cache.iterdir())


def test_layer_scores_are_means_over_the_named_tensors(base, cache):
    fisher = diagonal_fisher(open_model(base), FisherSettings(samples=2, length=6, seed=1))
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    together = torch.cat([fisher.stored(n).load().double().reshape(-1) for n in names])
    assert fisher.layer_scores({1: names})[1] == pytest.approx(float(together.mean()), rel=1e-12)


def test_cache_is_keyed_by_model_and_settings(base, cache, tmp_path):
    reader = open_model(base)
    settings = FisherSettings(samples=2, length=6, seed=3)
    first = diagonal_fisher(reader, settings)
    again = diagonal_fisher(reader, settings)
    assert not first.cached and again.cached and again.path == first.path and first.path.parent == cache
    for name in first.names():
        assert torch.equal(again.stored(name).load(), first.stored(name).load())
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


def test_sequences_kept_in_several_chunks_give_the_same_fisher(tmp_path, monkeypatch):
    """With room for one sequence's unit inputs at a time, every sequence is its own chunk and the file sums the
    chunks' parts: the result is still the whole model's."""
    import mergelab.fisher_units as units

    reader = open_model(MODELS["llama-tied"](tmp_path / "m"))
    settings = FisherSettings(samples=3, length=8, seed=5)
    compute_fisher(reader, settings, tmp_path / "whole.safetensors", streamed=False)
    chunks = []
    backward = units.backward_chunk
    monkeypatch.setattr(units, "CAPTURE_BYTES", 1)
    monkeypatch.setattr(units, "backward_chunk", lambda lm, chunk, *rest: chunks.append(len(chunk)) or
                        backward(lm, chunk, *rest))
    compute_fisher(reader, settings, tmp_path / "chunked.safetensors")
    assert chunks == [1, 1, 1]
    whole, chunked = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "chunked.safetensors")
    assert set(whole) == set(chunked)
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-6, atol=0)
