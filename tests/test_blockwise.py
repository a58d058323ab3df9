"""Row-block computation of the TwoPass methods (the task-arithmetic family): bit-identical to whole tensors.

The TIES trim and Breadcrumbs take per-tensor ranks of |delta| (ties at the threshold in position order), DARE and
DELLA draw seeded masks and rescale to the L1 norm; streamed in row blocks, with statistics passes before the
output pass, the result must be exactly the same bytes. The references for the masks are stable sorts in numpy;
for the L1 norm, exact rational sums.
"""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import load_folder, make_family

import mergelab.ops.rank_window as rank_window
from mergelab.api import merge
from mergelab.errors import CheckpointError, RecipeError
from mergelab.methods.registry import METHODS
from mergelab.methods.spec import MethodCall, TensorInfo
from mergelab.ops.l1_norm import L1Norm
from mergelab.ops.radix_selection import Selection
from mergelab.ops.rank_window import RankWindow
from mergelab.ops.sparsify import magnitude_window, outlier_window
from mergelab.stream.options import MergeOptions
from mergelab.stream.schedule import execution

INFO = TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 2)
FAMILY = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
          "breadcrumbs_ties")
# per-method settings: per-expert densities (one at 1: no trim, no draws), a second election, both rescales
SETTINGS = {
    "task_arithmetic": [{"normalize": True}],
    "ties": [{"density": [0.3, 0.55, 1.0]}, {"density": 0.1, "sign_election": "count", "vote": "weighted"}],
    "dare_linear": [{"density": [0.3, 1.0, 0.6]}, {"density": 0.5, "rescale_mode": "inverse_density"},
                    {"density": 0.4, "rescale": False}],
    "dare_ties": [{"density": [0.7, 0.2, 0.45]}],
    "della": [{"density": [0.4, 0.5, 1.0], "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.3, "rescale": False}],
    "della_linear": [{"density": 0.6, "epsilon": 0.2, "rescale_mode": "inverse_density"}],
    "breadcrumbs": [{"density": [0.5, 0.9, 0.3], "gamma": [0.1, 0.05, 0.6]}],
    "breadcrumbs_ties": [{"density": 0.4, "gamma": 0.2}],
}


def tied_tensors(seed: int, dtype: torch.dtype, shape=(23, 11)):
    """A base and three experts whose task vectors hold many exactly equal magnitudes (a coarse grid of values,
    as bf16 checkpoints give), some exact zeros, and one expert equal to the base in a whole row."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-4, 5, shape, generator=g).to(dtype) / 4
    experts = [base + torch.randint(-3, 4, shape, generator=g).to(dtype) / 8 for _ in range(3)]
    experts[1][5] = base[5]
    return base, experts


def blockwise(spec, call: MethodCall, rows: int) -> torch.Tensor:
    """The engine's protocol on ``rows``-row blocks: statistics passes over every block, then the output."""
    n = call.base.shape[0]
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    state = spec.two_pass.start(call.info, call.params, tuple(call.base.shape), call.generator)

    def block_call(a, b):
        return MethodCall(call.base[a:b], [e[a:b] for e in call.experts], call.info, call.params)

    while not state.done:
        for a, b in blocks:
            state.observe(block_call(a, b))
        state.end_pass()
    return torch.cat([spec.two_pass.block(block_call(a, b), state) for a, b in blocks])


# how a trim threshold is found: one sort of everything; radix histogram levels; a sample's bracket (which a
# 1-element fallback bucket makes fall back to histogram levels when it misses)
SELECTIONS = [(1 << 22, False), (1, False), (1, True)]


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gather_limit, sample", SELECTIONS)
def test_blocks_give_the_same_bits_as_the_whole_tensor(method, dtype, gather_limit, sample, monkeypatch):
    monkeypatch.setattr(rank_window, "GATHER_LIMIT", gather_limit)
    monkeypatch.setattr(rank_window, "SAMPLE", sample)
    spec = METHODS[method]
    for seed in (0, 1, 2):
        base, experts = tied_tensors(seed, dtype)
        for settings in SETTINGS[method]:
            calls = [spec.call_with(base, experts, INFO, torch.Generator().manual_seed(seed + 10) if spec.random
                                    else None, weight=[0.5, 1.0, 0.7], **settings) for _ in range(4)]
            whole = spec.fn(calls[0])
            for rows, call in zip((1, 3, 7), calls[1:]):
                assert torch.equal(blockwise(spec, call, rows), whole), (seed, settings, rows)


def test_trim_ties_are_taken_in_position_order_across_blocks():
    # 0.25 is the threshold and appears in every block; the density leaves room for only some of its copies
    spec = METHODS["ties"]
    base = torch.zeros(6, 4)
    expert = torch.tensor([[1.0, 0.25, 0.0, 0.25]] * 6)
    call = spec.call_with(base, [expert], INFO, None, density=10 / 24)  # k = 10: six 1.0s, then four 0.25s
    out = blockwise(spec, call, 1)
    kept = torch.nonzero(out.reshape(-1)).squeeze(1).tolist()
    ties = [i for i in range(24) if i % 4 in (1, 3)]
    assert kept == sorted([i for i in range(24) if i % 4 == 0] + ties[:4])
    assert torch.equal(out, spec.fn(call))


def ref_window(magnitudes: np.ndarray, first: int, stop: int, descending: bool) -> np.ndarray:
    order = np.argsort(-magnitudes if descending else magnitudes, kind="stable")
    keep = np.zeros(magnitudes.size, bool)
    keep[order[first:stop]] = True
    return keep


def windowed(window: RankWindow, magnitudes: torch.Tensor, block: int) -> np.ndarray:
    flat = magnitudes.reshape(-1)
    while not window.done:
        for a in range(0, flat.numel(), block):
            window.feed(flat[a:a + block])
        window.end_pass()
    return torch.cat([window.mask(flat[a:a + block].clone()) for a in range(0, flat.numel(), block)]).bool().numpy()


@pytest.mark.parametrize("gather_limit, sample", [*SELECTIONS, (4, False), (4, True)])
def test_rank_windows_match_a_stable_sort(gather_limit, sample, monkeypatch):
    monkeypatch.setattr(rank_window, "GATHER_LIMIT", gather_limit)
    monkeypatch.setattr(rank_window, "SAMPLE", sample)
    rng = np.random.default_rng(5)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        values = rng.integers(0, 4, size=n) * 0.5 if trial % 2 else np.abs(rng.normal(size=n))
        dtype = torch.float64 if trial % 3 == 0 else torch.float32
        magnitudes = torch.tensor(values, dtype=dtype)
        windows = [(int(a), int(b)) for a, b in rng.integers(0, n + 1, size=(4, 2))]
        windows += [(0, 1), (0, n), (n - 1, n), (0, 0)]
        for first, stop in windows:
            for descending in (True, False):
                expected = ref_window(magnitudes.numpy(), first, stop, descending)
                for block in (1, 5, n):
                    got = windowed(RankWindow(n, first, stop, descending), magnitudes, block)
                    np.testing.assert_array_equal(got, expected, err_msg=f"{n} {first} {stop} {descending} {block}")


def test_magnitude_and_outlier_windows_follow_the_papers_counts():
    magnitudes = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 5.0, 2.0, 4.0, 1.0, 2.0])
    a = magnitudes.numpy()
    np.testing.assert_array_equal(windowed(magnitude_window(10, 0.35), magnitudes, 3), ref_window(a, 0, 3, True))
    np.testing.assert_array_equal(windowed(magnitude_window(10, 0.01), magnitudes, 3), ref_window(a, 0, 1, True))
    # Breadcrumbs: keep int(0.5 * 10) = 5 after dropping the int(0.2 * 10) = 2 largest: ascending ranks [3, 8)
    np.testing.assert_array_equal(windowed(outlier_window(10, 0.5, 0.2), magnitudes, 4), ref_window(a, 3, 8, False))
    assert windowed(outlier_window(10, 1.0, 0.2), magnitudes, 4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_selection_counts_values_below_and_equal(dtype):
    rng = np.random.default_rng(9)
    values = torch.tensor(np.concatenate([rng.normal(size=3000), np.full(500, 0.75), rng.integers(0, 3, 800)]),
                          dtype=dtype)
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    ordered = np.sort(values.numpy())
    ranks = [0, 17, 1700, 2500, 3100, 4299]
    for gather_limit in (1, 100, 1 << 22):
        selection = Selection(values.numel(), ranks, chunk_elements=256, gather_limit=gather_limit)
        while not selection.done:
            for block in torch.split(shuffled, 777):
                selection.feed(block)
            selection.end_pass()
        for rank in ranks:
            found, value = selection.found[rank], ordered[rank]
            assert found.value == value
            assert found.below == np.count_nonzero(ordered < value)
            assert found.equal == np.count_nonzero(ordered == value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_norm_is_exact_whatever_the_split(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20_000, generator=g, dtype=dtype) * torch.exp(8 * torch.randn(20_000, generator=g, dtype=dtype))
    x[:5] = torch.finfo(dtype).tiny / 8  # subnormals
    exact = float(sum(Fraction(abs(v)) for v in x.tolist()))
    for sizes in ([20_000], [1, 19_999], [7] * 2857 + [1]):
        norm = L1Norm()
        for part in torch.split(x, sizes):
            norm.add(part)
        assert norm.value == exact


def test_random_methods_stay_whole_on_cuda():
    # CUDA generators draw differently when a tensor is split; the engine must not split random methods there
    from types import SimpleNamespace

    job = SimpleNamespace(shape=(1000, 100))
    for method, split_on_cuda in (("dare_ties", False), ("ties", True)):
        plan = SimpleNamespace(method=METHODS[method])
        for device, expected in (("cpu", True), ("cuda", split_on_cuda)):
            options = MergeOptions(device=device, chunk_elements=10_000, stream_elements=50_000)
            assert (execution(plan.method, job, options).blocks is not None) == expected, (method, device)
        options = MergeOptions(chunk_elements=10_000, stream_elements=200_000)
        assert execution(plan.method, job, options).blocks is None  # small enough to read whole


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    return make_family(root, 2, layers=2, dtype=torch.bfloat16)


def recipe(base, experts, method, **params):
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16", "seed": 3,
            "models": [{"model": str(e), "parameters": {"weight": 0.5 + 0.25 * i}} for i, e in enumerate(experts)],
            "parameters": params}


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.4}),
                                            ("della", {"density": 0.5, "epsilon": 0.2}),
                                            ("breadcrumbs", {"density": 0.6, "gamma": 0.1})])
