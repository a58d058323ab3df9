"""Data-free diagonal Fisher of a causal LM from uniformly random tokens ([FIMMerging] eq. 7 and Algorithm 1,
step 1), shared by FIM-Merging and Karcher's ``fisher_precondition: diagonal``.

For each of ``N`` random sequences ``x_i`` (token ids uniform over the vocabulary, a fixed seed) the negative
log-likelihood of the sequence ``L_i = −log p(x_i | θ_0) = −Σ_t log p(x_{i,t+1} | x_{i,≤t})`` is backpropagated
and the squared gradient added: ``F = (1/N) Σ_i (∇L_i)²``. Gradients are per sequence (Algorithm 1 squares
``g_i`` inside the loop over samples), not of a batch loss: a batch gradient would square the *sum* of the
sequences' gradients and add their cross terms. The sequence NLL is a sum over tokens; a mean would multiply
every entry by the same constant, which the per-layer coefficients (median-centred logs) do not see.

Memory stays bounded: the model runs unit by unit from its checkpoint (``fisher_units``, ``streamed_lm``), one
decoder layer's weights and gradients at a time, and each unit's squared gradients are added straight into the
result file (``FisherFile``), which the consumers read one tensor at a time (``DiagonalFisher.stored``). A model
that cannot run unit by unit is loaded whole (one float32 model plus one accumulator; each gradient is folded
into its accumulator by a post-accumulate hook and dropped at once). Results are cached on disk
(``$MERGELAB_CACHE/fisher`` or ``~/.cache/mergelab/fisher``) keyed by the model's fingerprint, sampled content
hashes (``content_sample``) and the settings; the device and the way it ran are not part of the key (they agree
within float32 rounding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader
from mergelab.checkpoint.stored import StoredTensor
from mergelab.checkpoint.writer import PlannedTensor, safetensors_header
from mergelab.errors import CheckpointError, RecipeError
from mergelab.fisher_units import sequence_nll, unit_fisher
from mergelab.streamed_lm import StreamedLM, StreamingUnsupported, unloadable

log = logging.getLogger("mergelab")

CACHE_VERSION = 1
MAX_SAMPLES = 4096


@dataclass(frozen=True)
class FisherSettings:
    """How many random sequences, how long, from which seed (the paper's defaults: 8, 64, 42)."""

    samples: int = 8
    length: int = 64
    seed: int = 42


@dataclass(frozen=True)
class DiagonalFisher:
    """Per-element Fisher (float32, by checkpoint tensor name) in its safetensors file, and how it was obtained."""

    path: Path
    settings: FisherSettings
    seconds: float
    cached: bool

    def names(self) -> set[str]:
        from safetensors import safe_open

        with safe_open(self.path, "pt") as handle:
            return set(handle.keys())

    def stored(self, name: str) -> StoredTensor:
        """One tensor's Fisher, read when the tensor is merged."""
        return StoredTensor(self.path, name)

    def layer_scores(self, names_by_layer: dict[int, list[str]]) -> dict[int, float]:
        """``F^l``: the mean Fisher entry over the named tensors of each layer (Algorithm 1, step 1)."""
        present_names = self.names()
        scores = {}
        for layer, names in names_by_layer.items():
            total, count = 0.0, 0
            for name in names:
                if name in present_names:
                    tensor = self.stored(name).load()
                    total, count = total + float(tensor.double().sum()), count + tensor.numel()
            scores[layer] = total / count if count else 0.0
        return scores


class FisherFile:
    """The Fisher being computed: a float32 safetensors file written as ``NAME.PID.tmp``, its tensors zero until
    ``add`` sums into them (read, add, write back: one tensor in memory), renamed into place when its ``with``
    block ends without an error, removed when it ends with one."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], settings: FisherSettings):
        planned = [PlannedTensor(name, shape, torch.float32) for name, shape in shapes.items()]
        header = safetensors_header(planned, {"format": "pt", "settings": json.dumps(asdict(settings))})
        self.path = path
        self.tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self.places: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.written: set[str] = set()
        offset = len(header)
        for tensor in planned:
            self.places[tensor.name] = (offset, tensor.shape)
            offset += tensor.nbytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, offset)

    def add(self, name: str, value: torch.Tensor) -> None:
        offset, shape = self.places[name]
        value = value.detach().to("cpu", torch.float32).reshape(shape)
        if name in self.written:  # a second part (a tied weight, a later chunk of sequences): read, add
            stored = torch.empty(shape, dtype=torch.float32)
            self._transfer(os.preadv, stored, offset)
            value = stored.add_(value)
        self._transfer(os.pwritev, value.contiguous(), offset)
        self.written.add(name)

    def _transfer(self, call: Callable[..., int], tensor: torch.Tensor, offset: int) -> None:
        """Read or write all of a tensor's bytes at ``offset`` (one call moves at most about 2 GiB)."""
        view = memoryview(tensor.numpy()).cast("B")
        done = 0
        while done < len(view):
            moved = call(self.fd, [view[done:]], offset + done)
            if moved <= 0:
                raise OSError(f"{self.tmp}: short read or write at byte {offset + done}")
            done += moved

    def __enter__(self) -> FisherFile:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        """Complete: fsync and rename into place; failed or interrupted: remove the partial file."""
        if kind is None:
            os.fsync(self.fd)
        os.close(self.fd)
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def cache_root() -> Path:
    root = os.environ.get("MERGELAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mergelab") / "fisher"


def vocab_size(config: dict[str, Any], folder: Path) -> int:
    """The vocabulary size random tokens are drawn from, from ``config.json`` (or its ``text_config``)."""
    for cfg in (config, config.get("text_config") or {}):
        size = cfg.get("vocab_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 1:
            return size
    raise CheckpointError(f"{folder}: config.json gives no vocab_size (an integer above 1), so random tokens "
                          "cannot be drawn for the Fisher; add vocab_size to config.json")


def max_length(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        size = cfg.get("max_position_embeddings")
        if isinstance(size, int) and size > 0:
            return size
    return None


def check_settings(settings: FisherSettings, config: dict[str, Any], folder: Path) -> None:
    """Reject sample counts and lengths the Fisher cannot use, naming the key to change."""
    if not 1 <= settings.samples <= MAX_SAMPLES:
        raise RecipeError(f"fisher_samples = {settings.samples} is out of range [1, {MAX_SAMPLES}]; the paper "
                          "uses 8")
    limit = max_length(config)
    if settings.length < 2 or (limit is not None and settings.length > limit):
        raise RecipeError(f"fisher_length = {settings.length} is out of range [2, {limit or 'inf'}] for {folder} "
                          "(a sequence needs two tokens and must fit max_position_embeddings); the paper uses 64")


def random_tokens(settings: FisherSettings, vocab: int) -> torch.Tensor:
    """The ``(N, length)`` uniformly random token ids, drawn on the CPU so every device sees the same ones."""
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randint(vocab, (settings.samples, settings.length), generator=generator)


def load_causal_lm(folder: Path, device: str) -> torch.nn.Module:
    """The model in float32 and eval mode, or a ``CheckpointError`` suggesting a method that needs no forward pass."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - any failure to build the model means the same to the user
        raise unloadable(folder, error) from None
    return model.to(device).eval()


def whole_model_fisher(folder: Path, tokens: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """``F = (1/N) Σ_i (∇_θ L_i)²`` with the whole model in memory, one backward pass per sequence (eq. 7)."""
    model = load_causal_lm(folder, device)
    accumulators: dict[str, torch.Tensor] = {}
    hooks = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(True)
        accumulator = torch.zeros_like(parameter)
        accumulators[name] = accumulator

        def fold(p: torch.Tensor, acc: torch.Tensor = accumulator) -> None:
            acc.addcmul_(p.grad, p.grad, value=1.0 / len(tokens))
            p.grad = None

        hooks.append(parameter.register_post_accumulate_grad_hook(fold))
    try:
        for row in tokens:
            tokens_row = row[None].to(device)
            sequence_nll(model(input_ids=tokens_row, use_cache=False).logits, tokens_row).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return accumulators


def compute_fisher(reader: ModelReader, settings: FisherSettings, path: Path, device: str = "cpu",
                   streamed: bool = True) -> None:
    """Write ``F = (1/N) Σ_i (∇_θ L_i)²`` over ``N`` random sequences (eq. 7) to ``path``: unit by unit from the
    checkpoint (``fisher_units``) where the model allows, else (or with ``streamed=False``) the whole model."""
    check_settings(settings, reader.config, reader.folder)
    tokens = random_tokens(settings, vocab_size(reader.config, reader.folder))
    if streamed:
        try:
            lm = StreamedLM(reader, device)
            with FisherFile(path, {n: tuple(p.shape) for n, p in lm.model.named_parameters()}, settings) as output:
                unit_fisher(lm, tokens, output.add)
            return
        except StreamingUnsupported as reason:
            log.info("%s: the Fisher runs the whole model (%s)", reader.folder, reason)
    elements = whole_model_fisher(reader.folder, tokens, device)
    with FisherFile(path, {n: tuple(t.shape) for n, t in elements.items()}, settings) as output:
        for name, value in elements.items():
            output.add(name, value)


def content_sample(reader: ModelReader, chunk: int = 1 << 20) -> list[str]:
    """SHA-256 of three 1 MiB chunks (start, middle, end) of each weight file.

    ``ModelReader.fingerprint`` hashes headers and sizes only, which two fine-tunes of one architecture share;
    a Fisher cache keyed by it alone would hand one model's Fisher to another.
    """
    digests = []
    for file in sorted({entry.file for entry in reader.entries.values()}):
        size = file.stat().st_size
        with open(file, "rb") as handle:
            for start in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                handle.seek(start)
                digests.append(hashlib.sha256(handle.read(chunk)).hexdigest())
    return digests


def cache_key(reader: ModelReader, settings: FisherSettings) -> str:
    parts = {"fingerprint": reader.fingerprint, "content": content_sample(reader), "settings": asdict(settings),
             "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def diagonal_fisher(reader: ModelReader, settings: FisherSettings = FisherSettings(), device: str = "cpu"
                    ) -> DiagonalFisher:
    """The base model's diagonal Fisher, from the on-disk cache when this model and these settings were seen."""
    check_settings(settings, reader.config, reader.folder)
    path = cache_root() / f"{cache_key(reader, settings)}.safetensors"
    if path.exists():
        return DiagonalFisher(path, settings, 0.0, True)
    started = time.perf_counter()
    compute_fisher(reader, settings, path, device)
    return DiagonalFisher(path, settings, time.perf_counter() - started, False)
