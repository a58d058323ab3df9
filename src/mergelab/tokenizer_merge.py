"""The output vocabulary of a recipe with ``tokenizer_source`` or a ``tokenizer:`` block, as mergekit 0.1.5 builds
it, and every input's embedding and head rows re-indexed to it before merging.

Output tokenizer (``source``): ``base`` (the base model's, or the first model's without a base), a model folder
(that model's), or ``union``: the base tokenizer, then every other input's tokens it lacks, in recipe order,
then every added token of every input, added the way that input's tokenizer declares it. Tokens named under
``tokens:`` are added when missing. ``pad_to_multiple_of`` rounds the number of rows up.

Rows: each input ``m`` gets an (output vocabulary × hidden) matrix per vocabulary tensor. Output token ``k``
takes ``m``'s row for that token where ``m`` has it (below its ``vocab_size``) and no ``force`` override applies;
otherwise a default shared by all inputs: the ``tokens:`` override's source (a model's row for the token, a
model's row for another ``token`` or ``token_id``, or zeros); without one, the row of the only input that has
the token, else the base's, else the mean over the inputs that have it, else zeros. Padding rows are the mean
of the input's real rows (Hewitt 2021, "Initializing new word embeddings"). The merge method then runs on these
matrices as on any tensor.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.chat_templates import resolve_chat_template
from mergelab.checkpoint.layout import tensor_info
from mergelab.checkpoint.reader import ModelReader, TensorEntry
from mergelab.config import ModelTokenSource, Recipe, TokenizerBlock, TokenSetting, ZeroSource
from mergelab.errors import CheckpointError, CompatibilityError, RecipeError

VOCABULARY_KINDS = ("embedding", "head")
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


@dataclass
class OutputVocabulary:
    """The output tokenizer, its row count, and per input model the source row of each output token (-1: none)."""

    tokenizer: Any
    rows: int
    sources: dict[str, list[int]]
    model_vocabs: dict[str, dict[str, int]]


@dataclass
class RemappedReader(ModelReader):
    """An input model whose vocabulary tensors are replaced by their re-indexed rows (held in memory)."""

    remapped: dict[str, torch.Tensor] = field(default_factory=dict)
    vocabulary: OutputVocabulary | None = None

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.remapped:
            tensor = self.remapped[name]
            return tensor if rows is None else tensor[rows[0]: rows[1]]
        return super().get(name, rows)


def tokenizer_block(recipe: Recipe) -> TokenizerBlock | None:
    """The recipe's tokenizer settings, ``tokenizer_source: X`` read as ``tokenizer: {source: X}``."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    return TokenizerBlock(source=recipe.tokenizer_source) if recipe.tokenizer_source else None


def output_vocabulary(readers: dict[str, ModelReader]) -> OutputVocabulary | None:
    """The vocabulary the readers were re-indexed to, if they were."""
    return next((r.vocabulary for r in readers.values() if isinstance(r, RemappedReader)), None)


def _load_tokenizer(folder: Path) -> Any | None:
    from transformers import AutoTokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    return AutoTokenizer.from_pretrained(folder)