def test_streamed_merge_writes_the_same_bytes(family, tmp_path, method, params, monkeypatch):
    import mergelab.stream.pipeline as engine

    base, experts = family
    passes = []
    original = engine.observe_piece

    def spy(plan, piece, *args):
        passes.append((piece.job.name, piece.pass_index, piece.start))
        original(plan, piece, *args)

    monkeypatch.setattr(engine, "observe_piece", spy)
    r = recipe(base, experts, method, **params)
    whole = merge(r, tmp_path / "whole")
    assert passes == []
    streamed = merge(r, tmp_path / "streamed", chunk_elements=100, stream_elements=0, shard_size=40_000)
    name = "model.layers.1.mlp.down_proj.weight"  # 32 x 64: blocks of one row
    assert {start for n, _, start in passes if n == name} == set(range(32))
    a, b = load_folder(whole), load_folder(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stats_a = json.loads((whole / "mergelab.json").read_text())["tensors"]
    stats_b = json.loads((streamed / "mergelab.json").read_text())["tensors"]
    assert stats_a == stats_b


def test_streamed_merge_refuses_nan_and_bad_parameters(family, tmp_path):
    base, experts = family
    with pytest.raises(RecipeError, match="epsilon"):
        merge(recipe(base, experts, "della", density=0.2, epsilon=0.3), tmp_path / "della", chunk_elements=100,
              stream_elements=0)
    assert not (tmp_path / "della").exists() and not (tmp_path / "della.partial").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in experts[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][-1, -1] = float("nan")  # in the last block
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        merge(recipe(base, [bad, experts[1]], "ties", density=0.3), tmp_path / "ties", chunk_elements=100,
              stream_elements=0)
    assert not (tmp_path / "ties").exists() and not (tmp_path / "ties.partial").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiles_give_the_same_bytes_and_exact_statistics(family, tmp_path, dtype):
    # bf16 inputs: the output dtype holds every input value; float32 output of bf16 inputs, likewise; both take
    # the compute-dtype comparison. A float32 family merged to bf16 takes the output-dtype comparison.
    base, experts = family
    for method, params in (("task_arithmetic", {}), ("linear", {}), ("ties", {"density": 0.3}),
                           ("dare_ties", {"density": 0.4}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1})):
        r = {**recipe(base, experts, method, **params), "dtype": dtype}
        if method == "linear":
            del r["base_model"]
        whole = merge(r, tmp_path / f"{method}-{dtype}-whole", tile_elements=1 << 30)
        tiled = merge(r, tmp_path / f"{method}-{dtype}-tiled", tile_elements=40)
        a, b = load_folder(whole), load_folder(tiled)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        stats = json.loads((tiled / "mergelab.json").read_text())["tensors"]
        assert stats == json.loads((whole / "mergelab.json").read_text())["tensors"]
        inputs = {str(f): load_folder(f) for f in ([] if method == "linear" else [base]) + experts}
        for name, out in b.items():
            for model, tensors in inputs.items():
                expected = (out == tensors[name].to(out.dtype)).double().mean().item()
                assert stats[name]["equal_to"][model] == pytest.approx(expected, abs=1e-12), (method, name, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_signed_zeros_count_as_equal_values(tmp_path, dtype):
    # Equality is counted on bit patterns where input and output share a dtype; +0 and -0 differ there but are
    # the same number. A base holding -0 merged with weight-0 experts gives +0 (-0 + 0): unchanged from the base.
    base, experts = make_family(tmp_path, 2, layers=1, dtype=dtype)
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][::2] = -0.0
    tensors[name][1, :5] = 0.0
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    r = {**recipe(base, experts, "task_arithmetic"), "dtype": str(dtype).removeprefix("torch.")}
    for model in r["models"]:
        model["parameters"]["weight"] = 0.0
    out = merge(r, tmp_path / "out", tile_elements=40)
    merged, stats = load_folder(out)[name], json.loads((out / "mergelab.json").read_text())["tensors"][name]
    assert torch.equal(merged, tensors[name]) and (torch.signbit(merged) != torch.signbit(tensors[name])).any()
    assert stats["equal_to"][str(base)] == 1.0 and stats["changed_from_base"] == 0.0
    for expert in experts:
        expected = (merged == load_folder(expert)[name]).double().mean().item()
        assert stats["equal_to"][str(expert)] == pytest.approx(expected, abs=1e-12)


