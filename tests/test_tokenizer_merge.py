"""Tokenizers and chat templates as mergekit 0.1.5 handles them, compared with ``mergekit-yaml`` (its own program)
on tiny models whose vocabularies differ by added tokens. Rows are compared token by token: the two tools may
number the added tokens differently (mergekit's order over models comes from a Python set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tinymodels import load_folder, make_base, make_expert, run_mergekit
from tinytokenizers import grow_vocabulary, save_tokenizer

from mergelab.api import merge
from mergelab.chat_templates import NAMED
from mergelab.errors import CompatibilityError, RecipeError

CHATML_MARK = "{% for message in messages %}{{'<|im_start|>'"  # the start of mergekit's own chatml file


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """A base with 96 tokens; e0 adds ``<tool>``; e1 adds ``<think>`` and ``<tool>`` (other ids than e0's)."""
    root = tmp_path_factory.mktemp("vocab")
    base = make_base(root / "base")
    save_tokenizer(base, 96, chat_template=NAMED["chatml"])
    e0 = make_expert(base, root / "e0", 100)
    grow_vocabulary(e0, 1, 1)
    save_tokenizer(e0, 96, added=("<tool>",), chat_template=NAMED["mistral"])
    e1 = make_expert(base, root / "e1", 101)
    grow_vocabulary(e1, 2, 2)
    save_tokenizer(e1, 96, added=("<think>", "<tool>"), chat_template=NAMED["mistral"])
    return str(base), str(e0), str(e1)


def linear(models, weights, **extra):
    return {"merge_method": "linear", "dtype": "float32", **extra,
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]}


def assert_same_by_token(ours, theirs):
    """Every tensor equal; vocabulary tensors compared row by row through each output's own token ids."""
    from transformers import AutoTokenizer

    ours_vocab = AutoTokenizer.from_pretrained(ours).get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert ours_vocab.keys() == theirs_vocab.keys()
    a, b = load_folder(ours), load_folder(theirs)
    assert a.keys() == b.keys()
    order = torch.tensor([ours_vocab[t] for t in theirs_vocab])
    rows = torch.tensor(list(theirs_vocab.values()))
    for name in a:
        assert a[name].shape == b[name].shape, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(a[name][order], b[name][rows], rtol=0, atol=2e-7, msg=name)
            torch.testing.assert_close(a[name][len(rows):], b[name][len(rows):], rtol=0, atol=2e-7, msg=name)
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-7, msg=name)


def test_union_with_padding_matches_mergekit_and_generates(vocab_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, e0, e1 = vocab_family
    recipe = linear([base, e0, e1], [1.0, 0.5, 0.3], tokenizer={"source": "union", "pad_to_multiple_of": 8})
    ours = merge(recipe, tmp_path / "ours")
    assert_same_by_token(ours, run_mergekit(recipe, tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(ours)
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.vocab_size == 104 and len(tokenizer) == 98
    ids = tokenizer("w5 <tool> <think> w7", return_tensors="pt").input_ids
    assert ids.max() >= 96  # the added tokens survive
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_token_overrides_and_tokenizer_source_match_mergekit(vocab_family, tmp_path):
    base, e0, e1 = vocab_family
    tokens = {"<tool>": {"source": e0},
              "<fresh>": {"source": {"kind": "zero"}},
              "w5": {"source": {"kind": "model_token", "model": e1, "token": "w7"}, "force": True},
              "<think>": {"source": {"kind": "model_token", "model": base, "token_id": 3}}}
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
              "tokenizer": {"source": "union", "tokens": tokens},
              "models": [{"model": e0, "parameters": {"weight": 0.7}}, {"model": e1, "parameters": {"weight": 0.4}}]}
    assert_same_by_token(merge(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path))


@pytest.mark.parametrize("source", ["base", "e1"])
def test_tokenizer_source_matches_mergekit(vocab_family, tmp_path, source):
    base, e0, e1 = vocab_family
    recipe = linear([base, e0, e1], [0.2, 0.3, 0.5], tokenizer_source=base if source == "base" else e1)
    assert_same_by_token(merge(recipe, tmp_path / "ours"), run_mergekit(recipe, tmp_path))


def test_bad_tokenizer_input_is_refused_and_nothing_is_written(vocab_family, tmp_path):
    base, e0, e1 = vocab_family
    with pytest.raises(RecipeError, match="not a model of this merge"):
        merge(linear([base, e0], [1, 1], tokenizer={"tokens": {"<tool>": {"source": e1}}}), tmp_path / "a")
    clash = tmp_path / "special_tool"
    make_expert(Path(base), clash, 7)
    grow_vocabulary(clash, 1, 3)
    save_tokenizer(clash, 96, special=("<tool>",))
    with pytest.raises(CompatibilityError, match="'<tool>' is special"):
        merge(linear([base, e0, str(clash)], [1, 1, 1], tokenizer_source="union"), tmp_path / "b")
    with pytest.raises(RecipeError, match="did you mean 'chatml'"):
        merge(linear([base, e0], [1, 1], chat_template="chatmll"), tmp_path / "c")
    assert not any((tmp_path / name).exists() or (tmp_path / f"{name}.partial").exists() for name in "abc")


def render(folder, messages, generation):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=generation)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w5 w6"},
                {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w8"}]


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_named_templates_render_as_mergekit_s(vocab_family, tmp_path, name):
    base, e0, _ = vocab_family
    recipe = linear([base, e0], [1, 1], chat_template=name, tokenizer_source="base")
    ours = merge(recipe, tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path)
    assert json.loads((ours / "tokenizer_config.json").read_text())["chat_template"] == NAMED[name]
    for generation in (False, True):
        assert render(ours, CONVERSATION, generation) == render(theirs, CONVERSATION, generation)


def test_llama3_and_alpaca_follow_their_published_formats(vocab_family, tmp_path):
    base, e0, _ = vocab_family
    llama3 = render(merge(linear([base, e0], [1, 1], chat_template="llama3"), tmp_path / "l"), CONVERSATION, True)
    assert llama3 == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nw5 w6<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nw7<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nw8<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    alpaca = render(merge(linear([base, e0], [1, 1], chat_template="alpaca"), tmp_path / "a"),
                    CONVERSATION[:2], True)
    assert alpaca == "Be brief.\n\n### Instruction:\nw5 w6\n\n### Response:\n"


def test_auto_jinja_string_and_file(vocab_family, tmp_path):
    base, e0, e1 = vocab_family
    auto = merge(linear([base, e0, e1], [1, 1, 1], chat_template="auto"), tmp_path / "auto")
    assert render(auto, CONVERSATION[1:2], False) == "<s> [INST] w5 w6 [/INST]"  # two of three carry mistral
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    inline = merge(linear([base, e0], [1, 1], chat_template=jinja), tmp_path / "inline")
    assert render(inline, CONVERSATION[1:3], False) == "user: w5 w6\nassistant: w7\n"
    (tmp_path / "mine.jinja").write_text(jinja)
    (tmp_path / "recipe.yml").write_text(json.dumps(linear([base, e0], [1, 1], chat_template="mine.jinja")))
    from_file = merge(tmp_path / "recipe.yml", tmp_path / "file")
    assert render(from_file, CONVERSATION[1:3], False) == "user: w5 w6\nassistant: w7\n"
    assert not (from_file / "chat_template.jinja").exists()
