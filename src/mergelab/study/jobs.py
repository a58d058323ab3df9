"""Study jobs: one merge-and-evaluate unit of work, keyed by a content hash, stored once.

A ``Job`` says what to merge (a recipe) or which existing model to score, and what to measure on the
result: task accuracy and stability (``mergelab.evaluation``), vision accuracy with each task's head, the
weight-space and function-space diagnostics, and layer blocking. ``job_key`` hashes everything that decides
the result: the job's own fields, the identity of every input model (a zoo member's cache key, otherwise its
safetensors files' sizes, modification times and header hashes) and a hash of mergelab's source code. ``run_job`` writes
the result to ``<store>/results/<key>.json`` atomically and returns it; a stored result is returned as is, so
a killed study resumes where it stopped and a finished job is never recomputed, whichever executor runs it.

Every job runs on one CPU thread with deterministic kernels, so its numbers do not depend on the executor,
the number of workers or the machine's load.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mergelab
from mergelab.errors import MergelabError

RESULTS = "results"
MERGES = "merges"


@dataclass
class Job:
    """One unit of a study. ``recipe`` (a mergekit-shaped dict with absolute model paths) is merged, or,
    when it is None, ``model`` is scored as it is.

    ``tasks`` are scored by ``mergelab.evaluation.runner.evaluate`` with ``n_items``, ``n_samples`` and
    ``eval_options``; ``vision_tasks`` by ``mergelab.zoo.vision.evaluate`` with the heads in ``heads``;
    ``weights``/``activations`` are keyword arguments of the diagnostics of the same name (they must name
    ``base`` and ``experts``); ``blocking`` those of ``layer_blocking`` (``base``, ``task``, ...); ``heldout``
    those of ``mergelab.evaluation.heldout.domain_figures`` (``size``, ``domains``, ...): per-domain held-out
    perplexity and long continuations on the smollm2 zoo's text domains."""

    label: str
    recipe: dict[str, Any] | None = None
    model: str | None = None
    tasks: list[str] = field(default_factory=list)
    n_items: int = 50
    n_samples: int = 1
    eval_options: dict[str, Any] = field(default_factory=dict)
    vision_tasks: list[str] = field(default_factory=list)
    heads: str | None = None
    weights: dict[str, Any] | None = None
    activations: dict[str, Any] | None = None
    blocking: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.recipe is None) == (self.model is None):
            raise ValueError(f"job {self.label!r} needs exactly one of recipe and model")

    def inputs(self) -> list[str]:
        """Every model folder the job reads."""
        paths = [self.model] if self.model else recipe_models(self.recipe or {})
        for extra in (self.weights, self.activations, self.blocking):
            if extra:
                paths += [extra["base"], *extra.get("experts", [])]
        return sorted(set(map(str, paths)))


def recipe_models(recipe: dict[str, Any]) -> list[str]:
    """The model folders a recipe names (base, models, slice sources, tokenizer source)."""
    found = [recipe.get("base_model")]
    found += [m["model"] for m in recipe.get("models", [])]
    for piece in recipe.get("slices", []):
        found += [s["model"] for s in piece.get("sources", [])]
    return [str(p) for p in found if p]


def model_identity(folder: str | Path) -> str:
    """A zoo member's cache key (it hashes the code and settings that made the weights); for any other folder,
    a hash of its safetensors files' names, sizes, modification times and headers."""
    folder = Path(folder)
    member = folder / "zoo_member.json"
    if member.is_file():
        return "zoo:" + json.loads(member.read_text())["key"]
    from mergelab.checkpoint.reader import open_model

    try:
        fingerprint = open_model(folder).fingerprint
    except MergelabError as exc:
        raise MergelabError(f"Study input {folder} cannot be read ({exc}); build or fix it and rerun.") from exc
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """Hash of mergelab's source, docstrings and comments aside (the zoo's rule, ``code_without_docs``):
    results computed by other code are not reused, and a documentation edit keeps a study's finished jobs."""
    from mergelab.zoo.builder import code_without_docs

    digest = hashlib.sha256(mergelab.__version__.encode())
    package = Path(mergelab.__file__).parent
    for file in sorted(package.rglob("*.py")):
        digest.update(str(file.relative_to(package)).encode() + code_without_docs(file.read_text()).encode())
    return digest.hexdigest()[:16]


