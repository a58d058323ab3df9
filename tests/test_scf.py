"""SCF-RKL / SCF-KL / arcee_fusion against a straightforward float64 numpy re-implementation of Algorithm 1
(Lin et al. 2026), the per-row KL against 40-digit arithmetic, and the properties the paper's formula implies."""

import json
import math

import mpmath
import numpy as np
import pytest
import torch
from tinymodels import load_folder, make_family, merges_in_pieces

from mergelab.errors import CheckpointError, CompatibilityError, RecipeError
from mergelab.methods.scf import MULTI_EXPERT_RULES, SPECS
from mergelab.methods.scf_saliency import passes, saliency
from mergelab.methods.spec import MethodCall, MethodSpec, TensorInfo
from mergelab.ops.divergence import softmax_kl_rows
from mergelab.ops.select import bit_mask, keep_, select

SPEC = {spec.name: spec for spec in SPECS}
INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 2)
NEAR = 1e-5  # masks may differ from the float64 reference only for scores this close (relative) to τ


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(base, expert, *, reverse=True, alpha=1.5, q_low=0.25, q_high=0.75, q_center=0.5, epsilon=1e-8,
              quantile_method="linear"):
    """Algorithm 1 line by line in float64 numpy: returns (saliency, τ, mask)."""
    b, s = np.asarray(base, dtype=np.float64), np.asarray(expert, dtype=np.float64)
    delta = np.abs(s - b)
    q = softmax(b) + epsilon
    p = softmax(s) + epsilon
    if reverse:
        divergence = np.sum(q * np.log(q / p), axis=-1, keepdims=True)
    else:
        divergence = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    saliency = delta * divergence
    q1, mu, q3 = np.quantile(saliency.ravel(), [q_low, q_center, q_high], method=quantile_method)
    tau = mu + alpha * (q3 - q1)
    return saliency, tau, saliency >= tau


def run(spec: MethodSpec, base, experts, **params):
    """Call a method the way the engine does: defaults, then the spec's fixed values, then overrides."""
    values = {p.name: p.default for p in spec.params} | dict(spec.fixed) | params
    return spec.fn(MethodCall(base, list(experts), INFO, values))


