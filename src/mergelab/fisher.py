"""Data-free diagonal Fisher of a causal LM from uniformly random tokens ([FIMMerging] eq. 7 and Algorithm 1,
step 1), shared by FIM-Merging and Karcher's ``fisher_precondition: diagonal``.

For each of ``N`` random sequences ``x_i`` (token ids uniform over the vocabulary, a fixed seed) the negative
log-likelihood of the sequence ``L_i = −log p(x_i | θ_0) = −Σ_t log p(x_{i,t+1} | x_{i,≤t})`` is backpropagated
and the squared gradient added: ``F = (1/N) Σ_i (∇L_i)²``. Gradients are per sequence (Algorithm 1 squares
``g_i`` inside the loop over samples), not of a batch loss: a batch gradient would square the *sum* of the
sequences' gradients and add their cross terms. The sequence NLL is a sum over tokens; a mean would multiply
every entry by the same constant, which the per-layer coefficients (median-centred logs) do not see.

Memory stays near one model plus one accumulator: each parameter's gradient is folded into its accumulator by a
post-accumulate hook and dropped at once, so all gradients are never held together. Results are cached on disk
(``$MERGELAB_CACHE/fisher`` or ``~/.cache/mergelab/fisher``) keyed by the model's fingerprint, sampled content
hashes (``content_sample``) and the settings; the device is not part of the key (CPU and CUDA agree within
float32 rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader
from mergelab.errors import CheckpointError, RecipeError

CACHE_VERSION = 1
MAX_SAMPLES = 4096


@dataclass(frozen=True)
class FisherSettings:
    """How many random sequences, how long, from which seed (the paper's defaults: 8, 64, 42)."""

    samples: int = 8
    length: int = 64
    seed: int = 42


@dataclass
class DiagonalFisher:
    """Per-element Fisher (float32, CPU, by checkpoint tensor name) and how it was obtained."""

    elements: dict[str, torch.Tensor]
    settings: FisherSettings
    seconds: float
    cached: bool
    path: Path | None

    def layer_scores(self, names_by_layer: dict[int, list[str]]) -> dict[int, float]:
        """``F^l``: the mean Fisher entry over the named tensors of each layer (Algorithm 1, step 1)."""
        scores = {}
        for layer, names in names_by_layer.items():
            present = [self.elements[n] for n in names if n in self.elements]
            total = sum(float(t.double().sum()) for t in present)
            count = sum(t.numel() for t in present)
            scores[layer] = total / count if count else 0.0
        return scores


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
        raise CheckpointError(f"{folder}: transformers cannot load this model as a causal LM ({type(error).__name__}: "
                              f"{str(error)[:200]}); FIM-Merging needs to run the base, use task_arithmetic or "
                              "ties instead") from None
    return model.to(device).eval()


def sequence_nll(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``−log p(x)`` of each sequence in ``tokens`` (B, T): next-token NLL summed over positions, shape (B,)."""
    logits = model(input_ids=tokens).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return nll.sum(dim=1)


def compute_fisher(folder: Path, config: dict[str, Any], settings: FisherSettings, device: str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """``F = (1/N) Σ_i (∇_θ L_i)²`` over ``N`` random sequences, one backward pass per sequence (eq. 7)."""
    check_settings(settings, config, folder)
    tokens = random_tokens(settings, vocab_size(config, folder))
    model = load_causal_lm(folder, device)
    accumulators: dict[str, torch.Tensor] = {}
    hooks = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(True)
        accumulator = torch.zeros_like(parameter)
        accumulators[name] = accumulator

        def fold(p: torch.Tensor, acc: torch.Tensor = accumulator) -> None:
            acc.addcmul_(p.grad, p.grad, value=1.0 / settings.samples)
            p.grad = None

        hooks.append(parameter.register_post_accumulate_grad_hook(fold))
    try:
        for row in tokens:
            sequence_nll(model, row[None].to(device)).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: acc.cpu() for name, acc in accumulators.items()}


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


def diagonal_fisher(reader: ModelReader, settings: FisherSettings = FisherSettings(), device: str = "cpu",
                    use_cache: bool = True) -> DiagonalFisher:
    """The base model's diagonal Fisher, from the on-disk cache when this model and these settings were seen."""
    from safetensors.torch import load_file, save_file

    check_settings(settings, reader.config, reader.folder)
    path = cache_root() / f"{cache_key(reader, settings)}.safetensors"
    if use_cache and path.exists():
        return DiagonalFisher(load_file(path), settings, 0.0, True, path)
    started = time.perf_counter()
    elements = compute_fisher(reader.folder, reader.config, settings, device)
    seconds = time.perf_counter() - started
    if not use_cache:
        return DiagonalFisher(elements, settings, seconds, False, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    metadata = {"settings": json.dumps(asdict(settings))}
    save_file({n: t.contiguous() for n, t in elements.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return DiagonalFisher(elements, settings, seconds, False, path)
