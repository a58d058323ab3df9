"""Tiny word-level tokenizers for the tiny test models, and models whose vocabularies differ by added tokens.

Built with the ``tokenizers`` library and saved by transformers, so both mergelab and ``mergekit-yaml`` load
them as any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SPECIALS = ("<unk>", "<s>", "</s>")


def save_tokenizer(folder: Path, vocab: int, added: tuple[str, ...] = (), special: tuple[str, ...] = (),
                   chat_template: str | None = None) -> None:
    """A word-level tokenizer over ``<unk> <s> </s> w3 ... w{vocab-1}`` plus ``added`` then ``special`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)


def grow_vocabulary(folder: Path, tokens: int, seed: int) -> None:
    """Append ``tokens`` seeded random rows to the embedding (and an untied head) and raise ``vocab_size``."""
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            t = tensors[name]
            extra = (0.02 * torch.randn((tokens, t.shape[1]), generator=gen)).to(t.dtype)
            tensors[name] = torch.cat([t, extra]).contiguous()
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += tokens
    (folder / "config.json").write_text(json.dumps(config, indent=2))
