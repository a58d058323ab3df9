"""``mergelab diagnose MERGED --base B --experts E1 ... --out DIR``: weight and function-space diagnostics."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diagnose(
    merged: str | Path,
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    *,
    weights: bool = True,
    activations: bool = True,
    k: int = 16,
    svd: bool = True,
    spectra_layers: Sequence[int] | None = None,
    n_probes: int = 8,
    probe_length: int = 32,
    probe_task: str | None = None,
    nl_layers: Sequence[int] | None = None,
    block_task: str | None = None,
    block_items: int = 20,
    block_layers: Sequence[int] | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen diagnostics, write JSON, plots and summary.md to ``out``; return the results dict.

    Each part records its wall time and the process's peak resident memory after it (``timing``).
    """
    from mergelab.diagnostics.activations import activation_diagnostics
    from mergelab.diagnostics.blocking import layer_blocking
    from mergelab.diagnostics.report import write_report
    from mergelab.diagnostics.weights import weight_diagnostics
    from mergelab.evaluation.runner import resolve_tasks

    results: dict[str, Any] = {"timing": {}}

    def timed(part: str, fn, *args, **kwargs) -> None:
        start = time.perf_counter()
        results[part] = fn(*args, **kwargs)
        results["timing"][part] = {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}

    if weights:
        timed(
            "weights",
            weight_diagnostics,
            merged,
            base,
            experts,
            k=k,
            svd=svd,
            spectra_layers=spectra_layers,
            device=device,
            progress=progress,
        )
    if activations:
        prompts = None
        if probe_task is not None:
            (task,) = resolve_tasks([probe_task])
            prompts = [e.prompt for e in task.examples("test", n_probes)]
        timed(
            "activations",
            activation_diagnostics,
            merged,
            base,
            experts,
            n_probes=n_probes,
            probe_length=probe_length,
            prompts=prompts,
            seed=seed,
            nl_layers=nl_layers,
            device=device,
            progress=progress,
        )
    if block_task is not None:
        timed(
            "layer_blocking",
            layer_blocking,
            merged,
            base,
            block_task,
            layers=block_layers,
            n_items=block_items,
            device=device,
            progress=progress,
        )
    write_report(results, out)
    return results


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diagnose`` to the ``mergelab`` command's subparsers."""
    p = subparsers.add_parser("diagnose", help="weight- and function-space diagnostics of a merge", description=__doc__)
    p.add_argument("merged", type=Path, help="the merged model folder")
    p.add_argument("--base", type=Path, required=True, help="the base model folder")
    p.add_argument("--experts", type=Path, nargs="+", required=True, help="the expert model folders")
    p.add_argument("--out", type=Path, required=True, help="folder for diagnostics.json, plots and summary.md")
    p.add_argument("--no-weights", dest="weights", action="store_false", help="skip weight-space diagnostics")
    p.add_argument("--no-activations", dest="activations", action="store_false", help="skip function-space diagnostics")
    p.add_argument("--k", type=int, default=16, help="dimension of the singular subspaces compared (default 16)")
    p.add_argument(
        "--no-svd",
        dest="svd",
        action="store_false",
        help="skip principal angles, spectral shift and spectra (the costly weight-space part)",
    )
    p.add_argument(
        "--spectra-layers",
        type=int,
        nargs="*",
        default=None,
        help="layers whose singular spectra are kept and plotted (default: the middle layer)",
    )
    p.add_argument("--probes", type=int, default=8, help="number of probe sequences (default 8)")
    p.add_argument("--probe-length", type=int, default=32, help="tokens per probe sequence (default 32)")
    p.add_argument("--probe-task", default=None, help="use this task's test prompts as probes instead of random tokens")
    p.add_argument(
        "--nl-layers",
        type=int,
        nargs="*",
        default=None,
        help="layers for the NL score (default all; give the flag alone to skip it)",
    )
    p.add_argument("--block-task", default=None, help="run layer blocking (paper 000, A.4) on this task")
    p.add_argument("--block-items", type=int, default=20, help="task items per layer-blocking evaluation")
    p.add_argument("--block-layers", type=int, nargs="*", default=None, help="layers to block (default all)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace) -> int:
    diagnose(
        args.merged,
        args.base,
        args.experts,
        args.out,
        weights=args.weights,
        activations=args.activations,
        k=args.k,
        svd=args.svd,
        spectra_layers=args.spectra_layers,
        n_probes=args.probes,
        probe_length=args.probe_length,
        probe_task=args.probe_task,
        nl_layers=args.nl_layers,
        block_task=args.block_task,
        block_items=args.block_items,
        block_layers=args.block_layers,
        device=args.device,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    print(f"diagnostics written to {args.out} (summary.md, diagnostics.json, plots)")
    return 0
