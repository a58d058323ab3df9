"""A corpus of recipes in the shapes people publish, each run with ``mergekit-yaml`` 0.1.5 (its own program, once
per recipe) and with mergelab under ``compat: mergekit`` on the same tiny folders: the outputs must be the same
bytes. Random methods (DARE, DELLA) draw different masks in the two tools, so for them both must run and agree on
every tensor's name, shape and dtype.

The folders: a base and three fine-tunes stored in bfloat16 (4 layers, so gradients, filters and slices have
something to act on), and a base with two fine-tunes whose vocabularies add tokens (union tokenizers).
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import load_folder, make_base, make_expert, make_family, run_mergekit
from tinytokenizers import grow_vocabulary, save_tokenizer

from mergelab.api import merge

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    base, experts = make_family(root / "bf16", 3, layers=4, dtype=torch.bfloat16)
    vbase = make_base(root / "vocab" / "base")
    save_tokenizer(vbase, 96)
    v0 = make_expert(vbase, root / "vocab" / "e0", 100)
    grow_vocabulary(v0, 1, 1)
    save_tokenizer(v0, 96, added=("<tool>",))
    v1 = make_expert(vbase, root / "vocab" / "e1", 101)
    grow_vocabulary(v1, 2, 2)
    save_tokenizer(v1, 96, added=("<think>", "<tool>"))
    return {"B": str(base), "E": [str(e) for e in experts], "VB": str(vbase), "V": [str(v0), str(v1)]}


def models(names, weights=None, **per_model):
    return [{"model": m, **({"parameters": {**({"weight": w} if w is not None else {}), **per_model}}
                            if w is not None or per_model else {})}
            for m, w in zip(names, weights or [None] * len(names))]


SLERP_FILTERS = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}

CORPUS = {
    "linear_bf16": lambda f: {"merge_method": "linear", "dtype": "bfloat16", "models": models(f["E"], [0.2, 0.5, 0.3])},
    "linear_stored_dtype": lambda f: {"merge_method": "linear", "models": models(f["E"][:2], [1.0, 1.0])},
    "linear_unnormalized_fp16": lambda f: {"merge_method": "linear", "dtype": "float16",
                                           "parameters": {"normalize": 0}, "models": models(f["E"], [0.3, 0.3, 0.4])},
    "task_arithmetic_fp16": lambda f: {"merge_method": "task_arithmetic", "base_model": f["B"], "dtype": "float16",
                                       "parameters": {"lambda": 0.8}, "models": models(f["E"], [0.3, 1.0, 0.6])},
    "task_arithmetic_normalize_number": lambda f: {"merge_method": "task_arithmetic", "base_model": f["B"],
                                                   "dtype": "bfloat16", "parameters": {"normalize": 1.0},
                                                   "models": models(f["E"], [0.7, 0.2, 0.4])},
    "task_arithmetic_out_dtype": lambda f: {"merge_method": "task_arithmetic", "base_model": f["B"],
                                            "dtype": "float32", "out_dtype": "bfloat16",
                                            "models": models(f["E"][:2], [0.5, 0.5])},
    "ties_bf16_unequal": lambda f: {"merge_method": "ties", "base_model": f["B"], "dtype": "bfloat16",
                                    "models": models(f["E"], [0.3, 1.0, 0.6], density=0.5)},
    "ties_gradient_filters": lambda f: {
        "merge_method": "ties", "base_model": f["B"], "dtype": "bfloat16",
        "parameters": {"density": [0.3, 0.7], "weight": [{"filter": "self_attn", "value": [0.2, 0.8]},
                                                         {"filter": "mlp", "value": 0.5}, {"value": 0.3}]},
        "models": models(f["E"])},
    "ties_models_repeat_base": lambda f: {"merge_method": "ties", "base_model": f["B"], "dtype": "bfloat16",
                                          "parameters": {"density": 0.6, "weight": 0.5, "normalize": True},
                                          "models": [{"model": f["B"]}, *models(f["E"][:2])]},
    "breadcrumbs_fp16": lambda f: {"merge_method": "breadcrumbs", "base_model": f["B"], "dtype": "float16",
                                   "models": models(f["E"], [0.5, 0.5, 0.5], density=0.6, gamma=0.05)},
    "breadcrumbs_ties_bf16": lambda f: {"merge_method": "breadcrumbs_ties", "base_model": f["B"], "dtype": "bfloat16",
                                        "parameters": {"density": 0.7, "gamma": 0.02},
                                        "models": models(f["E"], [0.4, 0.9, 0.5])},
    "dare_ties_bf16": lambda f: {"merge_method": "dare_ties", "base_model": f["B"], "dtype": "bfloat16",
                                 "parameters": {"int8_mask": 1, "density": 0.5},
                                 "models": models(f["E"], [0.4, 0.3, 0.3])},
    "dare_linear_no_rescale": lambda f: {"merge_method": "dare_linear", "base_model": f["B"], "dtype": "bfloat16",
                                         "parameters": {"rescale": 0, "density": 0.7},
                                         "models": models(f["E"][:2], [0.5, 0.5])},
    "della_bf16": lambda f: {"merge_method": "della", "base_model": f["B"], "dtype": "bfloat16",
                             "models": models(f["E"], [0.5, 0.3, 0.2], density=0.5, epsilon=0.1)},
    "della_linear": lambda f: {"merge_method": "della_linear", "base_model": f["B"], "dtype": "float16",
                               "parameters": {"lambda": 1.1}, "models": models(f["E"][:2], [0.6, 0.4], density=0.6)},
    "slerp_slices_filters": lambda f: {
        "merge_method": "slerp", "base_model": f["B"], "dtype": "bfloat16", "parameters": SLERP_FILTERS,
        "slices": [{"sources": [{"model": f["B"], "layer_range": [0, 4]},
                                {"model": f["E"][0], "layer_range": [0, 4]}]}]},
    "slerp_models": lambda f: {"merge_method": "slerp", "base_model": f["E"][1], "dtype": "float16",
                               "parameters": {"t": 0.4}, "models": models([f["E"][1], f["E"][2]])},
    "nuslerp_no_base": lambda f: {"merge_method": "nuslerp", "dtype": "bfloat16",
                                  "models": models(f["E"][:2], [0.4, 0.6])},
    "nuslerp_base_rows": lambda f: {"merge_method": "nuslerp", "base_model": f["B"], "dtype": "bfloat16",
                                    "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                    "models": models(f["E"][:2], [1.0, 2.0])},
    "multislerp_bf16": lambda f: {"merge_method": "multislerp", "base_model": f["B"], "dtype": "bfloat16",
                                  "parameters": {"normalize": True}, "models": models(f["E"], [1.0, 0.5, 2.0])},
    "karcher_with_base": lambda f: {"merge_method": "karcher", "base_model": f["B"], "dtype": "bfloat16",
                                    "models": models(f["E"][:2], [0.3, 0.7])},
    "karcher_no_base": lambda f: {"merge_method": "karcher", "dtype": "float32", "parameters": {"max_iter": 20},
                                  "models": models(f["E"])},
    "model_stock_bf16": lambda f: {"merge_method": "model_stock", "base_model": f["B"], "dtype": "bfloat16",
                                   "models": models(f["E"], [1.0, 1.0, 1.0])},
    "model_stock_filter_wise": lambda f: {"merge_method": "model_stock", "base_model": f["B"], "dtype": "float16",
                                          "parameters": {"filter_wise": True},
                                          "models": [{"model": f["B"]}, *models(f["E"])]},
    "sce_bf16": lambda f: {"merge_method": "sce", "base_model": f["B"], "dtype": "bfloat16",
                           "parameters": {"select_topk": 0.5, "normalize": True},
                           "models": models(f["E"], [0.5, 0.5, 0.5])},
    "arcee_fusion_bf16": lambda f: {"merge_method": "arcee_fusion", "base_model": f["B"], "dtype": "bfloat16",
                                    "models": [{"model": f["B"]}, {"model": f["E"][0]}]},
    "passthrough_frankenmerge": lambda f: {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": f["E"][0], "layer_range": [0, 3]}]},
                   {"sources": [{"model": f["E"][1], "layer_range": [1, 4]}]}]},
    "linear_slices": lambda f: {
        "merge_method": "linear", "dtype": "bfloat16", "parameters": {"weight": 0.5},
        "slices": [{"sources": [{"model": f["E"][0], "layer_range": [0, 2]},
                                {"model": f["E"][1], "layer_range": [0, 2]}]},
                   {"sources": [{"model": f["E"][0], "layer_range": [2, 4]},
                                {"model": f["E"][2], "layer_range": [2, 4]}]}]},
    "union_tokenizer_chatml": lambda f: {"merge_method": "linear", "dtype": "bfloat16", "tokenizer_source": "union",
                                         "chat_template": "chatml",
                                         "models": models([f["VB"], *f["V"]], [1.0, 0.5, 0.3])},
    "tokenizer_block_overrides": lambda f: {
        "merge_method": "task_arithmetic", "base_model": f["VB"], "dtype": "float16",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 32,
                      "tokens": {"<tool>": {"source": f["V"][0]}, "<x>": {"source": {"kind": "zero"}}}},
        "models": models(f["V"], [0.6, 0.4])},
}


def by_token(folder):
    """Vocabulary rows keyed by token (the tools may number added tokens differently), other tensors as they are."""
    from transformers import AutoTokenizer

    tensors = load_folder(folder)
    if not (folder / "tokenizer_config.json").exists():
        return tensors
    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    order = sorted(vocab)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors[name]
        tensors[name] = torch.cat([rows[[vocab[t] for t in order]], rows[len(vocab):]])
    return tensors


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 25
    assert {r(dict(B="b", E=["e"] * 3, VB="v", V=["v"] * 2))["merge_method"] for r in CORPUS.values()} >= {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
        "breadcrumbs_ties", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "arcee_fusion",
        "passthrough"}


@pytest.mark.parametrize("case", list(CORPUS))
def test_compat_reproduces_mergekit(folders, tmp_path, case):
    recipe = CORPUS[case](folders)
    theirs = by_token(run_mergekit(recipe, tmp_path))
    ours = by_token(merge({**recipe, "compat": "mergekit"}, tmp_path / "ours"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        if recipe["merge_method"] not in RANDOM:
            assert torch.equal(ours[name], theirs[name]), f"{case}: {name}"