def pair(shape, seed=0, scale=1.0, dtype=torch.float32):
    """A base and an expert whose rows differ by amounts that vary from row to row (so the KL matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    row_scale = torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64) if len(shape) > 1 else 1.0
    expert = base + scale * row_scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return base.to(dtype), expert.to(dtype)


CASES = [(method, reverse, interpolation) for method, reverse in (("scf_rkl", True), ("scf_kl", False))
         for interpolation in ("linear", "lower", "midpoint")] + [("arcee_fusion", False, "lower")]


@pytest.mark.parametrize("method,reverse,quantile_method", CASES)
@pytest.mark.parametrize("shape", [(64, 48), (96,), (3, 8, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(method, reverse, quantile_method, shape, dtype):
    spec = SPEC[method]
    extra = {} if spec.fixed else {"quantile_method": quantile_method}
    base, expert = pair(shape, seed=len(shape), scale=0.1, dtype=dtype)
    merged, stats = run(spec, base, [expert], **extra)
    saliency, tau, mask = reference(base, expert, reverse=reverse, quantile_method=quantile_method)
    ours = (merged == expert) & (merged != base)
    theirs = mask & (expert != base).numpy()
    differ = ours.numpy() != theirs
    assert np.all(np.abs(saliency[differ] - tau) <= NEAR * abs(tau))
    assert abs(stats["threshold_0"] - tau) <= NEAR * abs(tau)
    assert 0.0 < mask.mean() < 0.5
    assert stats["selected_0"] == pytest.approx(mask.mean(), abs=differ.sum() / mask.size)
    delta = (expert - base).double().numpy()
    ratio = np.linalg.norm(delta[mask]) / np.linalg.norm(delta)
    assert stats["update_norm_ratio_0"] == pytest.approx(ratio, rel=1e-5, abs=differ.any() * 1e-2)
    assert merged.dtype == dtype and merged.shape == base.shape


def test_masks_identical_away_from_threshold_at_the_default_settings():
    base, expert = pair((128, 64), seed=9, scale=0.05)
    merged, stats = run(SPEC["scf_rkl"], base, [expert])
    _, tau, mask = reference(base, expert)
    assert torch.equal(merged, torch.where(torch.from_numpy(mask), expert, base))
    assert stats["taken_0"] == stats["selected_0"] == mask.mean()
    assert stats["from_base"] == 1 - mask.mean()


def test_row_kl_against_40_digit_arithmetic():
    """Near-identical rows (weights ~0.02, changes down to 2e-7) where the textbook float64 sum cancels."""
    mpmath.mp.dps = 40
    g = np.random.default_rng(1)
    for change in (2e-2, 2e-4, 2e-6, 2e-7):
        a = (0.02 * g.standard_normal((3, 64))).astype(np.float32)
        b = (a + change * g.standard_normal((3, 64))).astype(np.float32)
        ours = softmax_kl_rows(torch.from_numpy(a), torch.from_numpy(b), 1e-8).numpy()
        exact = np.array([_kl_mp(ra, rb, 1e-8) for ra, rb in zip(a, b)])
        assert np.all(np.abs(ours - exact) <= 2e-10 * exact), change


def _kl_mp(a_row, b_row, epsilon) -> float:
    ea = [mpmath.exp(mpmath.mpf(float(x))) for x in a_row]
    eb = [mpmath.exp(mpmath.mpf(float(x))) for x in b_row]
    sa, sb, eps = mpmath.fsum(ea), mpmath.fsum(eb), mpmath.mpf(epsilon)
    p = [x / sa + eps for x in ea]
    q = [x / sb + eps for x in eb]
    return float(mpmath.fsum(pi * mpmath.log(pi / qi) for pi, qi in zip(p, q)))


def test_row_kl_shapes_and_blocks():
    a, b = pair((5, 7, 11), seed=2, scale=0.3, dtype=torch.float64)
    whole = softmax_kl_rows(a, b, 1e-8)
    assert whole.shape == (5, 7) and whole.dtype == torch.float64
    assert torch.equal(softmax_kl_rows(a, b, 1e-8, block_elements=1), whole)
    p, q = softmax(a.numpy()) + 1e-8, softmax(b.numpy()) + 1e-8
    np.testing.assert_allclose(whole.numpy(), np.sum(p * np.log(p / q), axis=-1), rtol=1e-9)
    assert softmax_kl_rows(a[0, 0], b[0, 0], 1e-8).shape == ()
    assert softmax_kl_rows(torch.tensor(1.0), torch.tensor(2.0), 1e-8).item() == 0.0


@pytest.mark.parametrize("method", ["scf_rkl", "scf_kl"])
def test_zero_delta_gives_the_base(method):
    base, _ = pair((16, 12), seed=4)
    merged, stats = run(SPEC[method], base, [base.clone()])
    assert torch.equal(merged, base)
    assert stats["update_norm_ratio_0"] == 0.0
    assert stats["threshold_0"] == 0.0 and stats["selected_0"] == 1.0  # every score 0 is >= τ = 0


def test_a_score_equal_to_the_threshold_passes():
    """alpha 0 with the lower interpolation makes τ one of the scores; M = 1[I >= τ] takes that element."""
    base, expert = pair((20, 10), seed=12, scale=0.3)
    merged, stats = run(SPEC["scf_rkl"], base, [expert], alpha=0.0, quantile_method="lower")
    at_threshold = saliency(base, expert, 1e-8, reverse=True) == stats["threshold_0"]
    assert at_threshold.sum() == 1
    assert torch.equal(merged[at_threshold], expert[at_threshold])
    assert stats["selected_0"] == 101 / 200  # the lower median (rank 99 of 0..199) and everything above it


def test_passes_compares_with_the_exact_float64_threshold():
    one = torch.tensor([1.0, 1.0 + 2**-23], dtype=torch.float32)  # 1 and the next float32
    assert passes(one, 1.0).tolist() == [True, True]
    assert passes(one, 1.0 + 2**-40).tolist() == [False, True]  # rounds to 1.0 in float32, yet 1.0 < τ
    assert passes(one.double(), 1.0 + 2**-40).tolist() == [False, True]


def test_huge_alpha_gives_the_base_and_very_negative_alpha_the_expert():
    base, expert = pair((32, 16), seed=5, scale=0.2)
    merged, stats = run(SPEC["scf_rkl"], base, [expert], alpha=1e30)
    assert torch.equal(merged, base) and stats["from_base"] == 1.0
    merged, stats = run(SPEC["scf_rkl"], base, [expert], alpha=-1e30)
    assert torch.equal(merged, expert) and stats["taken_0"] == 1.0
    assert stats["update_norm_ratio_0"] == pytest.approx(1.0)


def test_swapping_base_and_secondary_follows_the_formula():
    """With the roles swapped, reverse KL becomes the forward KL of the original pair (Δ is symmetric), so
    SCF-RKL(s → b) selects exactly where SCF-KL(b → s) does, and takes b's elements there; and since reverse
    KL is not symmetric, that selection differs from SCF-RKL(b → s)."""
    base, expert = pair((48, 32), seed=6, scale=0.5)
    swapped, _ = run(SPEC["scf_rkl"], expert, [base])
    forward, _ = run(SPEC["scf_kl"], base, [expert])
    reverse, _ = run(SPEC["scf_rkl"], base, [expert])
    forward_mask = (forward == expert) & (expert != base)
    assert torch.equal(swapped, torch.where(forward_mask, base, expert))
    reverse_mask = (reverse == expert) & (expert != base)
    assert not torch.equal(forward_mask, reverse_mask)
    _, _, mask_swapped_ref = reference(expert, base, reverse=True)
    _, _, mask_forward_ref = reference(base, expert, reverse=False)
    assert np.array_equal(mask_swapped_ref, mask_forward_ref)


def test_discrete_composition_round_trips_bfloat16_bit_exactly():
    base16, expert16 = (t.to(torch.bfloat16) for t in pair((40, 24), seed=7, scale=0.1))
    for method in ("scf_rkl", "scf_kl"):
        merged, _ = run(SPEC[method], base16.float(), [expert16.float()], alpha=0.0)
        out = merged.to(torch.bfloat16).view(torch.int16)
        from_base = out == base16.view(torch.int16)
        from_expert = out == expert16.view(torch.int16)
        assert torch.all(from_base | from_expert)
        assert from_expert[expert16 != base16].any() and from_base[expert16 != base16].any()


def _hand_built():
    """Base 0; expert A moves elements 6, 7; expert B moves 5, 6. Each passes exactly its two moved elements
    (sorted |Δ| = [0 x 6, x, y]: Q1 = median = 0, Q3 = x/4, τ = 0.375 x · KL)."""
    base = torch.zeros(8)
    a = torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 2.0])
    b = torch.tensor([0, 0, 0, 0, 0, 1.5, 3.0, 0])
    return base, a, b


def test_multi_expert_max_saliency_on_a_hand_built_case():
    base, a, b = _hand_built()
    sal_a, _, mask_a = reference(base, a)
    sal_b, _, mask_b = reference(base, b)
    assert list(np.flatnonzero(mask_a)) == [6, 7] and list(np.flatnonzero(mask_b)) == [5, 6]
    assert sal_b[6] > sal_a[6]  # B is more salient where both pass
    merged, stats = run(SPEC["scf_rkl"], base, [a, b])
    assert torch.equal(merged, torch.tensor([0, 0, 0, 0, 0, 1.5, 3.0, 2.0]))
    assert stats["selected_0"] == stats["selected_1"] == 2 / 8
    assert (stats["taken_0"], stats["taken_1"], stats["from_base"]) == (1 / 8, 2 / 8, 5 / 8)
    assert "averaged" not in stats


def test_multi_expert_mean_on_a_hand_built_case():
    base, a, b = _hand_built()
    merged, stats = run(SPEC["scf_rkl"], base, [a, b], multi_expert="mean")
    assert torch.equal(merged, torch.tensor([0, 0, 0, 0, 0, 1.5, 2.0, 2.0]))
    fractions = (stats["taken_0"], stats["taken_1"], stats["averaged"], stats["from_base"])
    assert fractions == (1 / 8, 1 / 8, 1 / 8, 5 / 8)


def test_multi_expert_tie_goes_to_the_first_expert():
    base, a, _ = _hand_built()
    merged, stats = run(SPEC["scf_rkl"], base, [a, a.clone()])
    assert torch.equal(merged, a)
    assert (stats["taken_0"], stats["taken_1"]) == (2 / 8, 0.0)


def test_multi_expert_rule_on_random_tensors():
    """Three experts against the reference: each element from the passing expert of highest saliency."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 30, generator=g)
    experts = [base + s * torch.randn(40, 30, generator=g) for s in (0.05, 0.1, 0.2)]
    merged, _ = run(SPEC["scf_rkl"], base, experts)
    refs = [reference(base, e) for e in experts]
    scores = np.stack([np.where(mask, sal, -np.inf) for sal, _, mask in refs])
    winner = scores.argmax(axis=0)
    stacked = np.stack([e.numpy() for e in experts])
    expected = np.where(np.isfinite(scores.max(axis=0)), np.take_along_axis(stacked, winner[None], 0)[0],
                        base.numpy())
    ordered = np.sort(scores, axis=0)
    close = np.zeros(base.shape, dtype=bool)  # near a threshold or a near-tie between experts: not judged
    for sal, tau, _ in refs:
        close |= np.abs(sal - tau) <= NEAR * tau
    with np.errstate(invalid="ignore"):  # -inf - -inf where fewer than two experts pass
        close |= np.isfinite(ordered[-2]) & (ordered[-1] - ordered[-2] <= 1e-5 * ordered[-1])
    assert close.mean() < 0.01
    assert np.array_equal(merged.numpy()[~close], expected[~close])


