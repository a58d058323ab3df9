"""Function-space diagnostics: closed forms for the rank statistics, and the model-level figures recomputed
here from transformers' own ``output_hidden_states`` and plain state-dict edits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinymodels import make_base, make_expert

from mergelab.checkpoint.layout import layer_index
from mergelab.diagnostics.activations import (
    activation_diagnostics,
    activation_statistics,
    effective_rank,
    random_probes,
)
from mergelab.errors import CompatibilityError


def test_effective_rank_of_known_eigenvalues():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])) == pytest.approx(4.0)
    p = np.array([0.75, 0.25])
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_statistics_of_activations_with_a_known_covariance():
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 6
    eigenvalues = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z -= z.mean(0)
    q_z, _ = torch.linalg.qr(z)  # orthonormal, centred columns: sample covariance of sqrt(n-1) q_z is I
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    x = math.sqrt(n - 1) * q_z @ torch.diag(eigenvalues.sqrt()) @ rotation.T + 3.0  # covariance R diag(l) R^T
    stats = activation_statistics(x, rtol=1e-9)
    p = (eigenvalues / eigenvalues.sum()).numpy()
    p = p[p > 0]
    assert stats["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stats["numerical_rank"] == 4
    assert stats["variance"] == pytest.approx(float(eigenvalues.sum()) / d)  # trace / d


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("diaga")
    base = make_base(root / "base", layers=3)
    experts = [make_expert(base, root / f"e{i}", seed=20 + i, scale=0.05) for i in range(2)]
    return root, base, experts


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_activation_diagnostics_against_transformers(family):
    _, base, experts = family
    merged = experts[0]  # a 'merge' equal to expert 0: KL to it is zero
    result = activation_diagnostics(
        merged, base, experts, n_probes=4, probe_length=16, seed=1, nl_layers=[0, 2], progress=False
    )
    ids = random_probes(96, 4, 16, seed=1)
    logits = {}
    with torch.no_grad():
        for label, folder in (("merged", merged), ("base", base), ("e0", experts[0]), ("e1", experts[1])):
            out = load(folder)(ids, output_hidden_states=True)
            logits[label] = out.logits.double().reshape(-1, 96)
            for layer in range(2):  # hidden_states[l + 1] is layer l's output (the last one is after the norm)
                h = out.hidden_states[layer + 1].double().reshape(-1, 32).numpy()
                eig = np.clip(np.linalg.eigvalsh(np.cov(h, rowvar=False)), 0, None)
                p = eig / eig.sum()
                p = p[p > 0]
                got = result["models"][label]["per_layer"]
                assert got["variance"][layer] == pytest.approx(h.var(axis=0, ddof=1).mean(), rel=1e-5)
                assert got["effective_rank"][layer] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    for label in ("base", "e0", "e1"):
        lp, lm = torch.log_softmax(logits[label], -1), torch.log_softmax(logits["merged"], -1)
        kl = float((lp.exp() * (lp - lm)).sum(-1).mean())
        assert result["models"][label]["kl_parent_to_merged"] == pytest.approx(kl, rel=1e-4, abs=1e-9)
        entropy = float(-(lp.exp() * lp).sum(-1).mean())
        assert result["models"][label]["next_token_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert result["models"]["e0"]["kl_parent_to_merged"] == pytest.approx(0.0, abs=1e-9)
    assert result["models"]["base"]["kl_parent_to_merged"] > 0


def test_nl_score_against_a_direct_computation(family):
    _, base, experts = family
    result = activation_diagnostics(
        experts[1], base, experts[:1], n_probes=3, probe_length=8, seed=2, nl_layers=[1], progress=False
    )
    ids = random_probes(96, 3, 8, seed=2)
    base_state = load(base).state_dict()
    expert_state = load(experts[0]).state_dict()

    def output(scale: float) -> torch.Tensor:
        model = load(base)
        state = {n: t + scale * (expert_state[n] - t) if layer_index(n) == 1 else t for n, t in base_state.items()}
        model.load_state_dict(state)
        with torch.no_grad():
            return model(ids).logits.double().flatten(1)

    f0, f1, fa = output(0.0), output(1.0), output(0.5)
    expected = ((fa - (f0 + 0.5 * (f1 - f0))).norm(dim=1) / (f1 - f0).norm(dim=1)).mean()
    assert result["nl_score"]["e0"]["1"] == pytest.approx(float(expected), rel=1e-3)
    assert set(result["nl_score"]) == {"merged", "e0"}


def test_whole_model_nl_score_at_several_strengths_against_a_direct_computation(family):
    _, base, experts = family
    result = activation_diagnostics(experts[1], base, experts[:1], n_probes=3, probe_length=8, seed=3,
                                    nl_layers=[], whole_alphas=[0.25, 0.75], progress=False)
    ids = random_probes(96, 3, 8, seed=3)
    base_state, expert_state = load(base).state_dict(), load(experts[0]).state_dict()

    def output(scale: float) -> torch.Tensor:
        model = load(base)
        model.load_state_dict({n: t + scale * (expert_state[n] - t) for n, t in base_state.items()})
        with torch.no_grad():
            return model(ids).logits.double().flatten(1)

    f0, f1 = output(0.0), output(1.0)
    for alpha in (0.25, 0.75):
        expected = ((output(alpha) - (f0 + alpha * (f1 - f0))).norm(dim=1) / (f1 - f0).norm(dim=1)).mean()
        assert result["nl_score_whole"]["e0"][str(alpha)] == pytest.approx(float(expected), rel=1e-3)
        assert result["nl_score_whole"]["e0"][str(alpha)] > 0
    assert result["nl_score"] == {}
    assert set(result["nl_score_whole"]) == {"merged", "e0"}


def test_mismatched_architecture_is_refused(family, tmp_path):
    _, base, experts = family
    with pytest.raises(CompatibilityError, match="num_hidden_layers"):
        activation_diagnostics(make_base(tmp_path / "two", layers=2), base, experts, progress=False)
