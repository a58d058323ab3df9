"""SCF methods through the whole engine (mergelab.api.merge) on tiny model folders: agreement with mergekit's
``arcee_fusion`` (run as its own program), discrete composition on real merges, statistics in mergelab.json.

mergekit evaluates the forward KL in float32 (ratio form), so its masks may differ from the exact ones on
elements whose score lies near the threshold; every such element must be within 1e-2 (relative) of it.
"""

import json

import numpy as np
import pytest
import torch
from test_scf import NEAR, reference
from tinymodels import load_folder, make_family, run_mergekit

from mergelab.api import merge
from mergelab.errors import RecipeError

MERGEKIT_NEAR = 1e-2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Tensors of up to 16k elements, as in the issue's measurement."""
    return make_family(tmp_path_factory.mktemp("scf"), 2, layers=2, hidden=64, vocab=256)


@pytest.fixture(scope="module")
def mergekit_arcee(family, tmp_path_factory):
    base, experts = family
    return load_folder(run_mergekit(recipe("arcee_fusion", base, experts[:1]), tmp_path_factory.mktemp("mk")))


def recipe(method, base, experts, out_dtype=None, **parameters):
    r = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
         "dtype": "float32"}
    if out_dtype:
        r["out_dtype"] = out_dtype
    if parameters:
        r["parameters"] = parameters
    return r


@pytest.mark.parametrize("method,params", [("arcee_fusion", {}), ("scf_kl", {"quantile_method": "lower"})])
def test_agrees_with_mergekit_arcee_fusion(family, mergekit_arcee, tmp_path, method, params):
    base_dir, (expert_dir, _) = family
    ours = load_folder(merge(recipe(method, base_dir, [expert_dir], **params), tmp_path / "ours"))
    theirs = mergekit_arcee
    base, expert = load_folder(base_dir), load_folder(expert_dir)
    assert ours.keys() == theirs.keys() == base.keys()
    differing, total, worst = 0, 0, 0
    for name in ours:
        b, e = base[name], expert[name]
        assert b.numel() <= 10**6  # mergekit samples larger tensors
        moved = e != b
        our_mask = (ours[name] == e) & moved
        assert torch.all((ours[name] == b) | our_mask), name  # discrete composition
        their_mask = (theirs[name] != b) & moved
        saliency, tau, exact = reference(b, e, reverse=False, quantile_method="lower")
        differ = (our_mask != their_mask).numpy()
        assert np.all(np.abs(saliency[differ] - tau) <= MERGEKIT_NEAR * abs(tau)), name
        ours_vs_exact = our_mask.numpy() != (exact & moved.numpy())
        assert np.all(np.abs(saliency[ours_vs_exact] - tau) <= NEAR * abs(tau)), name
        differing += int(differ.sum())
        total += b.numel()
        worst = max(worst, int(differ.sum()))
    print(f"\n{method}: masks differ from mergekit's on {differing} of {total} elements "
          f"(at most {worst} in one tensor)")


def test_real_merge_is_a_discrete_composition_in_bfloat16(tmp_path):
    base_dir, expert_dirs = make_family(tmp_path, 2, layers=2, dtype=torch.bfloat16)
    out = merge(recipe("scf_rkl", base_dir, expert_dirs, out_dtype="bfloat16"), tmp_path / "ours")
    merged = load_folder(out)
    base, experts = load_folder(base_dir), [load_folder(d) for d in expert_dirs]
    record = json.loads((out / "mergelab.json").read_text())
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        bits = tensor.view(torch.int16)
        parents = [base[name].view(torch.int16)] + [x[name].view(torch.int16) for x in experts]
        assert torch.all(torch.stack([bits == p for p in parents]).any(dim=0)), name
        stats = record["tensors"][name]
        assert stats["taken_0"] + stats["taken_1"] + stats["from_base"] == pytest.approx(1.0)
        assert 0.0 <= stats["update_norm_ratio_0"] <= 1.0 and stats["threshold_0"] >= 0.0
    big = [s for s in record["tensors"].values() if s["numel"] >= 1024]
    assert big and all(0.0 < s["selected_0"] < 0.3 for s in big)


def test_bad_recipes_are_refused(family, tmp_path):
    base_dir, experts = family
    with pytest.raises(RecipeError, match="q_low"):
        merge(recipe("scf_rkl", base_dir, experts[:1], q_low=0.9), tmp_path / "a")
    with pytest.raises(RecipeError, match="q_low"):
        merge(recipe("scf_rkl", base_dir, experts[:1], q_low=1.5), tmp_path / "b")
    with pytest.raises(RecipeError, match="quantile_method"):
        merge(recipe("arcee_fusion", base_dir, experts[:1], quantile_method="linear"), tmp_path / "c")
    with pytest.raises(RecipeError, match="arcee_fusion"):
        merge(recipe("arcee_fusion", base_dir, experts), tmp_path / "d")
