"""A PEFT LoRA adapter as a merge input: the base's reader, with each adapted tensor computed when it is read.

``W' = W + s * B @ A`` per adapted linear layer, with ``s = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` for
rsLoRA (``peft_format.lora_scale``); for DoRA (Liu et al. 2024), peft's merge
(``peft.tuners.lora.variants.DoraLinearVariant.merge_unsafe``):

    W' = (m / ||W + s * B @ A||_row) * (W + s * B @ A)

where the norm is taken over each output row (``dim=1``) and ``m`` is ``lora_magnitude_vector``. Embedding layers
(``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``) add ``s * (B @ A)^T``; ``fan_in_fan_out``
layers add the transposed product too. ``modules_to_save`` tensors (and embedding layers peft saved whole)
replace the base's. Everything is computed in float32 and returned in the base tensor's dtype, as peft's
``merge_and_unload`` stores it, row block by row block where the engine reads blocks; nothing merged is written
to disk. The adapter's own tensors (small by design) are loaded when the adapter is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.config import Recipe
from mergelab.errors import CheckpointError, CompatibilityError
from mergelab.lora.peft_format import KEY_PREFIX, WEIGHTS_FILE, is_adapter_folder, lora_scale, read_adapter_config
from mergelab.model_refs import locate_model_ref, resolve_model_ref

WEIGHT = ".weight"
LORA_KEYS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_embedding_A": "a", "lora_embedding_B": "b",
             "lora_magnitude_vector": "magnitude"}


@dataclass
class LoraDelta:
    """One adapted tensor's factors: ``a`` ``[r, in]``, ``b`` ``[out, r]`` (``transposed``: the delta is
    ``(B @ A)^T``, for embeddings and fan_in_fan_out layers), the scale, and DoRA's magnitude if any."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0
    transposed: bool = False
    magnitude: torch.Tensor | None = None

    def rows(self, rows: tuple[int, int] | None) -> torch.Tensor:
        """``s * B @ A`` for rows ``[start, stop)`` of the adapted tensor (all rows when None), in float32."""
        first, last = rows if rows is not None else (0, None)
        if self.transposed:
            return (self.b.float() @ self.a[:, first:last].float()).T * self.scale
        return (self.b[first:last].float() @ self.a.float()) * self.scale

    def apply(self, weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        adapted = weight.float() + self.rows(rows)
        if self.magnitude is not None:  # DoRA: each output row rescaled to its learned magnitude
            first, last = rows if rows is not None else (0, None)
            norm = torch.linalg.norm(adapted, dim=1)
            adapted = (self.magnitude[first:last].float() / norm)[:, None] * adapted
        return adapted.to(weight.dtype)


@dataclass
class AdaptedReader(ModelReader):
    """A ModelReader over ``base`` whose adapted tensors include the adapter; ``folder`` and ``config`` are the
    base's (tokenizer, generation config and architecture come from there), ``fingerprint`` covers both."""

    base: ModelReader | None = None
    adapter_folder: Path | None = None
    base_given: bool = False  # named as BASE+ADAPTER (else the base came from adapter_config.json)
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.replaced:  # modules_to_save, or an embedding layer saved whole (then also adapted)
            tensor = self.replaced[name] if rows is None else self.replaced[name][rows[0]: rows[1]]
        else:
            tensor = self.base.get(name, rows)
        delta = self.deltas.get(name)
        return tensor if delta is None else delta.apply(tensor, rows)

    def close(self) -> None:
        self.base.close()


def _split_key(key: str) -> tuple[str, str]:
    """``(module name, LORA_KEYS kind or '')`` of an adapter tensor key."""
    if not key.startswith(KEY_PREFIX):
        raise CheckpointError(f"adapter tensor '{key}' does not start with '{KEY_PREFIX}'; is this a peft adapter?")
    key = key[len(KEY_PREFIX):]
    for suffix, kind in LORA_KEYS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind
    return key, ""


def load_adapter(adapter: Path, base: ModelReader, base_given: bool = False) -> AdaptedReader:
    """Wrap ``base`` with the adapter in folder ``adapter``, after checking that every adapted tensor exists in
    the base with the shape the factors imply."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter)
    tensors = load_file(adapter / WEIGHTS_FILE)
    deltas: dict[str, LoraDelta] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, kind = _split_key(key)
        if not kind:
            name = module.replace(".base_layer.", ".")  # an embedding layer peft saved whole
            _expect(base, name, tuple(tensor.shape), adapter, key)
            replaced[name] = tensor
            continue
        name = module + WEIGHT
        if not base.has(name):
            raise CompatibilityError(f"{adapter}: adapter tensor '{key}' adapts '{name}', which the base "
                                     f"{base.folder} lacks; this adapter was trained for another base model")
        delta = deltas.setdefault(name, LoraDelta(scale=lora_scale(config, module),
                                                  transposed="embedding" in key or bool(config.get("fan_in_fan_out"))))
        setattr(delta, kind, tensor)
    for name, delta in deltas.items():
        _check_delta(base, name, delta, adapter)
    fingerprint = dict(base.fingerprint)
    stat = (adapter / WEIGHTS_FILE).stat()
    fingerprint[f"adapter:{adapter}"] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                         "config": json.dumps(config, sort_keys=True)}
    return AdaptedReader(folder=base.folder, config=base.config, entries=base.entries, fingerprint=fingerprint,
                         base=base, adapter_folder=adapter, base_given=base_given, deltas=deltas, replaced=replaced)


def _expect(base: ModelReader, name: str, shape: tuple[int, ...], adapter: Path, key: str) -> None:
    if not base.has(name) or base.shape(name) != shape:
        found = list(base.shape(name)) if base.has(name) else "no such tensor"
        raise CompatibilityError(f"{adapter}: adapter tensor '{key}' needs base tensor '{name}' of shape "
                                 f"{list(shape)}, but the base {base.folder} has {found}; this adapter was trained "
                                 "for another base model")


def _check_delta(base: ModelReader, name: str, delta: LoraDelta, adapter: Path) -> None:
    """The factors are complete and ``B @ A`` (transposed where it is) has the base tensor's shape."""
    if delta.a is None or delta.b is None:
        raise CheckpointError(f"{adapter}: '{name}' has only one of its LoRA factors; re-save the adapter")
    if delta.a.dim() != 2 or delta.b.dim() != 2:
        raise CompatibilityError(f"{adapter}: '{name}' has LoRA factors of {delta.a.dim()} and {delta.b.dim()} "
                                 "dimensions; only linear and embedding layers are supported")
    shape = (delta.a.shape[1], delta.b.shape[0]) if delta.transposed else (delta.b.shape[0], delta.a.shape[1])
    if delta.a.shape[0] != delta.b.shape[1]:
        raise CheckpointError(f"{adapter}: '{name}' has factors of ranks {delta.a.shape[0]} and {delta.b.shape[1]}")
    _expect(base, name, shape, adapter, name.removesuffix(WEIGHT) + " (lora_B @ lora_A)")
    if delta.magnitude is not None and (delta.transposed or delta.magnitude.shape != (shape[0],)):
        raise CompatibilityError(f"{adapter}: DoRA on '{name}' is supported for linear layers (not embeddings or "
                                 "fan_in_fan_out layers), with one magnitude per output row")


def split_base_adapter(ref: str, recipe_dir: Path | None) -> tuple[str | None, str]:
    """``(base, adapter)`` for ``BASE+ADAPTER`` (mergekit's syntax), ``(None, ref)`` otherwise; a reference
    that exists as written is never split (a folder name may hold a '+')."""
    if "+" not in ref or locate_model_ref(ref, recipe_dir) is not None:
        return None, ref
    base, _, adapter = ref.rpartition("+")
    return base, adapter


def open_input(ref: str, recipe_dir: Path | None, allow_pickle: bool = False) -> ModelReader:
    """A recipe's model reference opened for reading: a model folder, an adapter folder (its base from
    ``base_model_name_or_path``, resolved like recipe paths), or ``BASE+ADAPTER``."""
    base_ref, adapter_ref = split_base_adapter(ref, recipe_dir)
    path = resolve_model_ref(adapter_ref, recipe_dir, adapters=True)
    if base_ref is None and not (path.is_dir() and is_adapter_folder(path)):
        return open_model(path, allow_pickle=allow_pickle)
    if not is_adapter_folder(path):
        raise CheckpointError(f"'{ref}': {path} is not a peft adapter folder (no adapter_config.json); write "
                              "BASE+ADAPTER with an adapter folder after the '+'")
    base_given = base_ref is not None
    if not base_given:
        base_ref = read_adapter_config(path).get("base_model_name_or_path") or ""
        if not (located := locate_model_ref(base_ref, recipe_dir)) or not located.is_dir():
            raise CheckpointError(f"adapter {path} names base model '{base_ref}', which is not a local folder; "
                                  f"write the base's folder in the recipe as BASE+{adapter_ref}")
    base = open_model(resolve_model_ref(base_ref, recipe_dir), allow_pickle=allow_pickle)
    try:
        return load_adapter(path, base, base_given)
    except BaseException:
        base.close()
        raise


def _same_weights(a: ModelReader, b: ModelReader) -> bool:
    """Whether two readers hold the same weights: the same folder, or files of equal headers and sizes whose
    sampled contents agree (``fisher.content_sample``; pickles: their full SHA-256 in the fingerprint)."""
    from mergelab.fisher import content_sample

    if a.folder.resolve() == b.folder.resolve():
        return True
    if a.fingerprint.keys() != b.fingerprint.keys() or any(
            {k: v for k, v in a.fingerprint[f].items() if k != "mtime_ns"}
            != {k: v for k, v in b.fingerprint[f].items() if k != "mtime_ns"} for f in a.fingerprint):
        return False
    return a.pickle_state is not None or content_sample(a) == content_sample(b)


def check_adapter_bases(recipe: Recipe, readers: dict[str, ModelReader]) -> None:
    """An adapter named alone must have been trained on the recipe's base_model (same weight files): applying it
    to another base silently would merge the wrong task vector."""
    if recipe.base_model is None or recipe.base_model not in readers:
        return
    base = readers[recipe.base_model]
    for ref, reader in readers.items():
        if not isinstance(reader, AdaptedReader) or ref == recipe.base_model or reader.base_given:
            continue
        if not _same_weights(reader.base, base):
            raise CompatibilityError(f"adapter {ref} was trained on {reader.base.folder}, not on the recipe's "
                                     f"base_model {recipe.base_model}; write {recipe.base_model}+{ref} to apply it "
                                     "to the recipe's base anyway, or use its own base")


def adapter_notes(readers: dict[str, ModelReader]) -> list[str]:
    """``mergelab check``'s lines on adapter inputs: base, ranks, scales and variants of each."""
    notes = []
    for ref, reader in readers.items():
        if not isinstance(reader, AdaptedReader):
            continue
        ranks = sorted({d.a.shape[0] for d in reader.deltas.values()})
        scales = sorted({round(d.scale, 6) for d in reader.deltas.values()})
        dora = sum(d.magnitude is not None for d in reader.deltas.values())
        notes.append(f"{ref}: peft LoRA adapter applied on read to base {reader.base.folder} "
                     f"({'named as BASE+ADAPTER' if reader.base_given else 'from adapter_config.json'}): "
                     f"{len(reader.deltas)} adapted tensors, rank {'/'.join(map(str, ranks))}, scale "
                     f"{'/'.join(f'{s:g}' for s in scales)}" + (f", DoRA on {dora}" if dora else "")
                     + (f", {len(reader.replaced)} tensors replaced whole" if reader.replaced else ""))
    return notes
