"""TSV-Merge, Iso-C, Iso-CTS and Subspace Boosting stream their non-spectral tensors (issue 19).

Only the in-layer matrices need an SVD, so only they are taken whole; every other tensor (embedding, LM head,
norms, biases) gets an elementwise rule (the task-vector mean; Task Arithmetic) or a row-block one (TIES), which
the engine streams in row blocks like task arithmetic's. References: numpy's float32 evaluation of the
task-vector mean in the same order (numpy rounds every product and sum, no fused multiply-add), so the rule's bits
are pinned on whole tensors and on any split; the methods' own functions applied to each whole tensor (what the
engine ran before, each checked against float64 numpy/scipy re-implementations in ``test_subspace.py``) for the
streamed merges, which must write the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tinymodels import assert_same_outputs, load_folder, make_family, merges_in_pieces

import mergelab.stream.pipeline as pipeline
from mergelab.check import peak_memory_bytes
from mergelab.checkpoint.layout import tensor_info
from mergelab.config import parse_recipe
from mergelab.methods import subspace
from mergelab.methods.spec import MethodCall, TensorInfo
from mergelab.plan.build import build_plan
from mergelab.plan.sources import open_inputs
from mergelab.stream.options import MergeOptions
from mergelab.stream.schedule import execution, lanes_for, tiles_on_cpu

SPECS = {s.name: s for s in subspace.SPECS}
EMBEDDING = TensorInfo("model.embed_tokens.weight", None, "embedding", 2)
NORM = TensorInfo("model.layers.0.input_layernorm.weight", 0, "norm", 2)
PARAMS = {"tsv": {}, "iso_c": {}, "iso_cts": {"common_space_fraction": 0.5}, "task_arithmetic_sb": {"beta": 0.3},
          "ties_sb": {"density": 0.4, "beta": 0.3}}


def inputs(shape, count, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]


def in_pieces(name, base, experts, info, rows, **params):
    """The engine's protocol on ``rows``-row pieces (elements of a 1-D tensor), each a fresh copy: the function on
    each piece for an elementwise method, the statistics passes and then the output pass for a ``TwoPass`` one."""
    spec = SPECS[name]
    call = spec.call_with(base, experts, info, **params)
    blocks = [(a, min(a + rows, base.shape[0])) for a in range(0, base.shape[0], rows)]

    def piece(a, b):
        return MethodCall(base[a:b].clone(), [e[a:b].clone() for e in experts], info, call.params)

    if spec.elementwise:
        return torch.cat([spec.fn(piece(a, b))[0] for a, b in blocks])
    state = spec.two_pass.start(info, call.params, tuple(base.shape), None)
    while not state.done:
        for a, b in blocks:
            state.observe(piece(a, b))
        state.end_pass()
    return torch.cat([spec.two_pass.block(piece(a, b), state) for a, b in blocks])


@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, info", [((37, 11), EMBEDDING), ((29,), NORM)], ids=["embedding", "norm"])
def test_the_task_vector_mean_is_numpy_bit_for_bit_in_any_rows(count, dtype, shape, info):
    """``θ_0 + λ Σ w_i δ_i``, ``w_i = α_i / Σ α_j`` rounded to the compute dtype, summed in expert order."""
    base, experts = inputs(shape, count, dtype, seed=count)
    weights = [0.7, -0.2, 1.3, 0.4, 2.0][:count]
    lam = 0.85
    w = (np.array(weights) / np.sum(weights)).astype(base.numpy().dtype)
    b = base.numpy()
    update = (experts[0].numpy() - b) * w[0]
    for weight, expert in zip(w[1:], experts[1:]):
        update = update + (expert.numpy() - b) * weight
    expected = torch.from_numpy(b + np.array(lam, dtype=b.dtype) * update)
    for name in ("tsv", "iso_c", "iso_cts"):
        params = {"weight": weights, "lambda": lam}
        whole, stats = SPECS[name].fn(SPECS[name].call_with(base, experts, info, **params))
        assert torch.equal(whole, expected) and stats == {}, name
        for rows in (1, 3, 7):
            assert torch.equal(in_pieces(name, base, experts, info, rows, **params), expected), (name, rows)


@pytest.mark.parametrize("name", ["task_arithmetic_sb", "ties_sb"])
@pytest.mark.parametrize("shape, info", [((37, 11), EMBEDDING), ((29,), NORM)], ids=["embedding", "norm"])
def test_boosting_outside_the_spectrum_is_the_unboosted_method_in_any_rows(name, shape, info):
    base, experts = inputs(shape, 3, torch.float32, seed=7)
    params = {**PARAMS[name], "weight": [0.5, 1.0, 0.75], "lambda": 0.9}
    whole, stats = SPECS[name].fn(SPECS[name].call_with(base, experts, info, **params))
    assert stats == {}
    unboosted = SPECS[name].two_pass.whole(SPECS[name].call_with(base, experts, info, **params))
    assert torch.equal(whole, unboosted)
    for rows in (1, 4, shape[0]):
        assert torch.equal(in_pieces(name, base, experts, info, rows, **params), whole), rows


# --- the engine's decision and check's estimate -------------------------------------------------------------


def plan_for(root, method, vocab=96, **params):
    base, experts = make_family(root, 2, layers=1, vocab=vocab)
    recipe = parse_recipe({"merge_method": method, "base_model": str(base), "parameters": params,
                           "models": [{"model": str(e)} for e in experts]})
    return build_plan(recipe, open_inputs(recipe, None, False))


@pytest.mark.parametrize("name", list(SPECS))
def test_the_engine_splits_every_tensor_but_the_in_layer_matrices(tmp_path, name):
    plan = plan_for(tmp_path, name, **PARAMS[name])
    options = MergeOptions(chunk_elements=100, stream_elements=0, compute_threads=2)
    assert not tiles_on_cpu(plan.method, options) and lanes_for(plan.method, options) == 1
    matrices = 0
    for job in plan.jobs:
        run = execution(plan.method, job, options)
        call = MethodCall(torch.zeros(job.shape), [torch.zeros(job.shape)], job.info, {})
        assert subspace.uses_spectrum(call) == plan.method.needs_whole(job.info, job.shape, job.params)
        if job.info.is_matrix_in_layer and len(job.shape) == 2:
            matrices += 1
            assert run.blocks is None and not run.tiled and not run.two_pass, job.name
        else:
            assert run.tiled and run.two_pass == (name == "ties_sb"), job.name
            if len(job.shape) == 2:  # the embedding and the head: blocks of at most 100 elements
                assert run.blocks is not None and len(run.blocks) == job.shape[0] // (100 // job.shape[1])
    assert matrices == 7  # q, k, v, o, gate, up, down of the one layer


@pytest.mark.parametrize("name", ["tsv", "ties_sb"])
def test_check_estimate_no_longer_follows_the_vocabulary(tmp_path, name):
    """A ten times larger vocabulary (embedding and head) leaves the estimate unchanged, since those stream now
    (``TwoPass`` TIES above ``stream_elements``); taken whole, as before (the same method declared neither
    elementwise nor two-pass), it grew with them."""
    options = MergeOptions(chunk_elements=512, stream_elements=1000, compute_threads=2)
    plans = {vocab: plan_for(tmp_path / str(vocab), name, vocab, **PARAMS[name]) for vocab in (96, 960)}
    estimates = {vocab: peak_memory_bytes(plan, options) for vocab, plan in plans.items()}
    assert estimates[96] == estimates[960]
    whole_method = replace(plans[960].method, elementwise=False, two_pass=None, needs_whole=None)
    before = peak_memory_bytes(replace(plans[960], method=whole_method), options)
    assert before > 5 * estimates[960]
    # now the largest piece is a whole in-layer matrix (64 x 32, three float32 inputs), one lane
    assert estimates[960] >= 64 * 32 * 4 * 3 * (2 + 1 + 1)


# --- through the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and two experts whose embedding (96 x 32) and head are many blocks of the streamed merge."""
    return make_family(tmp_path_factory.mktemp("subspace_streaming"), 2, layers=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(SPECS))
