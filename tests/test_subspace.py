"""TSV-Merge, Iso-C, Iso-CTS and Subspace Boosting against float64 numpy/scipy re-implementations of the
in-the-wild study's equations (sec. 4.1) and Marczak et al. 2025, plus the spectral properties of issue 4."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from mergelab.errors import RecipeError
from mergelab.methods import subspace
from mergelab.methods.spec import TensorInfo
from mergelab.methods.task_arithmetic import ties_update
from mergelab.ops import spectral

SPECS = {s.name: s for s in subspace.SPECS}
MATRIX = TensorInfo("model.layers.1.self_attn.o_proj.weight", 1, "attn_o", 2)
NORM = TensorInfo("model.norm.weight", None, "norm", 2)
EMBEDDING = TensorInfo("model.embed_tokens.weight", None, "embedding", 2)
BIAS = TensorInfo("model.layers.0.self_attn.q_proj.bias", 0, "attn_q", 2)


def make_call(name, base, experts, info=MATRIX, dtype=torch.float64, **params):
    return SPECS[name].call_with(torch.tensor(base, dtype=dtype), [torch.tensor(e, dtype=dtype) for e in experts],
                                 info, **params)


def run(name, base, experts, info=MATRIX, dtype=torch.float64, **params):
    merged, stats = SPECS[name].fn(make_call(name, base, experts, info, dtype, **params))
    assert merged.dtype == dtype and merged.shape == tuple(np.shape(base))
    return merged.numpy(), stats


@pytest.fixture
def family():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 9))
    experts = [base + rng.normal(scale=0.1, size=base.shape) for _ in range(3)]
    return base, experts


# --- references --------------------------------------------------------------------------------------------


def ref_boost(matrix, beta):
    """Study eq. 11: j* = min{j : Σ_{i≤j} σ_i / Σ σ_i ≥ β}; σ_j for j > j* raised to σ_{j*}."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    reached = np.cumsum(s) / s.sum() >= beta
    j = int(np.argmax(reached)) if reached.any() else len(s) - 1
    boosted = np.where(np.arange(len(s)) > j, s[j], s)
    return u @ np.diag(boosted) @ vt, s[j]


def ref_polar(matrix):
    """scipy's polar decomposition (a = u p): the orthogonal factor of a tall matrix; a wide one via its
    transpose."""
    if matrix.shape[0] >= matrix.shape[1]:
        return scipy.linalg.polar(matrix)[0]
    return scipy.linalg.polar(matrix.T)[0].T


def ref_tsv(base, experts, weights=None, lam=1.0):
    """Study eq. 5-8: top floor(r/T) triplets per task, concatenate, Procrustes-orthogonalise, rebuild."""
    weights = weights or [1.0] * len(experts)
    deltas = [w * (e - base) for w, e in zip(weights, experts, strict=True)]
    k = max(1, min(base.shape) // len(deltas))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u_perp = ref_polar(np.hstack(us))
    v_perp = ref_polar(np.hstack(vs))
    return base + lam * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


def ref_iso_c(base, experts, weights=None, lam=1.0):
    """Study eq. 9-10: every singular value of the summed task vector replaced by their mean."""
    weights = weights or [1.0] * len(experts)
    summed = sum(w * (e - base) for w, e in zip(weights, experts, strict=True))
    u, s, vt = np.linalg.svd(summed, full_matrices=False)
    return base + lam * s.mean() * u @ vt


def ref_iso_cts(base, experts, fraction, lam=1.0):
    """Marczak et al. 2025, Iso-CTS: common subspace of the sum, task-specific subspaces of each task vector
    with the common part projected out, orthogonalised together, isotropic scaling."""
    deltas = [e - base for e in experts]
    r, t = min(base.shape), len(deltas)
    common = int(r * fraction)
    per_task = min(r // t, round((r - common) / t))
    common = r - t * per_task
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    projector = np.eye(base.shape[0]) - u[:, :common] @ u[:, :common].T
    for d in deltas:
        if per_task == 0:
            break
        ut, st, vtt = np.linalg.svd(projector @ d, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vtt[:per_task].T)
    sigma = np.concatenate(ss).mean()
    return base + lam * sigma * ref_polar(np.hstack(us)) @ ref_polar(np.hstack(vs)).T


# --- spectral kernels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6)])
def test_polar_factor_matches_scipy_and_is_orthogonal(shape):
    matrix = np.random.default_rng(2).normal(size=shape)
    polar = spectral.polar_factor(torch.tensor(matrix)).numpy()
    np.testing.assert_allclose(polar, ref_polar(matrix), atol=1e-12)
    small = min(shape)
    gram = polar.T @ polar if shape[0] >= shape[1] else polar @ polar.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.05, 0.2, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(10, 7), (7, 10)])
