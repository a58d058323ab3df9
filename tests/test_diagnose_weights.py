"""Weight-space diagnostics on merges built with known answers, checked against numpy / scipy written here."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from tinymodels import load_folder, make_base, make_expert

from mergelab.checkpoint.layout import layer_index
from mergelab.diagnostics.weights import normalised_spectral_shift, principal_angles, weight_diagnostics
from mergelab.errors import CompatibilityError


def write_variant(base: Path, path: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of ``base`` with every tensor replaced by ``change(name, tensor)``."""
    shutil.copytree(base, path)
    tensors = {n: change(n, t).contiguous() for n, t in load_folder(base).items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def layer_of(name: str) -> str:
    index = layer_index(name)
    return "other" if index is None else str(index)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagw")
    base = make_base(root / "base")
    experts = [make_expert(base, root / f"e{i}", seed=10 + i) for i in range(2)]
    return root, base, experts


@pytest.fixture(scope="module")
def patterned(family):
    """A merge taking element j from base (j % 4 == 0), e0 (1), e1 (2) or their mean (3): known provenance."""
    root, base, experts = family
    _b, e0, e1 = load_folder(base), load_folder(experts[0]), load_folder(experts[1])

    def pick(name, t):
        choice = torch.arange(t.numel()).reshape(t.shape) % 4
        mean = (e0[name] + e1[name]) / 2
        return torch.where(choice == 0, t, torch.where(choice == 1, e0[name], torch.where(choice == 2, e1[name], mean)))

    merged = write_variant(base, root / "patterned", pick)
    return merged, weight_diagnostics(merged, base, experts, k=4, progress=False)


def test_provenance_of_a_merge_with_known_sources(family, patterned):
    _, base, _ = family
    _, result = patterned
    counts: dict[str, np.ndarray] = {}
    for name, t in load_folder(base).items():
        layer = layer_of(name)
        choice = np.arange(t.numel()) % 4
        counts[layer] = counts.get(layer, np.zeros(4)) + np.bincount(choice, minlength=4)
    for layer, c in counts.items():
        expected = dict(zip(["base", "e0", "e1", "neither"], c / c.sum(), strict=True))
        assert result["provenance"]["per_layer"][layer] == pytest.approx(expected)
    total = sum(counts.values())
    assert result["provenance"]["total"] == pytest.approx(
        dict(zip(["base", "e0", "e1", "neither"], total / total.sum(), strict=True))
    )
    # only the base-sourced quarter is unchanged; the experts themselves are dense
    assert result["update_sparsity"]["merged"]["total"] == pytest.approx(total[0] / total.sum())
    assert result["update_sparsity"]["e0"]["total"] == 0.0


def test_norms_and_cosines_against_numpy(family, patterned):
    _, base, experts = family
    merged, result = patterned
    b = load_folder(base)
    models = {"e0": load_folder(experts[0]), "e1": load_folder(experts[1]), "merged": load_folder(merged)}
    per_layer: dict[str, dict[str, list[np.ndarray]]] = {}
    for name in b:
        for label, tensors in models.items():
            delta = (tensors[name].double() - b[name].double()).numpy().ravel()
            per_layer.setdefault(layer_of(name), {}).setdefault(label, []).append(delta)
    flat = {layer: {lab: np.concatenate(v) for lab, v in d.items()} for layer, d in per_layer.items()}
    whole = {lab: np.concatenate([flat[x][lab] for x in flat]) for lab in models}
    labels = result["cosine"]["labels"]
    assert labels == ["e0", "e1", "merged"]
    for label in labels:
        assert result["task_vector_norm"][label]["total"] == pytest.approx(np.linalg.norm(whole[label]))
        for layer in flat:
            assert result["task_vector_norm"][label]["per_layer"][layer] == pytest.approx(
                np.linalg.norm(flat[layer][label])
            )
    for i, a in enumerate(labels):
        for j, c in enumerate(labels):
            cos = whole[a] @ whole[c] / (np.linalg.norm(whole[a]) * np.linalg.norm(whole[c]))
            assert result["cosine"]["global"][i][j] == pytest.approx(cos)
            for layer in flat:
                u, v = flat[layer][a], flat[layer][c]
                assert result["cosine"]["per_layer"][layer][i][j] == pytest.approx(
                    u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                )


def test_principal_angles_against_scipy_and_nss_against_numpy(family, patterned):
    _, base, experts = family
    merged, result = patterned
    m, b = load_folder(merged), load_folder(base)
    rows = {row["name"]: row for row in result["matrices"]}
    assert set(rows) == {n for n, t in b.items() if t.ndim == 2 and layer_index(n) is not None}
    for name, row in rows.items():
        u_m = np.linalg.svd(m[name].double().numpy(), full_matrices=False)[0][:, :4]
        u_b, s_b, _ = np.linalg.svd(b[name].double().numpy(), full_matrices=False)
        angles = np.rad2deg(scipy.linalg.subspace_angles(u_m, u_b[:, :4]))
        assert row["max_angle_deg"]["base"] == pytest.approx(angles.max(), abs=1e-6)
        s_m = np.linalg.svd(m[name].double().numpy(), compute_uv=False)
        assert row["nss"]["base"] == pytest.approx(np.linalg.norm(s_m - s_b) / np.linalg.norm(s_b))
    for parent in ("base", "e0", "e1"):
        layer0 = [r["max_angle_deg"][parent] for r in rows.values() if r["layer"] == "0"]
        assert result["per_layer_max_angle"][parent]["0"] == pytest.approx(max(layer0))
    assert set(result["spectra"]) == {n for n, r in rows.items() if r["layer"] == "1"}  # middle of 2 layers


def test_principal_angles_of_a_known_rotation():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    theta = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    u_a = q[:, :3]
    u_b = u_a * torch.cos(theta) + q[:, 3:6] * torch.sin(theta)  # rotate u_i towards q_{i+3} by theta_i
    np.testing.assert_allclose(principal_angles(u_a, u_b).numpy(), np.rad2deg(theta.numpy()), atol=1e-9)


def test_nss_of_a_known_perturbation():
    w = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    bumped = w + 0.7 * torch.outer(u[:, 0], vh[0])  # sigma_1 grows by 0.7, the others stay
    sigma = torch.linalg.svdvals(bumped)
    assert normalised_spectral_shift(sigma, s) == pytest.approx(0.7 / float(torch.linalg.vector_norm(s)))
    # a scaled matrix: NSS = |c - 1|, subspaces unchanged
    assert normalised_spectral_shift(torch.linalg.svdvals(3 * w), s) == pytest.approx(2.0)


def test_layer_sign_counts_and_scaled_merge(family, tmp_path):
    _, base, _ = family
    b = load_folder(base)
    noise = {n: 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(n))) for n, t in b.items()}

    def signed(direction_in_layer1: float):
        def change(name, t):
            sign = direction_in_layer1 if layer_index(name) == 1 else 1.0
            return t + sign * noise[name] if layer_index(name) is not None else t

        return change

    up = write_variant(base, tmp_path / "up", signed(1.0))
    flip = write_variant(base, tmp_path / "flip", signed(-1.0))
    scaled = write_variant(
        base, tmp_path / "scaled", lambda n, t: 2.5 * t if layer_index(n) == 0 and t.ndim == 2 else t
    )
    result = weight_diagnostics(scaled, base, [up, flip], k=3, progress=False)
    assert result["sign_counts"]["up|flip"] == {"positive": 1, "negative": 1, "zero": 0}
    assert result["cosine"]["per_layer"]["0"][0][1] == pytest.approx(1.0)
    assert result["cosine"]["per_layer"]["1"][0][1] == pytest.approx(-1.0)
    for row in result["matrices"]:
        if row["layer"] == "0":  # 2.5 W: same singular subspaces, every singular value times 2.5
            assert row["max_angle_deg"]["base"] == pytest.approx(0.0, abs=1e-4)
            assert row["nss"]["base"] == pytest.approx(1.5)
        else:
            assert row["nss"]["base"] == 0.0
    assert math.isnan(result["cosine"]["per_layer"]["other"][0][1])  # no update outside the layers


def test_mismatched_architecture_is_refused(family, tmp_path):
    _, base, experts = family
    other = make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(CompatibilityError, match="one architecture"):
        weight_diagnostics(other, base, experts, progress=False)
