"""SCE streamed in row blocks (issue 19): the selection is the first ``floor(select_topk · n)`` entries of a
stable descending sort of the variances, found over blocks; the weights' sums of squares do not depend on the
blocks; so blocks, tiles and whole tensors give the same bytes.

References: a stable ``numpy.argsort`` of the variances (numpy's own ``var`` where the data make it exact, the
code's variances otherwise) for the selection; exact rational arithmetic (``fractions``) for the weights; the
whole-tensor path (``TwoPass.whole``, itself checked against a float64 numpy re-implementation in
``test_geometry.py`` and against mergekit in ``test_geometry_mergekit.py``) for the blocks and the engine.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_geometry_streaming import INFO, assert_blocks_match, whole
from tinymodels import assert_same_outputs, make_family, merges_in_pieces

from mergelab.methods import sce
from mergelab.methods.spec import MethodCall

FRACTIONS = (0.0, 0.05, 0.3, 0.5, 0.99, 1.0)


def task_vectors(shape, count, integers, seed=0, dtype=torch.float32):
    """A base and ``count`` experts: small integer task vectors (many equal variances) or normal ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    if integers:
        deltas = [torch.randint(-2, 3, shape, generator=g).to(dtype) for _ in range(count)]
    else:
        deltas = [0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]
    return base, deltas


def streamed_mask(deltas, fraction, rows):
    """The selection as the state gives it over ``rows``-row blocks (elements of a 1-D tensor), after its
    statistics passes over the same blocks."""
    shape = tuple(deltas[0].shape)
    n = shape[0] if shape else 1
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    base = torch.zeros(shape)
    state = sce.Selection(INFO, {"select_topk": fraction}, shape, None)

    def call(a, b):
        take = (lambda t: t[a:b].clone()) if shape else (lambda t: t.clone())
        return MethodCall(take(base), [take(base + d) for d in deltas], INFO, {})

    while not state.done:
        for a, b in blocks:
            state.observe(call(a, b))
        state.end_pass()
    masks = [state.mask([e - c.base for e in c.experts]) for c in (call(a, b) for a, b in blocks)]
    return torch.cat([m.reshape(-1) for m in masks]).bool().numpy()