def test_subspace_boost_matches_reference_and_never_falls_below_the_cutoff(beta, shape):
    matrix = np.random.default_rng(3).normal(size=shape) @ np.diag(np.geomspace(1, 1e-3, shape[1]))
    boosted, stats = spectral.subspace_boost(torch.tensor(matrix), beta)
    expected, cutoff_value = ref_boost(matrix, beta)
    np.testing.assert_allclose(boosted.numpy(), expected, atol=1e-12)
    assert stats["sb_cutoff_value"] == pytest.approx(cutoff_value, rel=1e-12)
    spectrum = np.linalg.svd(boosted.numpy(), compute_uv=False)
    assert spectrum.min() >= cutoff_value * (1 - 1e-9)
    original = np.linalg.svd(matrix, compute_uv=False)
    kept = int(round(stats["sb_cutoff_fraction"] * len(original)))
    np.testing.assert_allclose(spectrum[:kept], original[:kept], rtol=1e-10)  # the leading part is unchanged


def test_boost_cutoff_edges():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # n_j = 0.4, 0.7, 0.9, 1.0
    assert [spectral.boost_cutoff(values, b) for b in (0.0, 0.4, 0.41, 0.7, 0.95, 1.0)] == [0, 0, 1, 1, 3, 3]
    assert spectral.boost_cutoff(torch.zeros(3), 0.2) == 0
    # Cumulative sums that round to just under 1 still give the last index.
    assert spectral.boost_cutoff(torch.tensor([0.1] * 10, dtype=torch.float32), 1.0) == 9


# --- TSV, Iso-C, Iso-CTS -----------------------------------------------------------------------------------


def test_tsv_matches_reference(family):
    base, experts = family
    merged, stats = run("tsv", base, experts, weight=[1.0, 0.5, 2.0], **{"lambda": 0.7})
    np.testing.assert_allclose(merged, ref_tsv(base, experts, [1.0, 0.5, 2.0], 0.7), atol=1e-12)
    assert stats["tsv_rank_per_task"] == 3


def test_tsv_with_more_tasks_than_rank_keeps_one_direction_each():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, 8))
    experts = [base + rng.normal(size=base.shape) for _ in range(5)]
    merged, stats = run("tsv", base, experts)
    np.testing.assert_allclose(merged, ref_tsv(base, experts), atol=1e-12)
    assert stats["tsv_rank_per_task"] == 1


def test_tsv_of_one_task_is_that_task(family):
    base, experts = family
    np.testing.assert_allclose(run("tsv", base, experts[:1])[0], experts[0], atol=1e-12)


def test_iso_c_matches_reference_and_has_a_flat_spectrum(family):
    base, experts = family
    merged, stats = run("iso_c", base, experts, weight=[1.0, -0.5, 2.0], **{"lambda": 1.3})
    np.testing.assert_allclose(merged, ref_iso_c(base, experts, [1.0, -0.5, 2.0], 1.3), atol=1e-12)
    spectrum = np.linalg.svd((merged - base) / 1.3, compute_uv=False)
    np.testing.assert_allclose(spectrum, np.full(9, stats["iso_mean_singular_value"]), rtol=1e-10)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8, 1.0])
def test_iso_cts_matches_reference(family, fraction):
    base, experts = family
    merged, stats = run("iso_cts", base, experts, common_space_fraction=fraction)
    np.testing.assert_allclose(merged, ref_iso_cts(base, experts, fraction), atol=1e-12)
    assert stats["iso_cts_common_rank"] + 3 * stats["iso_cts_rank_per_task"] == 9
    spectrum = np.linalg.svd(merged - base, compute_uv=False)  # isotropic as well
    np.testing.assert_allclose(spectrum, np.full(9, stats["iso_mean_singular_value"]), rtol=1e-10)


def test_iso_cts_with_the_whole_rank_common_is_iso_c(family):
    base, experts = family
    np.testing.assert_allclose(run("iso_cts", base, experts, common_space_fraction=1.0)[0],
                               run("iso_c", base, experts)[0], atol=1e-12)


def test_iso_cts_dimensions():
    # r = 32, T = 3, f = 0.8: floor(25.6) = 25 common, round(7 / 3) = 2 per task, common takes the rest: 26.
    assert subspace.iso_cts_dimensions(32, 3, 0.8) == (26, 2)
    # f = 0: round(32 / 3) = 11 would overshoot 32, so per task is capped at floor(32 / 3) = 10.
    assert subspace.iso_cts_dimensions(32, 3, 0.0) == (2, 10)
    for rank in range(1, 40):
        for tasks in (1, 2, 5, 12):
            common, per_task = subspace.iso_cts_dimensions(rank, tasks, 0.8)
            assert common >= 0 and per_task >= 0 and common + tasks * per_task == rank