def test_bad_parameters_and_inputs():
    base, expert = pair((8, 6), seed=10)
    with pytest.raises(RecipeError, match="q_low.*q_center.*q_high"):
        run(SPEC["scf_rkl"], base, [expert], q_low=0.6)
    with pytest.raises(RecipeError, match="q_low.*q_center.*q_high"):
        run(SPEC["scf_kl"], base, [expert], q_high=0.4)
    with pytest.raises(RecipeError, match="alpha"):
        run(SPEC["scf_rkl"], base, [expert], alpha=math.nan)
    with pytest.raises(CompatibilityError, match="expert 1.*shape"):
        run(SPEC["scf_rkl"], base, [expert, expert[:, :5]])
    spec = SPEC["scf_rkl"]
    for name, value in (("q_low", 1.5), ("q_center", -0.1), ("epsilon", 0.0), ("quantile_method", "cubic"),
                        ("multi_expert", "vote")):
        with pytest.raises(ValueError, match=name):
            spec.param(name).check(value, "recipe")
    arcee = SPEC["arcee_fusion"]
    assert "quantile_method" not in arcee.param_names and arcee.fixed["quantile_method"] == "lower"
    assert arcee.max_experts == 1 and arcee.aliases_of == "scf_kl"


# --- row blocks (the TwoPass protocol the engine streams large tensors with) ---------------------------------

