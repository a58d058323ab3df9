"""Parameters that are wrong together are refused while planning, before the output folder exists; and a merge
leaves torch's process-wide thread setting alone."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from tinymodels import make_family

import mergelab.engine as engine
from mergelab.api import merge
from mergelab.check import check
from mergelab.config import parse_recipe
from mergelab.errors import RecipeError
from mergelab.methods.registry import METHODS
from mergelab.plan.build import build_plan
from mergelab.plan.sources import open_inputs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), 2, layers=3)


def recipe(base, experts, method, models=None, **top):
    models = models or [{} for _ in experts]
    return {"merge_method": method, "base_model": str(base), "parameters": top,
            "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, models)]}


BAD = [
    # DELLA keep probabilities density ± epsilon must stay inside (0, 1)
    ("della", [{"density": 0.5, "epsilon": 0.6}, {"density": 0.5}], {}, "DELLA needs density ± epsilon"),
    # ... also where only some layers get a bad pair (a gradient), which used to fail mid-stream
    ("della", [{"density": 0.3, "epsilon": [0.1, 0.35]}, {"density": 0.5}], {}, "DELLA needs density ± epsilon"),
    ("scf_rkl", None, {"q_low": 0.8}, "SCF needs 0 <= q_low <= q_center <= q_high <= 1"),
    ("scf_kl", None, {"q_center": 0.9, "q_high": 0.6}, "SCF needs 0 <= q_low"),
    ("scf_rkl", None, {"alpha": float("inf")}, "alpha must be a finite number"),
    # weights that a method normalises cannot sum to zero
    ("linear", [{"weight": 1.0}, {"weight": -1.0}], {}, "the linear weights sum to zero"),
    ("karcher", [{"weight": 0.0}, {"weight": 0.0}], {}, "the karcher weights sum to zero"),
    ("multislerp", [{"weight": 0.5}, {"weight": -0.5}], {}, "the multislerp weights sum to zero"),
]


@pytest.mark.parametrize("method, models, top, message", BAD)
def test_wrong_combinations_are_refused_while_planning(family, tmp_path, monkeypatch, method, models, top,
                                                       message):
    base, experts = family
    r = recipe(base, experts, method, models, **top)
    readers = open_inputs(parse_recipe(r), None, False)
    with pytest.raises(RecipeError, match=message):
        build_plan(parse_recipe(r), readers)
    report = check(parse_recipe(r), readers, similarity=False)
    assert not report.ok and message in report.problems[0]
    created = []
    real_output = engine.OutputFolder

    def spy(*args, **kwargs):
        created.append(args[0])
        return real_output(*args, **kwargs)

    monkeypatch.setattr(engine, "OutputFolder", spy)
    with pytest.raises(RecipeError, match=message):
        merge(r, tmp_path / "out")
    assert created == []  # refused before the output folder was made
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_good_combinations_still_merge(family, tmp_path):
    base, experts = family
    r = recipe(base, experts, "della", [{"density": 0.5, "epsilon": 0.4}, {"density": 1.0, "epsilon": 0.9}])
    assert (merge(r, tmp_path / "out") / "model.safetensors").exists()  # density 1 draws nothing: not checked


def test_merge_leaves_torch_threads_alone(family, tmp_path, monkeypatch):
    base, experts = family
    inside, started = [], []
    linear = METHODS["linear"]

    def fn(call):
        inside.append(torch.get_num_threads())  # tiles are computed on one torch thread
        seen = {}
        fresh = threading.Thread(target=lambda: seen.setdefault("threads", torch.get_num_threads()))
        fresh.start()
        fresh.join()
        started.append(seen["threads"])  # a thread started meanwhile sees the process-wide setting
        return linear.fn(call)

    monkeypatch.setitem(METHODS, "spy_linear", replace(linear, name="spy_linear", fn=fn))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        r = {"merge_method": "spy_linear", "models": [{"model": str(e)} for e in experts]}
        for lanes in (1, 2):
            merge(r, tmp_path / f"out{lanes}", compute_threads=lanes, chunk_elements=256)
            assert torch.get_num_threads() == 3
        assert inside and set(inside) == {1}
        assert started and set(started) == {3}
    finally:
        torch.set_num_threads(before)