def test_float32_inputs_merged_to_bfloat16_count_equality_in_bfloat16(tmp_path):
    base, experts = make_family(tmp_path, 2, layers=1)  # float32 checkpoints
    r = recipe(base, experts, "ties", density=0.2)  # bf16 output: an input equals it if it rounds to it
    out = merge(r, tmp_path / "out", tile_elements=40)
    merged, stats = load_folder(out), json.loads((out / "mergelab.json").read_text())["tensors"]
    b = load_folder(base)
    for name, tensor in merged.items():
        expected = (tensor == b[name].to(torch.bfloat16)).double().mean().item()
        assert stats[name]["equal_to"][str(base)] == pytest.approx(expected, abs=1e-12)
        assert expected > 0.5  # trimmed entries keep the base (density 0.2 per expert)


@pytest.mark.parametrize("method, params, stream_elements", [
    ("task_arithmetic", {}, 1 << 24), ("linear", {}, 1 << 24), ("ties", {"density": 0.3}, 1 << 24),
    ("ties", {"density": 0.3}, 0), ("dare_ties", {"density": 0.4}, 0), ("della", {"density": 0.5, "epsilon": 0.2}, 0),
])
def test_parallel_lanes_write_the_same_bytes_and_statistics(family, tmp_path, method, params, stream_elements,
                                                            monkeypatch):
    # pieces without shared state go to compute lanes; blocks that share a tensor's state stay on the calling
    # thread; the writer gets both in plan order, so the files and statistics cannot depend on the lane count
    import threading

    import mergelab.stream.pipeline as engine

    base, experts = family
    r = recipe(base, experts, method, **params)
    if method == "linear":
        del r["base_model"]
    threads = set()
    original = engine.compute_piece

    def spy(*args):
        threads.add(threading.get_ident())
        return original(*args)

    monkeypatch.setattr(engine, "compute_piece", spy)
    options = {"chunk_elements": 100, "stream_elements": stream_elements, "shard_size": 40_000}
    one = merge(r, tmp_path / "one", compute_threads=1, **options)
    assert threads == {threading.get_ident()}
    three = merge(r, tmp_path / "three", compute_threads=3, **options)
    assert len(threads) > 1
    a, b = load_folder(one), load_folder(three)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in three.iterdir())
    for shard in one.glob("*.safetensors"):
        assert shard.read_bytes() == (three / shard.name).read_bytes()
    stats = [json.loads((f / "mergelab.json").read_text())["tensors"] for f in (one, three)]
    assert stats[0] == stats[1]
