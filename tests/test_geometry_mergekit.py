"""Engine-level checks of the geometry and subspace methods: agreement with ``mergekit-yaml`` 0.1.5 on the same
tiny Llama folders (slerp, multislerp, model_stock, sce, unweighted karcher), the matrix/non-matrix rule of the
SVD methods through the engine, and recipe errors a user can make."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tinymodels import load_folder, make_family, run_mergekit

from mergelab.api import merge
from mergelab.errors import RecipeError


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_family")
    base, experts = make_family(root, 3, arch="llama", layers=2)
    return root, str(base), [str(e) for e in experts]


def recipe(method, base, models, parameters=None, weights=None):
    entries = [{"model": m, **({"parameters": {"weight": w}} if weights else {})}
               for m, w in zip(models, weights or [None] * len(models), strict=True)]
    out = {"merge_method": method, "models": entries, "dtype": "float32"}
    if base is not None:
        out["base_model"] = base
    if parameters:
        out["parameters"] = parameters
    return out


CASES = {
    "slerp": lambda b, e: recipe("slerp", b, [b, e[0]], {"t": 0.3}),
    "multislerp": lambda b, e: recipe("multislerp", b, e, weights=[1.0, 0.5, 2.0]),
    "model_stock": lambda b, e: recipe("model_stock", b, [b, *e]),
    "sce": lambda b, e: recipe("sce", b, e, {"select_topk": 0.5}),
    "karcher": lambda b, e: recipe("karcher", None, e),
}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_mergekit(family, tmp_path, case):
    root, base, experts = family
    spec = CASES[case](base, experts)
    theirs = load_folder(run_mergekit(spec, tmp_path))
    ours = load_folder(merge(spec, tmp_path / "mergelab_out"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")


def test_method_statistics_reach_mergelab_json(family, tmp_path):
    _, base, experts = family
    out = merge(recipe("karcher", None, experts, {"tol": 1e-6, "max_iter": 50}), tmp_path / "k")
    stats = json.loads((out / "mergelab.json").read_text())["tensors"]["model.layers.1.mlp.down_proj.weight"]
    assert stats["karcher_converged"] == 1.0 and stats["karcher_residual"] < 1e-6
    out = merge(recipe("ties_sb", base, experts, {"density": 0.5, "beta": 0.2}), tmp_path / "t")
    tensors = json.loads((out / "mergelab.json").read_text())["tensors"]
    assert 0 < tensors["model.layers.0.self_attn.q_proj.weight"]["sb_cutoff_fraction"] < 1
    assert "sb_cutoff_fraction" not in tensors["model.norm.weight"]


def test_svd_methods_flatten_layer_matrices_and_average_the_rest(family, tmp_path):
    _, base, experts = family
    out = load_folder(merge(recipe("iso_c", base, experts), tmp_path / "iso"))
    b, e = load_folder(base), [load_folder(x) for x in experts]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        mean = sum(x[name] - b[name] for x in e) / 3
        torch.testing.assert_close(out[name], b[name] + mean, rtol=0, atol=1e-6)
    update = (out["model.layers.1.mlp.gate_proj.weight"] - b["model.layers.1.mlp.gate_proj.weight"]).double()
    spectrum = np.linalg.svd(update.numpy(), compute_uv=False)
    assert spectrum.max() / spectrum.min() < 1 + 1e-3


@pytest.mark.parametrize("spec, message", [
    (lambda b, e: recipe("karcher", None, e[:1]), "merges 2 or more model"),
    (lambda b, e: recipe("model_stock", b, [b, e[0]]), "merges 2 or more model"),
    (lambda b, e: recipe("slerp", b, e[:2], {"t": 0.5}), "merges 1 model"),
    (lambda b, e: recipe("karcher", None, e, {"step_size": 0.0}), "step_size"),
    (lambda b, e: recipe("task_arithmetic_sb", b, e, {"beta": 1.5}), "beta"),
    (lambda b, e: recipe("multislerp", None, e[:2], weights=[1.0, -1.0]), "sum to zero"),
])
def test_recipe_errors(family, tmp_path, spec, message):
    _, base, experts = family
    with pytest.raises(RecipeError, match=message):
        merge(spec(base, experts), tmp_path / "out")


def test_karcher_fisher_preconditioning_runs_the_fisher_pass(family, tmp_path, monkeypatch):
    _, base, experts = family
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    out = merge(recipe("karcher", None, experts, {"fisher_precondition": "diagonal"}), tmp_path / "out")
    record = json.loads((out / "mergelab.json").read_text())
    assert record["prepare"]["tensors_preconditioned"] > 0
    plain = load_folder(merge(recipe("karcher", None, experts), tmp_path / "plain"))
    merged = load_folder(out)
    assert any(not torch.equal(merged[k], plain[k]) for k in merged)
