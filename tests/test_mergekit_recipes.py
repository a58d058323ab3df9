"""Recipes as mergekit users write them, run with mergelab and with ``mergekit-yaml`` 0.1.5 (its own program) on
the same tiny folders: NuSLERP in all its modes, YAML numbers used as booleans."""

from __future__ import annotations

import pytest
import torch
from tinymodels import load_folder, make_family, run_mergekit

from mergelab.api import merge
from mergelab.errors import RecipeError
from mergelab.mergekit_arithmetic import nuslerp_tensors


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    base, experts = make_family(root, 2, layers=2)
    return str(base), [str(e) for e in experts]


def nuslerp_recipe(base, experts, weights=(0.3, 0.7), **parameters):
    return {"merge_method": "nuslerp", "dtype": "float32", **({"base_model": base} if base else {}),
            **({"parameters": parameters} if parameters else {}),
            "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]}


NUSLERP_CASES = {
    "flatten_with_base": lambda b, e: nuslerp_recipe(b, e),
    "rows_with_base": lambda b, e: nuslerp_recipe(b, e, (1.0, 2.0), nuslerp_flatten=False),
    "columns_with_base": lambda b, e: nuslerp_recipe(b, e, nuslerp_flatten=False, nuslerp_row_wise=True),
    "flatten_no_base": lambda b, e: nuslerp_recipe(None, e, (0.6, 0.4)),
    "columns_no_base": lambda b, e: nuslerp_recipe(None, e, (0.5, 0.5), nuslerp_flatten=False,
                                                   nuslerp_row_wise=True),
    "weights_sum_zero": lambda b, e: nuslerp_recipe(b, e, (1.0, -1.0), nuslerp_flatten=False),
    "flags_as_numbers": lambda b, e: nuslerp_recipe(b, e, nuslerp_flatten=0, nuslerp_row_wise=1.0),
}


def steps_apart(ours, theirs):
    """Per tensor, the largest difference in steps of the output dtype at the element's magnitude, or at 1/16 of
    the tensor's largest magnitude for elements near zero, where a sum's cancellation leaves rounding of its larger
    terms."""
    assert ours.keys() == theirs.keys()
    worst = {}
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype, name
        scale = torch.maximum(a.abs(), b.abs()).float()
        step = torch.finfo(a.dtype).eps * scale.clamp_min(float(scale.max()) / 16 + 1e-30)
        worst[name] = float(((a.float() - b.float()).abs() / step).max())
    return worst


def assert_close_to(ours, theirs, ulps=1):
    """Equal up to ``ulps`` steps (``steps_apart``)."""
    for name, steps in steps_apart(ours, theirs).items():
        assert steps <= ulps, f"{name}: {steps:.1f} steps apart"


def exact_nuslerp(spec):
    """The recipe's NuSLERP in float64 (mergekit's formula, ``nuslerp_tensors``, on float64 inputs), rounded to
    float32: the reference both tools are measured against."""
    weights = [m["parameters"]["weight"] for m in spec["models"]]
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    flags = spec.get("parameters", {})
    row_wise, flatten = bool(flags.get("nuslerp_row_wise", False)), bool(flags.get("nuslerp_flatten", True))
    first, second = (load_folder(m["model"]) for m in spec["models"])
    base = load_folder(spec["base_model"]) if "base_model" in spec else None
    exact = {}
    for name in first:
        a, b = first[name].double(), second[name].double()
        if base is None:
            exact[name] = nuslerp_tensors(t, a, b, row_wise, flatten)
        else:
            origin = base[name].double()
            exact[name] = origin + nuslerp_tensors(t, a - origin, b - origin, row_wise, flatten)
    return {name: value.float() for name, value in exact.items()}


@pytest.mark.parametrize("case", list(NUSLERP_CASES))
def test_nuslerp_matches_mergekit(family, tmp_path, case):
    """As accurate as mergekit: both compute the output in float32 (task vectors, products, the base added back),
    which leaves each a few steps from the float64 result; mergelab's float64 cosines must not add to that (no
    tensor more than 2 steps farther from it than mergekit's, or than 4 steps), and the two agree closely."""
    base, experts = family
    spec = NUSLERP_CASES[case](base, experts)
    theirs = load_folder(run_mergekit(spec, tmp_path))
    ours = load_folder(merge(spec, tmp_path / "ours"))
    exact = exact_nuslerp(spec)
    mergekit_error = steps_apart(theirs, exact)
    for name, steps in steps_apart(ours, exact).items():
        assert steps <= max(mergekit_error[name], 4) + 2, (name, steps, mergekit_error[name])
    assert_close_to(ours, theirs, ulps=16)


def test_nuslerp_against_a_straight_slerp_per_column():
    """Column mode is SLERP of each column on its own (Shoemake's formula, float64, one column at a time)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen,
                                                                               dtype=torch.float64)
    t = 0.3
    out = nuslerp_tensors(t, a, b, row_wise=True, flatten=False)
    for j in range(3):
        x, y = a[:, j], b[:, j]
        theta = torch.arccos(torch.dot(x, y) / (x.norm() * y.norm()))
        expected = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
        torch.testing.assert_close(out[:, j], expected)
    torch.testing.assert_close(nuslerp_tensors(t, a, 2 * a, row_wise=False, flatten=True), (1 + t) * a)


def test_nuslerp_needs_two_models_and_weights(family, tmp_path):
    base, experts = family
    with pytest.raises(RecipeError, match="weight"):
        merge({"merge_method": "nuslerp", "base_model": base, "models": [{"model": e} for e in experts]},
              tmp_path / "a")
    with pytest.raises(RecipeError, match="2"):
        merge(nuslerp_recipe(base, experts[:1], (1.0,)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_numbers_as_booleans_match_mergekit(family, tmp_path):
    base, experts = family
    spec = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "parameters": {"normalize": 1.0, "int8_mask": 0},
            "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.3, 0.9))]}
    theirs = load_folder(run_mergekit(spec, tmp_path))
    ours = load_folder(merge(spec, tmp_path / "ours"))
    assert_close_to(ours, theirs, ulps=8)  # mergekit sums weighted task vectors in another order
    with pytest.raises(RecipeError, match="true or false"):
        merge({**spec, "parameters": {"normalize": 0.5}}, tmp_path / "bad")