# --- Subspace Boosting after Task Arithmetic and TIES ------------------------------------------------------


def test_task_arithmetic_sb_matches_reference(family):
    base, experts = family
    merged, stats = run("task_arithmetic_sb", base, experts, weight=[1.0, 0.5, 1.5], beta=0.3,
                        **{"lambda": 0.8})
    update = sum(w * (e - base) for w, e in zip([1.0, 0.5, 1.5], experts, strict=True))
    expected, cutoff_value = ref_boost(update, 0.3)
    np.testing.assert_allclose(merged, base + 0.8 * expected, atol=1e-12)
    assert stats["sb_cutoff_value"] == pytest.approx(cutoff_value)


def test_ties_sb_boosts_the_ties_update(family):
    base, experts = family
    call = make_call("ties_sb", base, experts, density=[0.5] * 3, beta=0.2, **{"lambda": 0.1})
    merged, _ = SPECS["ties_sb"].fn(call)
    expected, _ = ref_boost(ties_update(call).numpy(), 0.2)
    np.testing.assert_allclose(merged.numpy(), base + 0.1 * expected, atol=1e-12)


def test_boost_with_beta_one_changes_nothing_and_beta_zero_flattens_to_the_top(family):
    base, experts = family
    unboosted = base + sum(e - base for e in experts)
    np.testing.assert_allclose(run("task_arithmetic_sb", base, experts, beta=1.0)[0], unboosted, atol=1e-12)
    flat = run("task_arithmetic_sb", base, experts, beta=0.0)[0]
    spectrum = np.linalg.svd(flat - base, compute_uv=False)
    np.testing.assert_allclose(spectrum, np.full(9, np.linalg.svd(unboosted - base, compute_uv=False)[0]))


# --- rules and properties shared by the subspace methods ---------------------------------------------------


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("info", [NORM, EMBEDDING, BIAS], ids=["norm", "embedding", "bias"])
def test_tensors_outside_the_matrix_stack_get_the_weighted_task_vector_mean(name, info):
    rng = np.random.default_rng(5)
    shape = (12, 9) if info is EMBEDDING else (9,)
    base = rng.normal(size=shape)
    experts = [base + rng.normal(size=shape) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    merged, stats = run(name, base, experts, info=info, weight=weights, **{"lambda": 0.5})
    mean = sum(w * (e - base) for w, e in zip(weights, experts, strict=True)) / 6.0
    np.testing.assert_allclose(merged, base + 0.5 * mean, atol=1e-12)
    assert stats == {}


@pytest.mark.parametrize("name", ["task_arithmetic_sb", "ties_sb"])
def test_boosting_leaves_tensors_outside_the_matrix_stack_alone(name, family):
    base, experts = family
    call = make_call(name, base, experts, info=EMBEDDING)
    inner = subspace.task_arithmetic_update if name == "task_arithmetic_sb" else ties_update
    merged, stats = SPECS[name].fn(call)
    np.testing.assert_allclose(merged.numpy(), base + inner(call).numpy(), atol=1e-14)
    assert stats == {}


@pytest.mark.parametrize("name", list(SPECS))
def test_experts_equal_to_the_base_give_the_base(name, family):
    base, _ = family
    np.testing.assert_allclose(run(name, base, [base.copy(), base.copy()])[0], base, atol=1e-14)


@pytest.mark.parametrize("name", list(SPECS))
def test_float32_inputs_agree_with_float64(name, family):
    base, experts = family
    merged32, _ = run(name, base, experts, dtype=torch.float32)
    merged64, _ = run(name, base, experts)
    np.testing.assert_allclose(merged32, merged64, atol=2e-5)


def test_bad_inputs(family):
    base, experts = family
    with pytest.raises(RecipeError, match="sum to zero"):
        run("iso_c", base[0], [e[0] for e in experts[:2]], info=NORM, weight=[1.0, -1.0])
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="beta"):
            SPECS["task_arithmetic_sb"].param("beta").check(bad, "task_arithmetic_sb")
        with pytest.raises(ValueError, match="common_space_fraction"):
            SPECS["iso_cts"].param("common_space_fraction").check(bad, "iso_cts")
    assert SPECS["task_arithmetic_sb"].param("beta").default == 0.2
    assert all(spec.base == "required" for spec in SPECS.values())
