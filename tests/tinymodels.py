"""Tiny Hugging Face model folders for tests, built in seconds with transformers, and a mergekit runner.

mergekit is the reference implementation: it is run as its own program (``mergekit-yaml``), never imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ARCHS = ("llama", "qwen2")


def make_base(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 32, vocab: int = 96, seed: int = 0,
              tie: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Save a randomly initialised causal LM with ``layers`` layers to ``path`` (safetensors, config)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # default init leaves norms at exactly 1: perturb so they are worth merging
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return Path(path)


def make_expert(base: Path, path: Path, seed: int, scale: float = 0.02, density: float = 1.0,
                dtype: torch.dtype | None = None) -> Path:
    """Copy ``base`` to ``path`` with every tensor moved by seeded Gaussian noise (optionally sparse)."""
    shutil.copytree(base, path)
    weights_file = Path(path) / "model.safetensors"
    tensors = load_file(weights_file)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        noise = torch.randn(t.shape, generator=gen) * scale
        if density < 1.0:
            noise = noise * (torch.rand(t.shape, generator=gen) < density)
        out[name] = (t.float() + noise).to(dtype or t.dtype).contiguous()
    save_file(out, weights_file, metadata={"format": "pt"})
    return Path(path)


def make_family(root: Path, n_experts: int = 2, arch: str = "llama", **base_kwargs) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts under ``root``; returns (base, experts)."""
    base = make_base(root / "base", arch=arch, **base_kwargs)
    experts = [make_expert(base, root / f"expert{i}", seed=100 + i) for i in range(n_experts)]
    return base, experts


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_mergekit(recipe: dict, workdir: Path, out_name: str = "mergekit_out") -> Path:
    """Run ``mergekit-yaml`` on ``recipe`` (CPU, offline) and return the output folder.

    Model paths in the recipe must be absolute: mergekit takes a relative path for a hub repository id.
    """
    recipe_path = write_recipe(workdir / f"{out_name}.yml", recipe)
    out = workdir / out_name
    exe = Path(sys.executable).with_name("mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(exe), str(recipe_path), str(out), "--allow-crimes", "--no-lazy-unpickle"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors model folder."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def merges_in_pieces(recipe: dict, workdir: Path, monkeypatch, tiles: tuple[int, ...] = (40,)
                     ) -> tuple[Path, list[Path], list[str]]:
    """``recipe`` merged with whole tensors in one tile, in tiny tiles (of each of ``tiles`` elements: 1-D
    tensors in pieces), and with every tensor streamed from disk in row blocks, statistics passes included.
    Returns the whole-tensor output, the others, and the tensors whose statistics passes were read in blocks
    (spied on ``stream.pipeline.observe_piece``; none in the whole-tensor merge, which is checked)."""
    import mergelab.stream.pipeline as pipeline
    from mergelab.api import merge

    observed: list[str] = []
    original = pipeline.observe_piece
    monkeypatch.setattr(pipeline, "observe_piece", lambda run, piece, *args: (observed.append(piece.job.name),
                                                                         original(run, piece, *args)))
    whole = merge(recipe, workdir / "whole", tile_elements=1 << 30)
    assert observed == [], "the whole-tensor merge streamed a statistics pass"
    outputs = [merge(recipe, workdir / f"tiled{n}", tile_elements=n) for n in tiles]
    outputs.append(merge(recipe, workdir / "streamed", chunk_elements=100, stream_elements=0))
    return whole, outputs, observed


def assert_same_merges(reference: Path, outputs: list[Path]) -> dict:
    """Every folder of ``outputs`` holds ``reference``'s shard files, byte for byte, and its per-tensor statistics
    in ``mergelab.json``; returns those statistics."""
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    stats = json.loads((reference / "mergelab.json").read_text())["tensors"]
    for out in outputs:
        assert sorted(p.name for p in out.glob("*.safetensors")) == shards
        for shard in shards:
            assert (out / shard).read_bytes() == (reference / shard).read_bytes(), (out.name, shard)
        assert json.loads((out / "mergelab.json").read_text())["tensors"] == stats
    return stats