def job_key(job: Job) -> str:
    """Content hash of the job: its fields, its inputs' identities and the mergelab code."""
    body = {
        "job": {k: v for k, v in dataclasses.asdict(job).items() if k != "label"},
        "inputs": {path: model_identity(path) for path in job.inputs()},
        "mergelab": code_version(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def stored(store: Path, key: str) -> dict[str, Any] | None:
    """The stored result of job ``key``, or None when it has not finished."""
    path = Path(store) / RESULTS / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_job(job: Job, key: str, store: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Run ``job`` (merge, then measure) unless its result is stored; store and return the result.

    The merged folder lives under ``<store>/merges/<key>`` while the job runs and is removed afterwards."""
    store = Path(store)
    done = stored(store, key)
    if done is not None:
        return done
    import torch

    started = time.perf_counter()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    merged = store / MERGES / key
    try:
        result = _measure(job, _materialise(job, merged, device), device)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(merged.with_name(merged.name + ".partial"), ignore_errors=True)
    result = {"key": key, "label": job.label, **result, "seconds": round(time.perf_counter() - started, 3)}
    _write_atomic(store / RESULTS / f"{key}.json", result)
    return result


def _materialise(job: Job, merged: Path, device: str) -> Path:
    if job.recipe is None:
        return Path(job.model)
    from mergelab.api import merge

    merged.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(merged.with_name(merged.name + ".partial"), ignore_errors=True)  # left by a killed study
    merge(job.recipe, merged, overwrite=True, device=device, progress=False)
    return merged


def _measure(job: Job, model: Path, device: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if job.recipe is not None:
        result["merge"] = merge_summary(model)
    if job.tasks:
        from mergelab.evaluation.runner import evaluate

        result["eval"] = evaluate(model, job.tasks, n_items=job.n_items, n_samples=job.n_samples, device=device,
                                  progress=False, **job.eval_options)["tasks"]
    if job.vision_tasks:
        from mergelab.zoo import vision

        result["vision"] = {task: vision.evaluate(model, task, n=job.n_items, heads=job.heads, device=device)
                            for task in job.vision_tasks}
    if job.heldout:
        from mergelab.evaluation.heldout import domain_figures

        result["heldout"] = domain_figures(model, device=device, **job.heldout)
    if job.weights:
        from mergelab.diagnostics.weights import weight_diagnostics

        result["weights"] = weight_diagnostics(model, device=device, progress=False, **job.weights)
    if job.activations:
        from mergelab.diagnostics.activations import activation_diagnostics

        result["activations"] = activation_diagnostics(model, device=device, progress=False, **job.activations)
    if job.blocking:
        from mergelab.diagnostics.blocking import layer_blocking

        result["blocking"] = layer_blocking(model, device=device, progress=False, **job.blocking)
    return _jsonable(result)


def merge_summary(merged: Path) -> dict[str, Any]:
    """From ``mergelab.json``: the fraction of elements left equal to the recipe's base (None for a recipe without
    one), and the records of model-level passes (FIM's per-layer α, calibration scales)."""
    record = json.loads((merged / "mergelab.json").read_text())
    tensors = record["tensors"].values()
    total = sum(s["numel"] for s in tensors)
    changed = sum(s.get("changed_from_base", 0.0) * s["numel"] for s in tensors)
    has_base = bool(record["recipe"].get("base_model"))
    summary = {"unchanged_from_base": 1.0 - changed / total if total and has_base else None}
    for name in ("prepare", "finish"):
        if record.get(name):
            summary[name] = _without(record[name], RUN_DEPENDENT)
    return summary


# facts of one run, not of the result (a cache hit, timings): left out so results compare across runs
RUN_DEPENDENT = frozenset({"seconds", "cached", "cache_file"})


def _without(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tensors and numpy scalars become numbers or lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MergelabError(f"Could not store a study result in {path.parent} ({exc.strerror}); free space "
                            "and rerun: finished jobs are kept.") from exc