def sorted_mask(variances: np.ndarray, fraction: float) -> np.ndarray:
    """The first ``floor(fraction · n)`` entries of a stable descending sort (n: non-zero variances)."""
    flat = variances.reshape(-1)
    keep = flat.size if fraction >= 1 else int(fraction * np.count_nonzero(flat))
    mask = np.zeros(flat.size, bool)
    mask[np.argsort(-flat, kind="stable")[:keep]] = True
    return mask


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("shape", [(40, 30), (300, 256), (97,)])
def test_selection_of_tied_variances_is_a_stable_descending_sort(shape, count):
    """Integer task vectors of 2 or 4 models: their variances are exact in float32 (numpy's float64 ``var``
    gives the same numbers) and mostly tied; (300, 256) takes the sampled selection's path (over 2^16)."""
    _, deltas = task_vectors(shape, count, integers=True, seed=count)
    variances = np.stack([d.numpy() for d in deltas]).astype(np.float64).var(axis=0)
    assert np.array_equal(sce.variance(deltas).numpy(), variances)
    for fraction in FRACTIONS:
        expected = sorted_mask(variances, fraction)
        for rows in (1, 7, shape[0]):
            got = streamed_mask(deltas, fraction, rows)
            np.testing.assert_array_equal(got, expected, err_msg=f"{shape} {fraction} {rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_of_real_variances_is_a_stable_descending_sort(dtype):
    _, deltas = task_vectors((50, 33), 3, integers=False, seed=3, dtype=dtype)
    variances = sce.variance(deltas).numpy()
    for fraction in FRACTIONS:
        for rows in (1, 9, 50):
            np.testing.assert_array_equal(streamed_mask(deltas, fraction, rows), sorted_mask(variances, fraction))


SETTINGS = [{"select_topk": f, "variant": v} for f in (0.0, 0.3, 1.0) for v in ("mergekit", "fusechat")]


@pytest.mark.parametrize("params", SETTINGS + [{"select_topk": 0.3, "int8_mask": True}])
@pytest.mark.parametrize("shape", [(64, 48), (3, 8, 20), (96,), ()])
@pytest.mark.parametrize("integers", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_give_the_same_bits_as_the_whole_tensor(params, shape, integers, dtype):
    base, deltas = task_vectors(shape, 3, integers, seed=len(shape), dtype=dtype)
    experts = [base + d for d in deltas]
    merged, stats = assert_blocks_match("sce", base, experts, **params)
    assert merged.dtype == dtype
    numel = int(np.prod(shape))
    if params["select_topk"] < 1:
        nonzero = int(torch.count_nonzero(sce.variance([e - base for e in experts])))
        assert stats["sce_selected_fraction"] == int(params["select_topk"] * nonzero) / numel
    assert sum(stats[f"sce_weight_{i}"] for i in range(3)) == pytest.approx(1.0, abs=1e-15)


def test_int8_mask_changes_nothing():
    base, deltas = task_vectors((30, 20), 3, integers=True, seed=4)
    experts = [base + d for d in deltas]
    without, _ = whole("sce", base, experts, select_topk=0.3)
    with_mask, _ = whole("sce", base, experts, select_topk=0.3, int8_mask=True)
    assert torch.equal(without, with_mask)


def test_zero_variance_and_zero_task_vectors_in_blocks():
    base, deltas = task_vectors((20, 12), 1, integers=False, seed=5)
    same = [base + deltas[0] for _ in range(2)]  # (with three, δ̄ = (δ + δ + δ) / 3 may round away from δ)
    # every variance is zero, so a fraction below 1 selects nothing: mergekit's variant keeps the base, FuseChat's
    # (the selection only sets the weights, equal here) gives the expert; a fraction of 1 selects everything
    for fraction, variant, expected in ((0.5, "mergekit", base), (0.5, "fusechat", same[0]),
                                        (1.0, "mergekit", same[0])):
        merged, stats = assert_blocks_match("sce", base, same, select_topk=fraction, variant=variant)
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
        assert stats["sce_weight_0"] == 0.5
    merged, stats = assert_blocks_match("sce", base, [base.clone(), base.clone()], select_topk=1.0)
    assert torch.equal(merged, base) and stats["sce_weight_1"] == 0.5


def test_one_expert_and_an_empty_tensor():
    base, deltas = task_vectors((10, 6), 1, integers=False, seed=6)
    merged, stats = assert_blocks_match("sce", base, [base + deltas[0]], select_topk=1.0)
    assert torch.equal(merged, base + deltas[0]) and stats["sce_weight_0"] == 1.0
    empty, _ = whole("sce", torch.zeros(0, 4), [torch.zeros(0, 4)] * 2, select_topk=0.5)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("shape", [(61, 17), (250,)])
def test_weights_are_the_exact_mean_squares_of_the_selection(shape):
    """η_i = S_i / Σ_j S_j, S_i = Σ δ_i² over the selection: within float64 rounding of the exact rational value,
    the same in any blocks (the stats compared by ``assert_blocks_match``)."""
    base, deltas = task_vectors(shape, 3, integers=False, seed=7)
    experts = [base + d for d in deltas]
    _, stats = assert_blocks_match("sce", base, experts, select_topk=0.4)
    deltas = [e - base for e in experts]
    keep = torch.from_numpy(sorted_mask(sce.variance(deltas).numpy(), 0.4))
    sums = [sum((Fraction(x) ** 2 for x in d.reshape(-1)[keep].tolist()), Fraction(0)) for d in deltas]
    for i, s in enumerate(sums):
        exact = s / sum(sums)
        assert abs(Fraction(stats[f"sce_weight_{i}"]) - exact) <= Fraction(1, 10 ** 15) * exact


# --- through the engine ----------------------------------------------------------------------------------------

TIED = "model.layers.1.mlp.down_proj.weight"
SAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and two experts; on one tensor the task vectors are small integers over 16 (many tied
    variances), on another both experts equal the base (all variances zero)."""
    base, experts = make_family(tmp_path_factory.mktemp("sce_streaming"), 2, layers=2, dtype=torch.bfloat16)
    base_tensors = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(12)
    shape = base_tensors[TIED].shape
    grid = torch.randint(-8, 9, shape, generator=g) / 16
    base_tensors[TIED] = grid.to(torch.bfloat16)
    save_file(base_tensors, base / "model.safetensors", metadata={"format": "pt"})
    for folder in experts:
        tensors = load_file(folder / "model.safetensors")
        tensors[TIED] = (grid + torch.randint(-2, 3, shape, generator=g) / 16).to(torch.bfloat16)
        tensors[SAME] = base_tensors[SAME].clone()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return base, experts


@pytest.mark.parametrize("params", [{"select_topk": 0.3}, {"select_topk": 0.7, "variant": "fusechat"},
                                    {"select_topk": 1.0}, {"select_topk": 0.0, "int8_mask": True}])
def test_streamed_merge_writes_the_same_bytes(family, tmp_path, params, monkeypatch):
    """Whole tensors in one tile; tiny tiles (1-D norms in pieces, matrices a row at a time); every tensor
    streamed in row blocks from disk: the same shard bytes and the same per-tensor statistics."""
    base, experts = family
    recipe = {"merge_method": "sce", "base_model": str(base), "dtype": "bfloat16", "parameters": params,
              "models": [{"model": str(x)} for x in experts]}
    reference, outputs, observed = merges_in_pieces(recipe, tmp_path, monkeypatch, tiles=(8, 40))
    assert (TIED in observed) == (0 < params["select_topk"])  # statistics passes read in blocks where there are any
    stats = assert_same_outputs(reference, outputs)
    if 0 < params["select_topk"] < 1:
        assert 0 < stats[TIED]["sce_selected_fraction"] < params["select_topk"]  # tied zeros are never taken
        assert stats[SAME]["sce_selected_fraction"] == 0.0
    if params.get("variant", "mergekit") == "mergekit":
        assert stats[SAME]["changed_from_base"] == 0.0