def test_streamed_merge_writes_the_bytes_of_the_whole_tensor_functions(family, tmp_path, name, monkeypatch):
    """Whole tensors in one tile; tiny tiles; every tensor but the in-layer matrices streamed in row blocks from
    disk: the same shard bytes and statistics, equal to each method's function on each whole tensor."""
    base, experts = family
    recipe = {"merge_method": name, "base_model": str(base), "dtype": "bfloat16",
              "parameters": {**PARAMS[name], "lambda": 0.8},
              "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (0.6, 0.9))]}
    streamed: dict[str, list[bool]] = {}  # per tensor of the streamed merge, whether each output piece was whole
    original = pipeline.compute_piece

    def spy(run, piece, *args):
        if run.options.stream_elements == 0:
            streamed.setdefault(piece.job.name, []).append(piece.whole)
        return original(run, piece, *args)

    monkeypatch.setattr(pipeline, "compute_piece", spy)
    reference, outputs, observed = merges_in_pieces(recipe, tmp_path, monkeypatch, tiles=(8, 40))
    assert_same_outputs(reference, outputs)
    merged, base_tensors = load_folder(reference), load_folder(base)
    expert_tensors = [load_folder(e) for e in experts]
    config = json.loads((base / "config.json").read_text())
    spec = SPECS[name]
    for tensor, value in merged.items():
        info = tensor_info(tensor, config)
        call = spec.call_with(base_tensors[tensor].float(), [e[tensor].float() for e in expert_tensors], info,
                              weight=[0.6, 0.9], **{**PARAMS[name], "lambda": 0.8})
        assert torch.equal(value, spec.fn(call)[0].to(torch.bfloat16)), tensor
        if subspace.spectral(info, tuple(value.shape)) or value.dim() < 2:  # 1-D: under a block
            assert streamed[tensor] == [True], tensor
        else:
            assert len(streamed[tensor]) > 1 and not any(streamed[tensor]), tensor
    assert len(streamed["model.embed_tokens.weight"]) == 96 // 3  # 100-element blocks of 32-wide rows
    if name == "ties_sb":  # its statistics passes read the embedding and the head in blocks too
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(observed)
    else:
        assert observed == []
