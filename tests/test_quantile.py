"""The exact quantile kernel against numpy.quantile: a 20-million-element tensor (above torch.quantile's 2^24
limit) for every interpolation, and small edge cases, including every selection path forced by tiny chunk
and gather sizes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mergelab.ops.quantile import INTERPOLATIONS, StreamedQuantiles, quantiles
from mergelab.ops.radix_selection import Selection
from mergelab.ops.sampled_selection import SampledSelection

QS = [0.0, 0.01, 0.25, 0.3, 0.5, 0.62, 0.75, 0.9, 0.97, 1.0]
DISCRETE = ("lower", "higher", "nearest")


@pytest.fixture(scope="module")
def big():
    """20M float32 values: a Gaussian bulk, 2M ties, and a 6M-wide cluster inside one 16-bit bucket (so one
    quantile needs a second histogram level, not just a gather)."""
    g = torch.Generator().manual_seed(7)
    parts = [torch.randn(12_000_000, generator=g), torch.full((2_000_000,), 0.3),
             1.0 + 1e-4 * torch.rand(6_000_000, generator=g)]
    x = torch.cat(parts)
    return x, x.numpy().astype(np.float64)


def test_big_tensor_is_beyond_torch_quantile(big):
    x, _ = big
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_big_tensor_matches_numpy(big, interpolation):
    x, x64 = big
    got = np.array(quantiles(x, QS, interpolation))
    # numpy on the same values in float64: identical order statistics and the same interpolation formula
    np.testing.assert_array_equal(got, np.quantile(x64, QS, method=interpolation))
    # numpy on the float32 values themselves interpolates in float32: equal up to that rounding
    expected32 = np.quantile(x.numpy(), QS, method=interpolation)
    if interpolation in DISCRETE:
        np.testing.assert_array_equal(got, expected32)
    else:
        np.testing.assert_allclose(got, expected32, rtol=2**-23, atol=0)


def test_big_float64_matches_numpy(big):
    x, x64 = big
    values = torch.from_numpy(x64) + torch.linspace(0, 1e-9, x64.size, dtype=torch.float64)
    np.testing.assert_array_equal(quantiles(values, QS), np.quantile(values.numpy(), QS))


def _check(values: torch.Tensor, qs, interpolation, **sizes):
    expected = np.quantile(values.double().numpy().ravel(), qs, method=interpolation)
    np.testing.assert_array_equal(quantiles(values, qs, interpolation, **sizes), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_single_element(dtype, interpolation):
    _check(torch.tensor([-2.5], dtype=dtype), [0.0, 0.5, 1.0], interpolation)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_all_ties(interpolation):
    for sizes in ({}, {"gather_limit": 3, "chunk_elements": 300}):
        assert quantiles(torch.full((1000,), 0.75), QS, interpolation, **sizes) == [0.75] * len(QS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("sizes", [{}, {"gather_limit": 1, "chunk_elements": 700}, {"gather_limit": 50}])
def test_mixed_signs_ties_and_zeros(dtype, interpolation, sizes):
    """gather_limit 1 pushes every rank through all 2 (float32) or 4 (float64) histogram levels."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3001, generator=g, dtype=torch.float64).to(dtype)
    x[::4] = x[5]
    x[1], x[2] = -0.0, 0.0
    _check(x, QS, interpolation, **sizes)


def test_infinities_with_discrete_interpolations():
    x = torch.tensor([3.0, -math.inf, 1.0, math.inf, -2.0, math.inf])
    for interpolation in DISCRETE:
        _check(x, QS, interpolation, gather_limit=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [{}, {"gather_limit": 1, "chunk_elements": 30}])
def test_nan_gives_nan_like_numpy(sizes, dtype):
    for bad in (math.nan, -math.nan):
        x = torch.arange(100, dtype=dtype)
        x[40] = bad
        assert all(math.isnan(v) for v in quantiles(x, [0.0, 0.5, 1.0], **sizes))


