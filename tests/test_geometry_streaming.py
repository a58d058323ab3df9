"""SLERP, NuSLERP, Model Stock, Multi-SLERP and Karcher streamed in row blocks (issue 19): the Gram matrix of the
statistics pass does not depend on how a tensor is split, so blocks, tiles and whole tensors give the same bytes,
and the special cases (zero task vectors, (anti)parallel inputs) take the same branch in every block.

References: exact rational arithmetic (``fractions``) for the Gram sums; the whole-tensor path (``TwoPass.whole``,
itself checked against float64 numpy re-implementations in ``test_geometry.py`` and against mergekit in
``test_geometry_mergekit.py``) for the blocks; hand-derived values for the special cases.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import assert_same_outputs, make_family, merges_in_pieces

from mergelab.methods.registry import METHODS
from mergelab.methods.spec import MethodCall, TensorInfo
from mergelab.ops.row_gram import RowGram, pairwise_row_sums, row_dots

INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 2)
SETTINGS = [("slerp", {"t": 0.3}), ("model_stock", {"filter_wise": False}), ("model_stock", {"filter_wise": True}),
            ("multislerp", {"weight": [1.0, 0.5, 2.0]}), ("multislerp", {"weight": [1.0, 0.5, 2.0],
                                                                          "normalize_weights": False}),
            ("karcher", {"tol": 1e-9, "max_iter": 50}), ("karcher", {"weight": [0.2, 0.0, 0.8], "step_size": 0.5}),
            ("karcher", {"fisher_precondition": "diagonal", "tol": 1e-9, "max_iter": 50})]


@pytest.fixture
def torch_threads():
    """Run with a given torch thread count, restoring the process's afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    return sum((Fraction(x) * Fraction(y) for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())),
               Fraction(0))