# how the quantiles' order statistics are found: one sort of everything; radix histogram levels; a sample's
# brackets (which a 1-element fallback bucket makes fall back to histogram levels when one misses)
SELECTIONS = [(1 << 22, False), (1, False), (1, True)]


def blockwise_fused(spec: MethodSpec, base, experts, rows: int, **params):
    """The engine's protocol on ``rows``-row blocks (elements of a 1-D tensor, as the engine's tiles cut it):
    the statistics passes over every block, then the output pass."""
    values = {p.name: p.default for p in spec.params} | dict(spec.fixed) | params
    n = base.shape[0] if base.dim() else 1
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    state = spec.two_pass.start(INFO, values, tuple(base.shape), None)

    def block_call(a, b):
        return MethodCall(base[a:b], [e[a:b] for e in experts], INFO, values)

    while not state.done:
        for a, b in blocks:
            state.observe(block_call(a, b))
        state.end_pass()
    outputs = [spec.two_pass.block(block_call(a, b), state) for a, b in blocks]
    return torch.cat([m for m, _ in outputs]), outputs[-1][1]


def assert_same(streamed, whole):
    """Same bits; the same statistics, the norm ratios up to the rounding of sums taken block by block."""
    (merged, stats), (merged_whole, stats_whole) = streamed, whole
    assert torch.equal(merged, merged_whole)
    assert stats.keys() == stats_whole.keys()
    for key, value in stats.items():
        if key.startswith("update_norm_ratio"):
            assert value == pytest.approx(stats_whole[key], rel=1e-6)
        else:
            assert value == stats_whole[key], key


