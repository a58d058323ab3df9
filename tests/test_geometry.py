"""Karcher, SLERP, Multi-SLERP, Model Stock and SCE against straight float64 numpy/scipy re-implementations of
their published definitions, plus the properties issue 4 asks for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergelab.errors import RecipeError
from mergelab.methods import karcher, model_stock, multislerp, sce, slerp
from mergelab.methods.spec import TensorInfo

SPECS = {s.name: s for s in (*karcher.SPECS, *slerp.SPECS, *multislerp.SPECS, *model_stock.SPECS, *sce.SPECS)}
INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 2)


def run(name, base, experts, dtype=torch.float64, **params):
    """Call a method the way the engine does; returns (result as numpy, stats)."""
    spec = SPECS[name]
    base_t = None if base is None else torch.tensor(base, dtype=dtype)
    out = spec.fn(spec.call_with(base_t, [torch.tensor(e, dtype=dtype) for e in experts], INFO, **params))
    merged, stats = out if isinstance(out, tuple) else (out, {})
    assert merged.dtype == dtype
    return merged.numpy(), stats


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- references ------------------------------------------------------------------------------------------


def ref_slerp(a, b, t, threshold=0.9995):
    """Shoemake's SLERP on the raw tensors, linear when nearly (anti)parallel."""
    cos = np.dot(a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(np.clip(cos, -1, 1))
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ref_karcher_direction(units, alphas):
    """argmin over the unit sphere of Σ α_i arccos(<x, u_i>)² (eq. 3 under the spherical proxy), by BFGS on an
    unconstrained y with x = y / |y|."""

    def objective(y):
        x = y / np.linalg.norm(y)
        return float(np.sum(alphas * np.arccos(np.clip(units @ x, -1, 1)) ** 2))

    start = units.T @ alphas
    res = minimize(objective, start / np.linalg.norm(start), method="BFGS", options={"gtol": 1e-12})
    return res.x / np.linalg.norm(res.x)


def ref_first_order(x, units, alphas):
    """‖Σ α_i Log_x(u_i)‖ with the sphere's log map (eq. 4)."""
    total = np.zeros_like(x)
    for a, u in zip(alphas, units, strict=True):
        theta = np.arccos(np.clip(u @ x, -1, 1))
        if theta > 1e-15:
            total += a * theta / np.sin(theta) * (u - np.cos(theta) * x)
    return np.linalg.norm(total)


def ref_multislerp(base, experts, weights, normalize=True, eps=1e-8):
    """Goddard's Multi-SLERP step by step: tangent space at the weighted mean, average, exponential map."""
    x = np.stack([(e - base if base is not None else e).ravel() for e in experts])
    w = np.array(weights, float)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    units = x / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangents = units - (units @ mean)[:, None] * mean
    tangent = (w[:, None] * tangents).sum(0)
    length = np.linalg.norm(tangent) + eps
    point = np.cos(length) * mean + np.sin(length) / length * tangent
    out = (point * (w @ norms)).reshape(experts[0].shape)
    return out + base if base is not None else out


def ref_model_stock(base, experts, filter_wise=False):
    """Jang et al. 2024 / study eq. 4 with the mean pairwise cosine of task vectors, looping over pairs."""
    rows = base.reshape(base.shape[0], -1) if filter_wise and base.ndim >= 2 else base.reshape(1, -1)
    deltas = [e.reshape(rows.shape) - rows for e in experts]
    n = len(experts)
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        cosines = [np.dot(a[r], b[r]) / (np.linalg.norm(a[r]) * np.linalg.norm(b[r]))
                   for i, a in enumerate(deltas) for b in deltas[i + 1 :]]
        cos = np.mean(cosines)
        t = n * cos / (1 + (n - 1) * cos)
        avg = np.mean([e.reshape(rows.shape)[r] for e in experts], axis=0)
        out[r] = t * avg + (1 - t) * rows[r]
    return out.reshape(base.shape)


def ref_sce(base, experts, topk, variant):
    """FuseChat SCE: select by variance, weights from mean squares, sign-elected weighted disjoint mean."""
    deltas = np.stack([e - base for e in experts])
    var = deltas.var(axis=0).ravel()
    k = int(topk * np.count_nonzero(var)) if topk < 1 else var.size
    keep = np.zeros(var.size, bool)
    keep[np.argsort(-var, kind="stable")[:k]] = True
    selected = deltas * keep.reshape(base.shape)
    energy = np.array([np.mean(d ** 2) for d in selected])
    w = energy / energy.sum() if energy.sum() > 0 else np.full(len(experts), 1 / len(experts))
    used = selected if variant == "mergekit" else deltas
    sign = np.where(used.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(used) == sign
    wb = w.reshape(-1, *([1] * base.ndim))
    div = (agree * wb).sum(0)
    return base + (used * agree * wb).sum(0) / np.where(div == 0, 1, div)


# --- Karcher -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [3, 0, 1, 2]])
def test_karcher_matches_direct_minimisation_of_the_objective(rng, weights):
    experts = [rng.normal(size=(3, 4)) * s for s in (1.0, 2.0, 0.5, 1.5)]
    merged, stats = run("karcher", None, experts, weight=weights, max_iter=200, tol=1e-12)
    units = np.stack([e.ravel() / np.linalg.norm(e) for e in experts])
    alphas = np.array(weights, float) / sum(weights)
    direction = ref_karcher_direction(units, alphas)
    scale = alphas @ np.array([np.linalg.norm(e) for e in experts])
    np.testing.assert_allclose(merged.ravel(), scale * direction, atol=1e-6)
    assert np.linalg.norm(merged) == pytest.approx(scale, rel=1e-12)
    assert ref_first_order(merged.ravel() / scale, units, alphas) < 1e-12
    assert stats["karcher_converged"] == 1.0 and stats["karcher_residual"] < 1e-12


def test_karcher_of_two_equal_weight_models_is_slerp_at_one_half(rng):
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    b = b * (np.linalg.norm(a) / np.linalg.norm(b))  # equal norms: plain SLERP preserves them too
    merged, _ = run("karcher", None, [a, b], max_iter=50, tol=1e-13)
    np.testing.assert_allclose(merged, ref_slerp(a, b, 0.5), atol=1e-12)
    # Unequal norms: the direction is SLERP's between the unit tensors, the norm the mean of the two.
    b = 3 * b
    merged, _ = run("karcher", None, [a, b], max_iter=50, tol=1e-13)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    expected = ref_slerp(ua, ub, 0.5) * (np.linalg.norm(a) + np.linalg.norm(b)) / 2
    np.testing.assert_allclose(merged, expected, atol=1e-12)


def test_karcher_of_two_weighted_models_lies_on_the_geodesic_at_the_second_weight(rng):
    a, b = rng.normal(size=7), rng.normal(size=7)
    merged, _ = run("karcher", None, [a, b], weight=[0.3, 0.7], max_iter=100, tol=1e-13)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    expected = ref_slerp(ua, ub, 0.7) * (0.3 * np.linalg.norm(a) + 0.7 * np.linalg.norm(b))
    np.testing.assert_allclose(merged, expected, atol=1e-12)


@pytest.mark.parametrize("step_size", [1.0, 0.5])
def test_karcher_first_order_condition_holds_at_the_result_in_float32(rng, step_size):
    experts = [rng.normal(size=(64, 48)) for _ in range(5)]
    merged, stats = run("karcher", None, experts, dtype=torch.float32, step_size=step_size, max_iter=100,
                        tol=1e-5)
    units = np.stack([e.ravel() / np.linalg.norm(e) for e in experts])
    x = merged.astype(np.float64).ravel()
    assert ref_first_order(x / np.linalg.norm(x), units, np.full(5, 0.2)) < 1e-5
    assert stats["karcher_converged"] == 1.0


def test_karcher_reports_non_convergence_when_out_of_iterations(rng):
    experts = [rng.normal(size=30) for _ in range(4)]
    _, stats = run("karcher", None, experts, step_size=0.1, max_iter=2, tol=1e-10)
    assert stats["karcher_iterations"] == 2 and stats["karcher_converged"] == 0.0
    assert stats["karcher_residual"] > 1e-10


def test_karcher_zero_tensor_counts_in_the_norm_but_has_no_direction(rng):
    a, b = rng.normal(size=6), rng.normal(size=6)
    merged, _ = run("karcher", None, [a, b, np.zeros(6)], max_iter=50, tol=1e-13)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    expected = ref_slerp(ua, ub, 0.5) * (np.linalg.norm(a) + np.linalg.norm(b)) / 3
    np.testing.assert_allclose(merged, expected, atol=1e-12)
    merged, _ = run("karcher", None, [np.zeros(6), np.zeros(6)])
    assert not merged.any()


def test_karcher_bad_inputs():
    experts = [np.ones(3), np.arange(3.0)]
    with pytest.raises(RecipeError, match="sum to zero"):
        run("karcher", None, experts, weight=[0.0, 0.0])
    spec = SPECS["karcher"]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="step_size"):
            spec.param("step_size").check(bad, "karcher")
    with pytest.raises(ValueError, match="weight"):
        spec.param("weight").check(-1.0, "karcher")
    assert spec.min_experts == 2 and spec.base == "ignored"


# --- SLERP -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_shoemake(rng, t):
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    merged, stats = run("slerp", a, [b], t=t)
    np.testing.assert_allclose(merged, ref_slerp(a, b, t), atol=1e-12)
    cos = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert stats == {"slerp_angle": pytest.approx(math.acos(cos)), "slerp_linear": 0.0}


def test_slerp_is_linear_for_nearly_parallel_and_zero_tensors(rng):
    a = rng.normal(size=20)
    b = 2 * a + 1e-3 * rng.normal(size=20)
    merged, stats = run("slerp", a, [b], t=0.25)
    np.testing.assert_allclose(merged, 0.75 * a + 0.25 * b, atol=1e-14)
    assert stats["slerp_linear"] == 1.0
    merged, _ = run("slerp", np.zeros(20), [b], t=0.25)
    np.testing.assert_allclose(merged, 0.25 * b, atol=1e-14)


def test_slerp_identical_inputs_give_that_input(rng):
    a = rng.normal(size=(3, 3))
    np.testing.assert_allclose(run("slerp", a, [a.copy()], t=0.4)[0], a, atol=1e-14)


# --- Multi-SLERP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_the_tangent_space_procedure(rng, with_base, normalize):
    base = rng.normal(size=(5, 4)) if with_base else None
    experts = [rng.normal(size=(5, 4)) for _ in range(4)]
    weights = [0.5, 1.0, 2.0, 0.25]
    merged, _ = run("multislerp", base, experts, weight=weights, normalize_weights=normalize)
    np.testing.assert_allclose(merged, ref_multislerp(base, experts, weights, normalize), atol=1e-10)


def test_multislerp_special_cases(rng):
    a = rng.normal(size=8)
    np.testing.assert_allclose(run("multislerp", None, [a, a.copy(), a.copy()])[0], a, atol=1e-12)
    np.testing.assert_allclose(run("multislerp", None, [a])[0], a)
    # Two antipodal tensors with equal weights: no mean direction, so the weighted linear mix.
    np.testing.assert_allclose(run("multislerp", None, [a, -a])[0], np.zeros(8), atol=1e-12)
    with pytest.raises(RecipeError, match="cancel out"):
        run("multislerp", None, [a, -a, a, -a])
    # Three experts equal to the base on this tensor (frozen embeddings): nothing moved, so the base.
    np.testing.assert_array_equal(run("multislerp", a, [a.copy(), a.copy(), a.copy()])[0], a)
    with pytest.raises(RecipeError, match="sum to zero"):
        run("multislerp", None, [a, 2 * a], weight=[1.0, -1.0])


# --- Model Stock -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_model_stock_matches_reference(rng, filter_wise, shape):
    base = rng.normal(size=shape)
    shared = rng.normal(scale=0.1, size=shape)
    experts = [base + shared + rng.normal(scale=0.1, size=shape) for _ in range(3)]
    merged, stats = run("model_stock", base, experts, filter_wise=filter_wise)
    np.testing.assert_allclose(merged, ref_model_stock(base, experts, filter_wise), atol=1e-12)
    assert 0 < stats["model_stock_t"] < 1 and stats["model_stock_guarded"] == 0.0


def test_model_stock_identical_experts_give_the_expert_and_guard_the_singular_denominator(rng):
    base, delta = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    merged, stats = run("model_stock", base, [base + delta, base + delta])
    np.testing.assert_allclose(merged, base + delta, atol=1e-12)  # cos θ = 1 gives t = 1
    assert stats["model_stock_t"] == pytest.approx(1.0)
    # Three task vectors 120° apart: cos θ = -1/2 and 1 + (N - 1) cos θ = 0; the base is kept.
    angles = np.deg2rad([0.0, 120.0, 240.0])
    experts = [base + np.cos(a) * np.eye(4)[0] + np.sin(a) * np.eye(4)[1] for a in angles]
    merged, stats = run("model_stock", base, experts)
    np.testing.assert_allclose(merged, base, atol=1e-12)
    assert stats["model_stock_guarded"] == 1.0 and stats["model_stock_t"] == 0.0
    # An expert equal to the base has cosine 0 with the others rather than NaN.
    merged, _ = run("model_stock", base, [base.copy(), base + delta, base + 2 * delta])
    assert np.isfinite(merged).all()


# --- SCE ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mergekit", "fusechat"])
@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce_matches_reference(rng, variant, topk):
    base = rng.normal(size=(6, 7))
    experts = [base + rng.normal(scale=s, size=base.shape) for s in (0.05, 0.1, 0.2)]
    merged, stats = run("sce", base, experts, select_topk=topk, variant=variant)
    np.testing.assert_allclose(merged, ref_sce(base, experts, topk, variant), atol=1e-12)
    assert stats["sce_selected_fraction"] == pytest.approx(int(topk * 42) / 42 if topk < 1 else 1.0)
    assert sum(stats[f"sce_weight_{i}"] for i in range(3)) == pytest.approx(1.0)


def test_sce_variants_differ_and_identical_experts(rng):
    base = rng.normal(size=(5, 5))
    experts = [base + rng.normal(scale=0.1, size=base.shape) for _ in range(3)]
    a, _ = run("sce", base, experts, select_topk=0.5, variant="mergekit")
    b, _ = run("sce", base, experts, select_topk=0.5, variant="fusechat")
    assert np.abs(a - b).max() > 1e-3
    same = base + rng.normal(size=base.shape)
    np.testing.assert_allclose(run("sce", base, [same, same.copy()])[0], same, atol=1e-12)
    # Identical experts have zero variance everywhere, so a select_topk below 1 selects nothing: mergekit's
    # variant then keeps the base, FuseChat's (selection only sets the weights) gives the expert.
    np.testing.assert_allclose(run("sce", base, [same, same.copy()], select_topk=0.5)[0], base)
    np.testing.assert_allclose(run("sce", base, [same, same.copy()], select_topk=0.5, variant="fusechat")[0],
                               same, atol=1e-12)


def test_sce_selection_breaks_variance_ties_by_position(rng):
    base = np.zeros((8, 8))
    experts = [rng.integers(-2, 3, size=base.shape).astype(float) for _ in range(3)]  # many equal variances
    for topk in (0.1, 0.37, 0.5, 0.9):
        merged, stats = run("sce", base, experts, select_topk=topk)
        np.testing.assert_allclose(merged, ref_sce(base, experts, topk, "mergekit"), atol=1e-12)
        nonzero = np.count_nonzero(np.stack(experts).var(axis=0))
        assert stats["sce_selected_fraction"] == int(topk * nonzero) / 64


def test_karcher_fisher_preconditioning_matches_the_metric_reading():
    """Under ⟨a, b⟩_F = Σ f a b: scale by √f, Karcher mean on the sphere (BFGS reference), scale back,
    renormalise, weighted mean norm of the sources. A constant Fisher changes nothing."""
    rng = np.random.default_rng(5)
    experts = [rng.normal(size=12) for _ in range(3)]
    fisher = rng.uniform(0.1, 5.0, size=12)
    weights = np.array([0.2, 0.5, 0.3])
    root = np.sqrt(fisher + 1e-8 * fisher.mean())
    scaled = np.stack([e * root for e in experts])
    units = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    direction = ref_karcher_direction(units, weights) / root
    direction /= np.linalg.norm(direction)
    expected = direction * (weights @ np.array([np.linalg.norm(e) for e in experts]))
    got, _ = run("karcher", None, experts, weight=list(weights), fisher_precondition="diagonal",
                 fisher=torch.tensor(fisher), tol=1e-12, max_iter=200)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    plain, _ = run("karcher", None, experts, weight=list(weights), tol=1e-12, max_iter=200)
    uniform, _ = run("karcher", None, experts, weight=list(weights), fisher_precondition="diagonal",
                     fisher=torch.full((12,), 3.0, dtype=torch.float64), tol=1e-12, max_iter=200)
    np.testing.assert_allclose(uniform, plain, atol=1e-10)
    assert np.abs(got - plain).max() > 1e-3