def test_half_precision_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 48, generator=g)
    _check(x.to(torch.bfloat16), QS, "linear")
    _check(x.t(), QS, "midpoint", gather_limit=10)


def test_bad_arguments():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="cubic"):
        quantiles(x, [0.5], "cubic")
    with pytest.raises(ValueError, match="empty"):
        quantiles(torch.ones(0), [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantiles(x, [1.5])
    with pytest.raises(TypeError):
        quantiles(torch.ones(4, dtype=torch.int64), [0.5])


@settings(max_examples=100, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 100), elements=st.floats(width=32, allow_nan=False,
                                                                        allow_infinity=False)),
       qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
       interpolation=st.sampled_from(INTERPOLATIONS),
       gather_limit=st.sampled_from([1, 16, 1 << 22]), chunk_elements=st.sampled_from([30, 1 << 22]))
def test_property_matches_numpy(values, qs, interpolation, gather_limit, chunk_elements):
    _check(torch.from_numpy(values), qs, interpolation, gather_limit=gather_limit, chunk_elements=chunk_elements)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5_000_000, generator=g).abs_()
    for interpolation in INTERPOLATIONS:
        assert quantiles(x.cuda(), QS, interpolation) == quantiles(x, QS, interpolation)


def _selected(selection, values: torch.Tensor, block: int) -> int:
    passes = 0
    while not selection.done:
        for start in range(0, values.numel(), block):
            selection.feed(values[start:start + block])
        selection.end_pass()
        passes += 1
    return passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_selection_is_exact_and_falls_back_when_the_sample_misleads(dtype):
    rng = np.random.default_rng(11)
    n = 6100
    data = {"normal": rng.normal(size=n), "ties": rng.integers(0, 5, n) * 0.5,
            # every 61st value (all the strided sample sees) is an outlier: the brackets miss
            "periodic": np.where(np.arange(n) % 61 == 0, 100.0, rng.normal(size=n))}
    ranks = [0, 17, 3050, 4270, n - 1]
    for kind, values in data.items():
        x = torch.tensor(values, dtype=dtype)
        ordered = np.sort(x.numpy())
        for block in (97, n):
            selection = SampledSelection(n, ranks, gather_limit=16)
            passes = _selected(selection, x, block)
            assert (passes > 2) == (kind == "periodic"), (kind, passes)
            radix = Selection(n, ranks, gather_limit=16)
            _selected(radix, x, block)
            for rank in ranks:
                value = ordered[rank]
                found = selection.found[rank]
                assert (found.value, found.below, found.equal) == (
                    value, np.count_nonzero(ordered < value), np.count_nonzero(ordered == value))
                assert found == radix.found[rank]


def test_sampled_selection_reports_nan():
    x = torch.randn(5000)
    x[4321] = float("nan")
    selection = SampledSelection(x.numel(), [2500], gather_limit=16)
    _selected(selection, x, 1000)
    assert selection.nan


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_streamed_quantiles_in_blocks_equal_numpy(interpolation):
    """The quantiles of values fed in blocks, through either selection (brackets shared by neighbouring ranks,
    ties, a tensor that is 80 % zeros), are numpy.quantile's."""
    rng = np.random.default_rng(5)
    n = 9000
    cases = {"normal": rng.normal(size=n), "ties": rng.integers(0, 4, n) * 0.25,
             "mostly zero": np.where(rng.random(n) < 0.8, 0.0, rng.random(n))}
    selections = {"radix": lambda numel, ranks: Selection(numel, ranks, gather_limit=16),
                  "sampled": lambda numel, ranks: SampledSelection(numel, ranks, gather_limit=16)}
    for kind, values in cases.items():
        x = torch.tensor(values, dtype=torch.float32)
        expected = np.quantile(x.numpy().astype(np.float64), QS, method=interpolation)
        for name, selection in selections.items():
            streamed = StreamedQuantiles(n, QS, interpolation, selection)
            while not streamed.done:
                for start in range(0, n, 700):
                    streamed.feed(x[start : start + 700])
                streamed.end_pass()
            assert streamed.values == list(expected), (kind, name)