# --- the Gram sums ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [7, 1536, 40_000])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_dots_depend_on_the_row_alone(width, threads, torch_threads):
    """A row's float64 dot is the same alone, in a block of rows or among all of them, on one or two threads
    (torch splits a lone 40000-wide sum between threads; ``row_dots`` never gives it a lone one)."""
    torch_threads(threads)
    g = torch.Generator().manual_seed(width)
    vectors = [torch.randn(9, width, generator=g) for _ in range(3)]
    whole = row_dots(vectors)
    alone = torch.cat([row_dots([v[r : r + 1] for v in vectors]) for r in range(9)])
    blocks = torch.cat([row_dots([v[a : a + 4] for v in vectors]) for a in range(0, 9, 4)])
    assert torch.equal(alone, whole) and torch.equal(blocks, whole)
    for r in (0, 8):  # within float64 rounding of the exact dot product of the float32 rows
        for e, (i, j) in enumerate([(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]):
            exact = exact_dot(vectors[i][r], vectors[j][r])
            assert abs(Fraction(float(whole[r, e])) - exact) <= 1e-14 * abs(exact) + Fraction(1, 10 ** 30)


@pytest.mark.parametrize("width", [1, 7, 1536, 40_001])
def test_pairwise_row_sums_depend_on_the_row_alone(width):
    """The device-independent sums (used off the CPU): a row alone or among others, the same bits, within
    rounding of the exact sum."""
    g = torch.Generator().manual_seed(width)
    values = torch.randn(2, 6, width, generator=g, dtype=torch.float64)
    together = pairwise_row_sums(values.clone())
    alone = torch.stack([torch.stack([pairwise_row_sums(values[e, r : r + 1].clone())[0] for r in range(6)])
                         for e in range(2)])
    assert torch.equal(together, alone)
    for r in range(6):
        exact = sum((Fraction(v) for v in values[1, r].tolist()), Fraction(0))
        assert abs(Fraction(float(together[1, r])) - exact) <= 1e-12 * sum(abs(v) for v in values[1, r].tolist())
    assert pairwise_row_sums(torch.zeros(3, 0, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


def test_a_1d_total_is_the_exact_dot_product_correctly_rounded_in_any_pieces():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1000, generator=g) * 1e3, torch.randn(1000, generator=g) * 1e-3
    expected = [float(exact_dot(x, y)) for x, y in ((a, a), (a, b), (b, b))]
    for piece in (1, 7, 1000):
        gram = RowGram(2, (1000,))
        for start in range(0, 1000, piece):
            gram.add([a[start : start + piece], b[start : start + piece]])
        total = gram.total()
        assert [float(total[0, 0]), float(total[0, 1]), float(total[1, 1])] == expected
        assert float(total[1, 0]) == expected[1]


def test_a_matrix_total_does_not_depend_on_the_blocks():
    g = torch.Generator().manual_seed(4)
    vectors = [torch.randn(50, 30, generator=g) for _ in range(3)]
    totals = []
    for rows in (1, 3, 50):
        gram = RowGram(3, (50, 30))
        for start in range(0, 50, rows):
            gram.add([v[start : start + rows] for v in vectors])
        totals.append(gram.total())
        assert torch.equal(gram.per_row()[7], _one_row(vectors, 7))
    assert torch.equal(totals[0], totals[1]) and torch.equal(totals[0], totals[2])
    exact = exact_dot(vectors[0], vectors[2])
    assert abs(Fraction(float(totals[0][0, 2])) - exact) <= 1e-14 * abs(exact)


def _one_row(vectors, r):
    gram = RowGram(len(vectors), (1, vectors[0].shape[1]))
    gram.add([v[r : r + 1] for v in vectors])
    return gram.per_row()[0]


# --- the methods in blocks ---------------------------------------------------------------------------------------


def inputs(name: str, shape, dtype=torch.float32, seed=0):
    """A base and the method's experts (one for slerp, two for nuslerp, three otherwise), near the base as
    fine-tunes are; Karcher ignores the base, so gets None."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    shared = 0.1 * torch.randn(shape, generator=g, dtype=dtype)
    count = {"slerp": 1, "nuslerp": 2}.get(name, 3)
    experts = [base + shared + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]
    return (None if name == "karcher" else base), experts


def extras(params, shape, seed=0):
    """A Fisher (some entries zero) where the recipe asks for the diagonal metric, as the prepare pass gives it."""
    if params.get("fisher_precondition") != "diagonal":
        return {}
    g = torch.Generator().manual_seed(seed + 100)
    return {"fisher": torch.rand(shape, generator=g) ** 4 * (torch.rand(shape, generator=g) > 0.2)}


def whole(name, base, experts, **params):
    spec = METHODS[name]
    out = spec.fn(spec.call_with(base, experts, INFO, **params))
    return out if isinstance(out, tuple) else (out, {})


def blockwise(name, base, experts, rows, **params):
    """The engine's protocol on ``rows``-row blocks (elements of a 1-D tensor): the statistics pass, then the
    output pass, each block a fresh copy (the engine reuses its buffers), the prepare pass's extras whole."""
    spec = METHODS[name]
    call = spec.call_with(base, experts, INFO, **params)
    reference = experts[0]
    n = reference.shape[0] if reference.dim() else 1
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    state = spec.two_pass.start(INFO, call.params, tuple(reference.shape), None)

    def block_call(a, b):
        take = (lambda t: t[a:b].clone()) if reference.dim() else (lambda t: t.clone())
        return MethodCall(None if base is None else take(base), [take(e) for e in experts], INFO, call.params,
                          None, call.extras)

    while not state.done:
        for a, b in blocks:
            state.observe(block_call(a, b))
        state.end_pass()
    outputs = [spec.two_pass.block(block_call(a, b), state) for a, b in blocks]
    outputs = [o if isinstance(o, tuple) else (o, {}) for o in outputs]
    merged = torch.cat([m.reshape(-1) for m, _ in outputs]).reshape(reference.shape)
    return merged, outputs[-1][1]


def assert_blocks_match(name, base, experts, **params):
    reference = whole(name, base, experts, **params)
    rows_total = experts[0].shape[0] if experts[0].dim() else 1
    for rows in sorted({1, 3, 7, rows_total}):
        merged, stats = blockwise(name, base, experts, rows, **params)
        assert torch.equal(merged, reference[0]), (name, params, rows)
        assert stats == reference[1], (name, params, rows)
    return reference


@pytest.mark.parametrize("name, params", SETTINGS)
@pytest.mark.parametrize("shape", [(64, 48), (3, 8, 20), (96,), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_give_the_same_bits_as_the_whole_tensor(name, params, shape, dtype):
    base, experts = inputs(name, shape, dtype, seed=len(shape))
    merged, stats = assert_blocks_match(name, base, experts, **params, **extras(params, shape, len(shape)))
    assert merged.dtype == dtype
    if name == "slerp" and shape:  # (one number has the direction of any other of its sign)
        assert stats["slerp_linear"] == 0.0
    if name == "model_stock" and shape:
        assert 0 < stats["model_stock_t"] < 1 and stats["model_stock_guarded"] == 0.0
    if name == "karcher" and "tol" in params:
        assert stats["karcher_converged"] == 1.0


@pytest.mark.parametrize("name, params", SETTINGS)
def test_an_empty_tensor_stays_empty(name, params):
    base, experts = inputs(name, (0, 4))
    merged, _ = whole(name, base, experts, **params, **extras(params, (0, 4)))
    assert merged.shape == (0, 4)


NUSLERP_STREAMED = [{"weight": [0.3, 0.7]}, {"weight": [1.0, 2.0], "nuslerp_flatten": False},
                    {"weight": [1.0, -1.0], "nuslerp_flatten": False}]


@pytest.mark.parametrize("params", NUSLERP_STREAMED)
@pytest.mark.parametrize("shape", [(64, 48), (96,), ()])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_blocks_give_the_same_bits_as_the_whole_tensor(params, shape, with_base):
    """The whole tensor flattened and the rows of a matrix stream: every block split gives the whole tensor's
    bytes (a 1-D tensor's one vector is the whole of it, as without ``nuslerp_flatten``)."""
    base, experts = inputs("nuslerp", shape, seed=len(shape))
    assert_blocks_match("nuslerp", base if with_base else None, experts, **params)


def straight_nuslerp(t, a, b, vectors_of):
    """Shoemake's SLERP in float64, one pair of vectors at a time: ``vectors_of(x)`` lists a tensor's vectors as
    index tuples into it."""
    out = torch.empty_like(a, dtype=torch.float64)
    for index in vectors_of(a):
        x, y = a[index].double(), b[index].double()
        cos = torch.dot(x, y) / (x.norm().clamp(min=1e-7) * y.norm().clamp(min=1e-7))
        theta = torch.arccos(cos.clamp(-1, 1))
        out[index] = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    return out


@pytest.mark.parametrize("layout, shape", [("tensor", (6, 5)), ("rows", (6, 5)), ("columns", (6, 5)),
                                           ("rows", (3, 4, 5)), ("columns", (3, 4, 5)), ("rows", (7,))])
def test_nuslerp_is_slerp_of_each_vector(layout, shape):
    """Against a float64 SLERP of each vector on its own: the whole tensor, each vector along the last dimension,
    or each along the first (columns), about the base; 1-D tensors have one vector in every layout but columns."""
    g = torch.Generator().manual_seed(len(shape))
    base, a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    params = {"weight": [2.0, 1.0], "nuslerp_flatten": layout == "tensor", "nuslerp_row_wise": layout == "columns"}
    merged, _ = whole("nuslerp", base, [a, b], **params)
    if layout == "tensor":
        expected = straight_nuslerp(1 / 3, (a - base).reshape(-1), (b - base).reshape(-1),
                                    lambda x: [(slice(None),)]).reshape(shape)
    else:
        along = {"rows": [(*i, slice(None)) for i in np.ndindex(*shape[:-1])],
                 "columns": [(slice(None), *i) for i in np.ndindex(*shape[1:])]}[layout]
        expected = straight_nuslerp(1 / 3, a - base, b - base, lambda x: along)
    torch.testing.assert_close(merged, base + expected, rtol=1e-12, atol=1e-12)


def test_nuslerp_special_cases_in_blocks():
    """Equal task vectors (parallel: linear, so the shared task vector), opposite ones (antiparallel: linear, so
    (1 - 2t) of the first), a zero one (no direction: cos θ = 0, so the other scaled by sin(tπ/2)), row by row."""
    g = torch.Generator().manual_seed(12)
    base, delta = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(20, 6, generator=g,
                                                                                    dtype=torch.float64)
    for flatten in (True, False):
        params = {"weight": [0.75, 0.25], "nuslerp_flatten": flatten}
        merged, _ = assert_blocks_match("nuslerp", base, [base + delta, base + delta], **params)
        torch.testing.assert_close(merged, base + delta, rtol=0, atol=1e-15)
        merged, _ = assert_blocks_match("nuslerp", base, [base + delta, base - delta], **params)
        torch.testing.assert_close(merged, base + 0.5 * delta, rtol=0, atol=1e-15)
        merged, _ = assert_blocks_match("nuslerp", base, [base.clone(), base + delta], **params)
        torch.testing.assert_close(merged, base + math.sin(0.25 * math.pi / 2) * delta, rtol=1e-15, atol=1e-15)


def test_nuslerp_columns_refuse_a_block():
    """Column mode needs every row: its statistics pass refuses a part of the tensor (the engine never gives one,
    ``needs_whole``)."""
    base, experts = inputs("nuslerp", (12, 5))
    with pytest.raises(ValueError, match="whole tensor"):
        blockwise("nuslerp", base, experts, 4, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)


def test_multislerp_without_a_base_in_blocks():
    _, experts = inputs("multislerp", (40, 12), seed=5)
    assert_blocks_match("multislerp", None, experts, weight=[0.2, 1.0, 0.7])
    assert torch.equal(blockwise("multislerp", None, experts[:1], 3)[0], experts[0])


def test_zero_task_vectors_give_the_base_in_blocks():
    base = torch.randn(30, 10, generator=torch.Generator().manual_seed(6))
    same = [base.clone() for _ in range(3)]
    for params in ({"filter_wise": False}, {"filter_wise": True}):
        merged, stats = assert_blocks_match("model_stock", base, same, **params)
        assert torch.equal(merged, base) and stats["model_stock_t"] == 0.0
    merged, _ = assert_blocks_match("multislerp", base, same)
    assert torch.equal(merged, base)
    # a base of zeros has no direction: slerp is linear
    expert = torch.randn(30, 10, generator=torch.Generator().manual_seed(7))
    merged, stats = assert_blocks_match("slerp", torch.zeros(30, 10), [expert], t=0.25)
    assert torch.equal(merged, 0.25 * expert) and stats == {"slerp_linear": 1.0}


@pytest.mark.parametrize("factor", [3.0, -2.0])
def test_parallel_and_antiparallel_slerp_is_linear_in_blocks(factor):
    base = torch.randn(25, 9, generator=torch.Generator().manual_seed(8))
    merged, stats = assert_blocks_match("slerp", base, [factor * base], t=0.4)
    assert stats["slerp_linear"] == 1.0
    assert stats["slerp_angle"] == pytest.approx(0.0 if factor > 0 else math.pi, abs=1e-6)
    assert torch.equal(merged, 0.6 * base + 0.4 * (factor * base))


def test_model_stock_guard_and_identical_experts_in_blocks():
    g = torch.Generator().manual_seed(9)
    base, delta = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    # opposite task vectors: cos θ = -1, so 1 + (N - 1) cos θ = 0 and the base is kept, row by row too
    for params in ({"filter_wise": False}, {"filter_wise": True}):
        merged, stats = assert_blocks_match("model_stock", base, [base + delta, base - delta], **params)
        assert torch.equal(merged, base) and stats["model_stock_guarded"] == 1.0
    # identical experts: cos θ = 1, t = 1, so the expert (the mean of two equal task vectors)
    merged, stats = assert_blocks_match("model_stock", base, [base + delta, base + delta])
    assert stats["model_stock_t"] == 1.0
    torch.testing.assert_close(merged, base + delta, rtol=0, atol=1e-6)


def test_multislerp_antipodal_pair_in_blocks():
    a = torch.randn(16, 5, generator=torch.Generator().manual_seed(10))
    merged, _ = assert_blocks_match("multislerp", None, [a, -a])
    assert not merged.any()


# --- through the engine ----------------------------------------------------------------------------------------

SPECIAL = {"zero": "model.layers.0.mlp.up_proj.weight", "parallel": "model.layers.1.self_attn.q_proj.weight",
           "opposite": "model.layers.1.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and two experts; on three tensors the experts are made special: equal to the base (zero task
    vectors), the first expert 3x the base (parallel to it), and opposite task vectors (on a grid of 1/64, so
    exact in bf16)."""
    base, experts = make_family(tmp_path_factory.mktemp("geometry_streaming"), 2, layers=2, dtype=torch.bfloat16)
    base_tensors = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    shape = base_tensors[SPECIAL["opposite"]].shape
    grid, step = torch.randint(-8, 9, shape, generator=g) / 64, torch.randint(1, 5, shape, generator=g) / 64
    base_tensors[SPECIAL["opposite"]] = grid.to(torch.bfloat16)
    save_file(base_tensors, base / "model.safetensors", metadata={"format": "pt"})
    for i, folder in enumerate(experts):
        tensors = load_file(folder / "model.safetensors")
        tensors[SPECIAL["zero"]] = base_tensors[SPECIAL["zero"]].clone()
        tensors[SPECIAL["opposite"]] = (grid + step if i == 0 else grid - step).to(torch.bfloat16)
        if i == 0:
            tensors[SPECIAL["parallel"]] = (3 * base_tensors[SPECIAL["parallel"]]).contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return base, experts


ENGINE_CASES = {
    "slerp": lambda b, e: {"merge_method": "slerp", "base_model": str(b), "parameters": {"t": 0.3},
                           "models": [{"model": str(b)}, {"model": str(e[0])}]},
    "model_stock": lambda b, e: {"merge_method": "model_stock", "base_model": str(b),
                                 "models": [{"model": str(b)}] + [{"model": str(x)} for x in e]},
    "model_stock_rows": lambda b, e: {"merge_method": "model_stock", "base_model": str(b),
                                      "parameters": {"filter_wise": True},
                                      "models": [{"model": str(b)}] + [{"model": str(x)} for x in e]},
    "multislerp": lambda b, e: {"merge_method": "multislerp", "base_model": str(b),
                                "models": [{"model": str(x), "parameters": {"weight": w}} for x, w in zip(e, (1, 3))]},
    "multislerp_no_base": lambda b, e: {"merge_method": "multislerp",
                                        "models": [{"model": str(x)} for x in (b, *e)]},
    "nuslerp": lambda b, e: {"merge_method": "nuslerp", "base_model": str(b),
                             "models": [{"model": str(x), "parameters": {"weight": w}} for x, w in zip(e, (1, 3))]},
    "nuslerp_rows": lambda b, e: {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                  "models": [{"model": str(x), "parameters": {"weight": 1}} for x in e]},
    "karcher": lambda b, e: {"merge_method": "karcher", "parameters": {"tol": 1e-7, "max_iter": 30},
                             "models": [{"model": str(x)} for x in (b, *e)]},
    "karcher_fisher": lambda b, e: {"merge_method": "karcher", "parameters": {"fisher_precondition": "diagonal"},
                                    "models": [{"model": str(x), "parameters": {"weight": w}}
                                               for x, w in zip((b, *e), (1, 2, 3))]},
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_streamed_merge_writes_the_same_bytes(family, tmp_path, case, monkeypatch):
    """Whole tensors in one tile; tiny tiles (1-D norms in pieces, matrices a row at a time); every tensor
    streamed in row blocks from disk: the same shard bytes and the same per-tensor statistics."""
    base, experts = family
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))  # the Fisher, computed once for the four merges
    recipe = {**ENGINE_CASES[case](base, experts), "dtype": "bfloat16"}
    reference, outputs, observed = merges_in_pieces(recipe, tmp_path, monkeypatch, tiles=(8, 40))
    assert SPECIAL["opposite"] in observed  # the last merge read it in blocks, once per pass
    stats = assert_same_outputs(reference, outputs)
    if case.startswith("model_stock"):
        assert stats[SPECIAL["zero"]]["model_stock_t"] == 0.0
        assert stats[SPECIAL["zero"]]["changed_from_base"] == 0.0
        assert stats[SPECIAL["opposite"]]["model_stock_guarded"] == 1.0
    if case == "slerp":
        assert stats[SPECIAL["parallel"]]["slerp_linear"] == 1.0
        assert stats[SPECIAL["opposite"]]["slerp_linear"] == 0.0
    if case == "multislerp":
        assert stats[SPECIAL["zero"]]["changed_from_base"] == 0.0
