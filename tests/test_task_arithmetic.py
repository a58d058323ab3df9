"""The task-arithmetic family against straight float64 numpy re-implementations of the papers' formulas."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.errors import RecipeError
from mergelab.methods.registry import METHODS
from mergelab.methods.spec import TensorInfo

INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 2)


def call_method(name, base, experts, seed=0, **params):
    spec = METHODS[name]
    gen = torch.Generator().manual_seed(seed) if spec.random else None
    base_t = None if base is None else torch.tensor(base, dtype=torch.float64)
    experts_t = [torch.tensor(e, dtype=torch.float64) for e in experts]
    return spec.fn(spec.call_with(base_t, experts_t, INFO, gen, **params)).numpy()


def ref_trim(delta, density):
    """Keep the floor(density * n) (at least 1) largest magnitudes; ties broken by position."""
    k = max(1, int(density * delta.size))
    flat = np.abs(delta).ravel()
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return delta * mask.reshape(delta.shape)


def ref_ties(base, experts, weights, densities, lam=1.0, normalize=True, vote="raw", election="sum"):
    """TIES (Yadav et al. 2023): trim, elect, disjoint (weighted) mean."""
    trimmed = np.stack([ref_trim(e - base, d) for e, d in zip(experts, densities)])
    w = np.array(weights).reshape(-1, *([1] * base.ndim))
    voters = trimmed * w if vote == "weighted" else trimmed
    if election == "sum":
        sign = np.where(voters.sum(0) >= 0, 1.0, -1.0)
    else:
        sign = np.where(np.sign(voters).sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == sign
    total = (trimmed * agree * w).sum(0)
    if normalize:
        div = (agree * w).sum(0)
        total = total / np.where(div == 0, 1, div)
    return base + lam * total


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 5))
    experts = [base + rng.normal(scale=0.1, size=base.shape) for _ in range(3)]
    return base, experts


def test_task_arithmetic_matches_eq2_and_eq12(tensors):
    base, experts = tensors
    w = [0.5, 1.0, -0.3]
    expected = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, experts))
    np.testing.assert_allclose(call_method("task_arithmetic", base, experts, weight=w, **{"lambda": 0.7}), expected)
    normalized = base + 0.7 * sum(wi * (e - base) for wi, e in zip(w, experts)) / sum(w)
    got = call_method("task_arithmetic", base, experts, weight=w, normalize=True, **{"lambda": 0.7})
    np.testing.assert_allclose(got, normalized)


def test_linear_is_weighted_mean(tensors):
    _, experts = tensors
    w = [1.0, 2.0, 3.0]
    np.testing.assert_allclose(call_method("linear", None, experts, weight=w),
                               sum(wi * e for wi, e in zip(w, experts)) / 6.0)


def test_linear_weights_summing_to_zero_is_an_error(tensors):
    _, experts = tensors
    with pytest.raises(RecipeError, match="sum to zero"):
        call_method("linear", None, experts[:2], weight=[1.0, -1.0])


@pytest.mark.parametrize("vote", ["raw", "weighted"])
@pytest.mark.parametrize("election", ["sum", "count"])
def test_ties_matches_reference(tensors, vote, election):
    base, experts = tensors
    w, d = [1.0, 0.4, 2.0], [0.3, 0.5, 0.8]
    got = call_method("ties", base, experts, weight=w, density=d, vote=vote, sign_election=election,
                      **{"lambda": 0.9})
    np.testing.assert_allclose(got, ref_ties(base, experts, w, d, 0.9, True, vote, election))


def test_ties_vote_differs_from_mergekit_style_when_weights_differ():
    # One coordinate: expert 0 moves +1 with weight 0.1, expert 1 moves -0.5 with weight 1.
    # Raw vote (TIES paper): +1 - 0.5 > 0 elects +; weighted vote (mergekit): 0.1 - 0.5 < 0 elects -.
    base = np.zeros(1)
    experts = [np.array([1.0]), np.array([-0.5])]
    raw = call_method("ties", base, experts, weight=[0.1, 1.0], density=1.0, vote="raw")
    weighted = call_method("ties", base, experts, weight=[0.1, 1.0], density=1.0, vote="weighted")
    assert raw[0] == pytest.approx(1.0) and weighted[0] == pytest.approx(-0.5)


def test_breadcrumbs_drops_outliers_and_small(tensors):
    base, experts = tensors
    delta = experts[0] - base
    got = call_method("breadcrumbs", base, experts[:1], density=0.5, gamma=0.1) - base
    n = delta.size
    order = np.argsort(np.abs(delta).ravel(), kind="stable")
    keep = np.zeros(n, bool)
    kept, top = int(0.5 * n), int(0.1 * n)
    keep[order[n - kept - top: n - top]] = True
    np.testing.assert_allclose(got, delta * keep.reshape(delta.shape))


def test_dare_keeps_about_density_and_rescales_l1(tensors):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 100))
    expert = base + rng.normal(size=base.shape)
    got = call_method("dare_linear", base, [expert], seed=3, density=0.3) - base
    kept = got != 0
    assert abs(kept.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / kept.size)
    delta = expert - base
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(delta).sum())
    np.testing.assert_allclose(got[kept], (delta * np.abs(delta).sum() / np.abs(delta * kept).sum())[kept])


def test_dare_inverse_density_rescale(tensors):
    base, experts = tensors
    got = call_method("dare_linear", base, experts[:1], density=0.5, rescale_mode="inverse_density") - base
    delta = experts[0] - base
    kept = got != 0
    np.testing.assert_allclose(got[kept], delta[kept] / 0.5)


def test_random_methods_are_reproducible_per_seed(tensors):
    base, experts = tensors
    a = call_method("dare_ties", base, experts, seed=7, density=0.5)
    b = call_method("dare_ties", base, experts, seed=7, density=0.5)
    c = call_method("dare_ties", base, experts, seed=8, density=0.5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_della_keep_probability_follows_magnitude_rank():
    rng = np.random.default_rng(2)
    base = np.zeros((400, 50))
    expert = np.tile(np.arange(1, 51, dtype=float), (400, 1)) * rng.choice([-1, 1], size=(400, 50))
    got = call_method("della_linear", base, [expert], seed=0, density=0.5, epsilon=0.4, rescale=False)
    kept_rate = (got != 0).mean(axis=0)  # column j has magnitude rank j in every row
    expected = 0.1 + np.arange(50) / 49 * 0.8
    assert np.all(np.abs(kept_rate - expected) < 4 * np.sqrt(expected * (1 - expected) / 400) + 1e-9)


def test_della_epsilon_too_large_is_an_error(tensors):
    base, experts = tensors
    with pytest.raises(RecipeError, match="epsilon"):
        call_method("della", base, experts, density=0.2, epsilon=0.3)


arrays = st.integers(min_value=1, max_value=4).flatmap(
    lambda n: st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=n * 3, max_size=n * 3))


@settings(max_examples=30, deadline=None)
@given(arrays, st.sampled_from(["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                "breadcrumbs_ties", "della", "della_linear"]))
def test_zero_weight_gives_base_and_single_expert_gives_expert(values, method):
    data = np.array(values).reshape(3, -1)
    base, expert = data[0], data[1]
    assert np.allclose(call_method(method, base, [expert], weight=0.0), base)
    full = call_method(method, base, [expert], weight=1.0, density=1.0)
    assert np.allclose(full, expert)


@settings(max_examples=30, deadline=None)
@given(arrays, st.sampled_from(["task_arithmetic", "ties", "breadcrumbs_ties", "linear"]))
def test_expert_order_does_not_matter(values, method):
    data = np.array(values).reshape(3, -1)
    base = None if method == "linear" else data[0]
    a = call_method(method, base, [data[1], data[2]], weight=[0.3, 0.9], density=0.6)
    b = call_method(method, base, [data[2], data[1]], weight=[0.9, 0.3], density=0.6)
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_trim_breaks_ties_at_the_threshold_by_position():
    from mergelab.ops.sparsify import magnitude_mask

    delta = torch.tensor([1.0, -2.0, 2.0, 2.0, 3.0, 0.5])
    assert magnitude_mask(delta, 0.6).tolist() == [False, True, True, False, True, False]
    rng = np.random.default_rng(3)
    values = rng.integers(-3, 4, size=(40, 25)).astype(np.float64)  # many ties
    for density in (0.1, 0.37, 0.5, 0.9):
        got = magnitude_mask(torch.tensor(values), density).numpy()
        np.testing.assert_array_equal(values * got, ref_trim(values, density))