def _copy(tokenizer: Any) -> Any:
    """An independent copy of a tokenizer (saved and reloaded, so adding tokens leaves the original alone)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mergelab-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _vocab_size(reader: ModelReader, tokenizer: Any) -> int:
    return int(reader.config.get("vocab_size") or len(tokenizer.get_vocab()))


def _union(base: str, tokenizers: dict[str, Any], readers: dict[str, ModelReader]) -> Any:
    """The base tokenizer plus every input's missing tokens, then every input's added tokens (see module doc)."""
    added: dict[str, tuple[str, Any]] = {}
    plain: list[str] = []
    for ref, tokenizer in tokenizers.items():
        limit = _vocab_size(readers[ref], tokenizer)
        decoder = {i: info for i, info in tokenizer.added_tokens_decoder.items() if i < limit}
        contents = {info.content for info in decoder.values()}
        plain += [tok for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                  if i < limit and tok not in contents]
        for info in decoder.values():
            if info.content in added and added[info.content][1].special != info.special:
                first = added[info.content][0]
                raise CompatibilityError(f"added token {info.content!r} is special in one of {first} and {ref} but "
                                         "not in the other, so their union has no single definition of it; "
                                         "make the two tokenizers agree or use tokenizer source: base")
            added.setdefault(info.content, (ref, info))
    out = _copy(tokenizers[base])
    known = set(out.get_vocab())
    for tok in dict.fromkeys(plain):
        if tok not in known and tok not in added:
            out.add_tokens(tok)
            known.add(tok)
    for content, (_, info) in added.items():
        if content not in known:
            out.add_tokens(info, special_tokens=info.special)
            known.add(content)
    return out


def _output_tokenizer(block: TokenizerBlock, base: str, tokenizers: dict[str, Any],
                      readers: dict[str, ModelReader]) -> Any:
    if block.source == "base":
        return _copy(tokenizers[base])
    if block.source == "union":
        return _union(base, tokenizers, readers)
    folder = readers[block.source].folder if block.source in readers else Path(block.source)
    tokenizer = _load_tokenizer(folder) if folder.is_dir() else None
    if tokenizer is None:
        raise RecipeError(f"tokenizer source '{block.source}' is neither 'union', 'base' nor a model folder with "
                          "a tokenizer; fix the recipe's tokenizer source")
    return tokenizer


def _check_overrides(tokens: dict[str, TokenSetting], readers: dict[str, ModelReader]) -> None:
    for token, setting in tokens.items():
        source = setting.source
        model = source.model if isinstance(source, ModelTokenSource) else source
        if isinstance(model, str) and model not in readers:
            raise RecipeError(f"tokenizer.tokens['{token}'] takes its row from '{model}', which is not a model of "
                              f"this merge; use one of: {', '.join(readers)}")


def build_vocabulary(recipe: Recipe, readers: dict[str, ModelReader]) -> OutputVocabulary | None:
    """The output tokenizer and every input's source rows, or None when the recipe sets no tokenizer."""
    block = tokenizer_block(recipe)
    if block is None:
        return None
    tokens = block.tokens or {}
    _check_overrides(tokens, readers)
    refs = list(readers)
    base = recipe.base_model or refs[0]
    base_tokenizer = _load_tokenizer(readers[base].folder)
    if base_tokenizer is None:
        raise CheckpointError(f"{readers[base].folder} has no tokenizer, which a tokenizer merge starts "
                                      "from; add the base model's tokenizer files to the folder")
    tokenizers = {base: base_tokenizer}
    for ref in refs:  # an input without a tokenizer is taken to share the base's, as mergekit does
        if ref != base:
            tokenizers[ref] = _load_tokenizer(readers[ref].folder) or base_tokenizer
    tokenizer = _output_tokenizer(block, base, tokenizers, readers)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    multiple = block.pad_to_multiple_of
    rows = size if not multiple or size % multiple == 0 else (size // multiple + 1) * multiple
    sources, model_vocabs = {}, {}
    for ref in refs:
        model_vocab, limit = tokenizers[ref].get_vocab(), _vocab_size(readers[ref], tokenizers[ref])
        order = [-1] * size
        for tok, k in vocab.items():
            i = model_vocab.get(tok, -1)
            order[k] = i if i < limit else -1
        sources[ref] = order
        model_vocabs[ref] = model_vocab
    return OutputVocabulary(tokenizer, rows, sources, model_vocabs)


def _vocabulary_tensors(readers: dict[str, ModelReader], base: str) -> list[str]:
    reader = readers[base]
    return [n for n in reader.names if tensor_info(n, reader.config).kind in VOCABULARY_KINDS]


def _tensor_of(reader: ModelReader, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """An input's vocabulary tensor in ``dtype`` (the tied embedding for a missing head), or None."""
    if reader.has(name):
        return reader.get(name).to(dtype)
    if reader.config.get("tie_word_embeddings", False) and tensor_info(name, reader.config).kind == "head":
        for candidate in TIED_EMBEDDINGS:
            if reader.has(candidate):
                return reader.get(candidate).to(dtype)
    return None


def working_dtype(recipe: Recipe) -> torch.dtype:
    """float32, or under ``--compat mergekit`` the recipe's dtype (mergekit averages rows in it)."""
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    return names.get(recipe.dtype or "", torch.float32) if recipe.compat == "mergekit" else torch.float32


def _default_rows(vocabulary: OutputVocabulary, tokens: dict[str, TokenSetting], base: str,
                  tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per output token that needs one, the row every input without it (or under ``force``) gets."""
    defaults: dict[int, torch.Tensor] = {}
    models = list(tensors)
    first = next(iter(tensors.values()))
    hidden, dtype = first.shape[1:], first.dtype
    for tok, k in vocabulary.tokenizer.get_vocab().items():
        setting = tokens.get(tok)
        present = [m for m in models if vocabulary.sources[m][k] >= 0]
        if not (setting and setting.force) and len(present) == len(models):
            continue
        source = setting.source if setting is not None else None
        if isinstance(source, ZeroSource):
            defaults[k] = torch.zeros(hidden, dtype=dtype)
        elif isinstance(source, ModelTokenSource):
            row = source.token_id if source.token is None else vocabulary.model_vocabs[source.model].get(source.token)
            if row is None or not 0 <= row < tensors[source.model].shape[0]:
                raise RecipeError(f"tokenizer.tokens['{tok}']: {source.model} has no token "
                                  f"{source.token if source.token is not None else source.token_id}; "
                                  "name a token of that model")
            defaults[k] = tensors[source.model][row]
        elif isinstance(source, str):
            row = vocabulary.sources[source][k]
            if row < 0:
                raise RecipeError(f"tokenizer.tokens['{tok}'] takes its row from {source}, which lacks that "
                                  "token; use a model_token source naming one of its tokens")
            defaults[k] = tensors[source][row]
        elif len(present) == 1:
            defaults[k] = tensors[present[0]][vocabulary.sources[present[0]][k]]
        elif not present:
            defaults[k] = torch.zeros(hidden, dtype=dtype)
        elif base in present:
            defaults[k] = tensors[base][vocabulary.sources[base][k]]
        else:
            total = torch.zeros(hidden, dtype=dtype)
            for m in present:
                total = total + tensors[m][vocabulary.sources[m][k]]
            defaults[k] = total / len(present)
    return defaults


def prepare_inputs(recipe: Recipe, readers: dict[str, ModelReader]) -> dict[str, ModelReader]:
    """What ``open_inputs`` hands on: the recipe's chat template checked to resolve (so a bad one stops the merge
    before anything is written) and the inputs re-indexed to the output vocabulary (``remap_readers``)."""
    resolve_chat_template(recipe.chat_template, [r.folder for r in readers.values()])
    return remap_readers(recipe, readers)


def remap_readers(recipe: Recipe, readers: dict[str, ModelReader]) -> dict[str, ModelReader]:
    """The inputs with their vocabulary tensors re-indexed to the recipe's output tokenizer (unchanged when the
    recipe sets none). Reads every input's vocabulary tensors once, into memory."""
    vocabulary = build_vocabulary(recipe, readers)
    if vocabulary is None:
        return readers
    tokens = (recipe.tokenizer.tokens if recipe.tokenizer else None) or {}
    base = recipe.base_model or next(iter(readers))
    size = len(vocabulary.tokenizer.get_vocab())
    remapped: dict[str, dict[str, torch.Tensor]] = {ref: {} for ref in readers}
    dtype = working_dtype(recipe)
    by_id = sorted(vocabulary.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    forced = torch.tensor([bool(tokens.get(t) and tokens[t].force) for t, _ in by_id])
    for name in _vocabulary_tensors(readers, base):
        tensors = {ref: t for ref, r in readers.items() if (t := _tensor_of(r, name, dtype)) is not None}
        defaults = _default_rows(vocabulary, tokens, base, tensors)
        for ref, tensor in tensors.items():
            out = torch.zeros((vocabulary.rows, *tensor.shape[1:]), dtype=dtype)
            order = torch.tensor(vocabulary.sources[ref])
            own = (order >= 0) & ~forced
            out[:size][own] = tensor[order[own]]
            for k, row in defaults.items():
                if not own[k]:
                    out[k] = row
            if vocabulary.rows > size:
                out[size:] = out[:size].mean(dim=0)
            remapped[ref][name] = out
    result: dict[str, ModelReader] = {}
    for ref, reader in readers.items():
        fields = {f.name: getattr(reader, f.name) for f in dataclasses.fields(ModelReader)}
        entries = dict(reader.entries)
        for name, tensor in remapped[ref].items():
            file = reader.entries[name].file if reader.has(name) else next(iter(reader.entries.values())).file
            entries[name] = TensorEntry(file, tensor.dtype, tuple(tensor.shape))
        fields.update(entries=entries, config={**reader.config, "vocab_size": vocabulary.rows})
        result[ref] = RemappedReader(**fields, remapped=remapped[ref], vocabulary=vocabulary)
    return result
