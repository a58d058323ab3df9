"""How to run a merge (never what to compute: that is the recipe), and the seeds and identity derived from it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from mergelab.plan.data import DEFAULT_SHARD_SIZE, MergePlan


@dataclass
class MergeOptions:
    """How to run a merge (never what to compute: that is the recipe).

    Sizes in elements: ``chunk_elements`` per row block read from disk; ``stream_elements``: ``TwoPass`` methods
    read larger tensors in blocks, once per statistics pass; ``tile_elements`` per tile computed from a piece
    (cache-sized). ``compute_threads``: pieces of elementwise and ``TwoPass`` methods computed side by side on
    the CPU, each on one torch thread (not for a method with ``needs_whole`` tensors, whose SVDs use torch's
    threads: all its pieces run on the calling thread). Parallel pieces rather than multi-threaded torch ops:
    with OpenMP threads on a shared 2-core machine every op waited in a barrier for a busy core (4x the CPU time
    for the same merge), while independent pieces never wait for each other.
    """

    device: str = "cpu"
    float64: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    resume: bool = False
    allow_pickle: bool = False
    allow_mixed: bool = False
    strict: bool = False
    seed: int | None = None
    read_ahead: int = 2
    read_threads: int = 2
    chunk_elements: int = 1 << 22
    stream_elements: int = 1 << 24
    tile_elements: int = 1 << 18
    compute_threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    progress: bool = True


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are computed in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def plan_key(plan: MergePlan, options: MergeOptions) -> str:
    """Identity of a merge's output: recipe, input fingerprints and the options that change bytes."""
    parts = {
        "recipe": plan.recipe.model_dump(mode="json"),
        "inputs": {ref: r.fingerprint for ref, r in plan.readers.items()},
        "shard_size": options.shard_size, "float64": options.float64, "seed": options.seed,
        "device": options.device,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