@pytest.mark.parametrize("method,reverse,quantile_method", CASES)
@pytest.mark.parametrize("gather_limit, sample", SELECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_give_the_same_bits_as_the_whole_tensor(method, reverse, quantile_method, gather_limit, sample,
                                                       dtype, monkeypatch):
    import mergelab.ops.rank_window as rank_window

    monkeypatch.setattr(rank_window, "GATHER_LIMIT", gather_limit)
    monkeypatch.setattr(rank_window, "SAMPLE", sample)
    spec = SPEC[method]
    extra = {} if spec.fixed else {"quantile_method": quantile_method}
    for shape in ((64, 48), (3, 8, 20), (96,)):
        base, expert = pair(shape, seed=len(shape) + 20, scale=0.1, dtype=dtype)
        whole = run(spec, base, [expert], **extra)
        _, tau, mask = reference(base, expert, reverse=reverse, quantile_method=quantile_method)
        assert abs(whole[1]["threshold_0"] - tau) <= NEAR * abs(tau)
        for rows in (1, 3, 7, shape[0]):
            assert_same(blockwise_fused(spec, base, [expert], rows, **extra), whole)


def test_the_float64_reference_is_met_on_every_element_in_blocks():
    base, expert = pair((128, 64), seed=9, scale=0.05)
    _, _, mask = reference(base, expert)
    for rows in (1, 5, 128):
        merged, _ = blockwise_fused(SPEC["scf_rkl"], base, [expert], rows)
        assert torch.equal(merged, torch.where(torch.from_numpy(mask), expert, base))


def test_ties_exactly_at_the_threshold_in_blocks():
    """Identical rows (so one divergence) and a coarse grid of deltas: hundreds of scores equal τ, which
    alpha 0 and the lower interpolation make the median; all of them pass, in every block."""
    g = torch.Generator().manual_seed(13)
    row = torch.randn(40, generator=g, dtype=torch.float64)
    moves = torch.randint(-3, 4, (40,), generator=g).double() / 64
    base, expert = row.expand(30, 40).clone(), (row + moves).expand(30, 40).clone()
    sal, tau, mask = reference(base, expert, alpha=0.0, quantile_method="lower")
    at_tau = sal == tau
    assert at_tau.sum() > 100
    whole = run(SPEC["scf_rkl"], base, [expert], alpha=0.0, quantile_method="lower")
    assert torch.equal(whole[0], torch.where(torch.from_numpy(mask), expert, base))
    assert torch.equal(whole[0][torch.from_numpy(at_tau)], expert[torch.from_numpy(at_tau)])
    for rows in (1, 4, 30):
        assert_same(blockwise_fused(SPEC["scf_rkl"], base, [expert], rows, alpha=0.0, quantile_method="lower"),
                    whole)


@pytest.mark.parametrize("zero_fraction", [0.75, 0.8])
def test_mostly_zero_saliency_in_blocks(zero_fraction):
    """An expert equal to the base on 75 % (or more) of the elements: Q1 = median = 0, and τ = α Q3, which
    is 0 (every element passes) once Q3 falls among the zeros."""
    base, expert = pair((40, 50), seed=14, scale=0.2)
    g = torch.Generator().manual_seed(15)
    same = torch.randperm(2000, generator=g)[: int(zero_fraction * 2000)]
    expert.view(-1)[same] = base.view(-1)[same]
    sal, tau, mask = reference(base, expert)
    assert np.quantile(sal, 0.5) == 0.0
    whole = run(SPEC["scf_rkl"], base, [expert])
    assert whole[1]["threshold_0"] == pytest.approx(tau, rel=NEAR, abs=0.0)
    assert torch.equal(whole[0], torch.where(torch.from_numpy(mask), expert, base))
    for rows in (1, 6, 40):
        assert_same(blockwise_fused(SPEC["scf_rkl"], base, [expert], rows), whole)


@pytest.mark.parametrize("rule", MULTI_EXPERT_RULES)
def test_multi_expert_rules_in_blocks(rule):
    g = torch.Generator().manual_seed(16)
    base = torch.randn(36, 20, generator=g)
    experts = [base + s * torch.randn(36, 20, generator=g) for s in (0.05, 0.1, 0.2)]
    experts[2][:, :3] = experts[0][:, :3]  # two experts equal there: ties between them
    whole = run(SPEC["scf_rkl"], base, experts, multi_expert=rule)
    for rows in (1, 5, 36):
        assert_same(blockwise_fused(SPEC["scf_rkl"], base, experts, rows, multi_expert=rule), whole)
    hand = _hand_built()
    assert_same(blockwise_fused(SPEC["scf_rkl"], hand[0], list(hand[1:]), 3, multi_expert=rule),
                run(SPEC["scf_rkl"], hand[0], list(hand[1:]), multi_expert=rule))


def test_a_1d_row_in_pieces_keeps_its_one_divergence():
    """The engine's tiles cut a long 1-D tensor into pieces; its divergence is still that of the whole row."""
    base, expert = pair((300,), seed=17, scale=0.3)
    whole = run(SPEC["scf_rkl"], base, [expert])
    _, tau, mask = reference(base, expert)
    assert whole[1]["threshold_0"] == pytest.approx(tau, rel=NEAR)
    for rows in (1, 64, 299):
        assert_same(blockwise_fused(SPEC["scf_rkl"], base, [expert], rows), whole)


def test_a_non_finite_threshold_is_refused_in_blocks():
    base, expert = pair((10, 8), seed=18)
    expert[3, 2] = math.nan
    with pytest.raises(CheckpointError, match="threshold of expert 0"):
        blockwise_fused(SPEC["scf_rkl"], base, [expert], 3)


@pytest.mark.parametrize("method, params", [("scf_rkl", {}), ("scf_rkl", {"multi_expert": "mean"}),
                                            ("scf_kl", {"quantile_method": "midpoint"}), ("arcee_fusion", {})])
def test_streamed_merge_writes_the_same_bytes(tmp_path, method, params, monkeypatch):
    """The engine streaming every tensor in one-row blocks (several statistics passes each), and computing
    whole tensors in tiny tiles (1-D norms in pieces), writes the bytes and statistics of whole tensors."""
    base, experts = make_family(tmp_path / "models", 1 if method == "arcee_fusion" else 2, layers=2,
                                dtype=torch.bfloat16)
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16", "parameters": params,
              "models": [{"model": str(e)} for e in experts]}
    whole, outputs, observed = merges_in_pieces(recipe, tmp_path, monkeypatch)
    assert "model.layers.1.mlp.down_proj.weight" in observed
    reference_tensors = load_folder(whole)
    reference_stats = json.loads((whole / "mergelab.json").read_text())["tensors"]
    for out in outputs:
        tensors = load_folder(out)
        assert tensors.keys() == reference_tensors.keys()
        assert all(torch.equal(tensors[k], reference_tensors[k]) for k in tensors)
        stats = json.loads((out / "mergelab.json").read_text())["tensors"]
        for name, entry in stats.items():
            for key, value in entry.items():
                expected = reference_stats[name][key]
                if key.startswith("update_norm_ratio"):
                    assert value == pytest.approx(expected, rel=1e-6)
                else:
                    assert value == expected, (name, key)
    assert any(0 < e["selected_0"] < 0.5 for e in reference_stats.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bit_selection_is_torch_where(dtype):
    """The output pass selects through bit masks: the bits of torch.where, signed zeros, infinities, NaN."""
    g = torch.Generator().manual_seed(19)
    a = torch.randn(64, 33, generator=g).to(dtype)
    b = torch.randn(64, 33, generator=g).to(dtype)
    a[0, :4] = torch.tensor([-0.0, math.inf, -math.inf, math.nan], dtype=dtype)
    b[1, :4] = torch.tensor([-0.0, math.nan, 0.0, -math.inf], dtype=dtype)
    mask = torch.rand(64, 33, generator=g) < 0.3
    mask[:2] = True
    bits = bit_mask(mask, dtype)
    width = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(select(bits, a, b).view(width), torch.where(mask, a, b).view(width))
    kept = keep_(a.clone(), bits)
    assert torch.equal(kept.view(width), torch.where(mask, a, torch.zeros_like(a)).view(width))
