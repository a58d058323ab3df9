"""Agreement with mergekit 0.1.5 (run as its own program) on the same folders and recipes.

Random methods (DARE, DELLA) draw different masks in the two tools, so they are compared at density 1, where
the drop is the identity; their random paths are checked against straight re-implementations in
test_task_arithmetic.py. TIES is compared with equal weights, where mergelab's raw sign vote (TIES paper) and
mergekit's weighted vote (mergekit issue 474) coincide; with unequal weights mergelab's ``vote: weighted``
reproduces mergekit.
"""

import pytest
import torch
from tinymodels import load_folder, make_family, run_mergekit

from mergelab.api import merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base, experts = make_family(root, 3, layers=4)
    return root, base, experts


def recipe(method, base, experts, weights=(1.0, 1.0, 1.0), top=None, per_model=None, **extra):
    models = [{"model": str(e), "parameters": {"weight": w, **(per_model or {})}} for e, w in zip(experts, weights)]
    r = {"merge_method": method, "models": models, "dtype": "float32", **extra}
    if base is not None:
        r["base_model"] = str(base)
    if top:
        r["parameters"] = top
    return r


def assert_same(ours, theirs, atol=2e-6):
    a, b = load_folder(ours), load_folder(theirs)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


CASES = {
    "linear": lambda b, e: recipe("linear", None, e, (0.2, 0.5, 0.3)),
    "task_arithmetic": lambda b, e: recipe("task_arithmetic", b, e, (0.7, -0.2, 0.4), top={"lambda": 0.8}),
    "task_arithmetic_normalized": lambda b, e: recipe("task_arithmetic", b, e, (0.7, 0.2, 0.4),
                                                      top={"normalize": True}),
    "ties": lambda b, e: recipe("ties", b, e, top={"density": 0.4, "lambda": 0.9}),
    "ties_weighted_vote": lambda b, e: recipe("ties", b, e, (0.3, 1.0, 0.6),
                                              top={"density": 0.5, "vote": "weighted"}),
    "breadcrumbs": lambda b, e: recipe("breadcrumbs", b, e, (0.5, 0.5, 0.5), top={"density": 0.6, "gamma": 0.05}),
    "breadcrumbs_ties": lambda b, e: recipe("breadcrumbs_ties", b, e, top={"density": 0.6, "gamma": 0.05}),
    "dare_ties_density1": lambda b, e: recipe("dare_ties", b, e, (0.5, 0.5, 0.5)),
    "della_linear_density1": lambda b, e: recipe("della_linear", b, e, (0.5, 0.3, 0.2)),
    "gradient_and_filters": lambda b, e: recipe(
        "task_arithmetic", b, e, top={"lambda": [0.2, 1.0, 0.5]},
        per_model={"weight": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.4},
                              {"value": 0.25}]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_output_as_mergekit(family, case, tmp_path):
    root, base, experts = family
    r = CASES[case](base, experts)
    mergekit_recipe = {**r, "parameters": {k: v for k, v in (r.get("parameters") or {}).items() if k != "vote"}}
    if not mergekit_recipe["parameters"]:
        del mergekit_recipe["parameters"]
    ours = merge(r, tmp_path / "ours")
    theirs = run_mergekit(mergekit_recipe, tmp_path)
    assert_same(ours, theirs)


def test_bfloat16_inputs_and_output_match_mergekit(tmp_path):
    base, experts = make_family(tmp_path, 2, layers=2, dtype=torch.bfloat16)
    r = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
         "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}
    ours = load_folder(merge(r, tmp_path / "ours"))
    theirs = load_folder(run_mergekit(r, tmp_path))
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], theirs[name]), name
