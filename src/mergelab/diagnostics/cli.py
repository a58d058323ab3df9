"""``mergelab diagnose MERGED --base B --experts E1 ... --out DIR``: weight and function-space diagnostics."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.citations import SCF_RKL, cite


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
    command: str | None = None,
) -> dict[str, Any]:
    """Run the chosen diagnostics, write JSON, plots, summary.md and report.html to ``out``; return the results.

    Each part records its wall time and the process's peak resident memory after it (``timing``). ``command``:
    what the report says made it (the CLI passes its command line).
    """
    from mergelab.diagnostics.activations import activation_diagnostics
    from mergelab.diagnostics.blocking import layer_blocking
    from mergelab.diagnostics.report import write_report
    from mergelab.diagnostics.weights import weight_diagnostics
    from mergelab.evaluation.runner import resolve_tasks

    check_folders(merged, base, experts, out)
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
    write_report(results, out, *([command] if command else []))
    return results


def check_folders(merged: str | Path, base: str | Path, experts: Sequence[str | Path], out: str | Path) -> None:
    """Each input must be a model folder (an adapter, GGUF file or Hub id is named as such), and ``out`` must
    not lie inside one: diagnostics never write into a model."""
    from mergelab.errors import OutputError
    from mergelab.model_refs import resolve_model_ref

    inputs = [resolve_model_ref(str(folder), None) for folder in (merged, base, *experts)]
    out_abs = Path(out).resolve()
    for folder in inputs:
        if out_abs == folder.resolve() or folder.resolve() in out_abs.parents:
            raise OutputError(f"--out {out} lies inside model folder {folder}; choose a folder of its own")
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputError(f"--out {out} exists and is not a folder; choose another path")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diagnose`` to the ``mergelab`` command's subparsers."""
    from mergelab.cli import examples, positive_int

    p = subparsers.add_parser(
        "diagnose", help="weight- and function-space diagnostics of a merge",
        description="Compare a merged model with its base and experts: task vectors, parameter provenance, "
        "subspace rotation and spectral shift (weight space); activation statistics, KL and NL score on probes "
        "(function space); optionally layer blocking on a task. Writes diagnostics.json, PNG plots, summary.md "
        "and a self-contained report.html to --out.",
        **examples("mergelab diagnose merged/ --base base/ --experts math/ code/ --out diag/",
                   "mergelab diagnose merged/ --base base/ --experts math/ code/ --out diag/ --no-svd --probes 4",
                   "mergelab diagnose merged/ --base base/ --experts math/ --out diag/ --block-task addition"))
    p.add_argument("merged", type=Path, help="the merged model folder")
    p.add_argument("--base", type=Path, required=True, help="the base model folder")
    p.add_argument("--experts", type=Path, nargs="+", required=True, help="the expert model folders")
    p.add_argument("--out", type=Path, required=True, help="folder for diagnostics.json, plots and summary.md")
    p.add_argument("--no-weights", dest="weights", action="store_false", help="skip weight-space diagnostics")
    p.add_argument("--no-activations", dest="activations", action="store_false", help="skip function-space diagnostics")
    p.add_argument("--k", type=positive_int, default=16,
                   help="dimension of the singular subspaces compared (default 16)")
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
    p.add_argument("--probes", type=positive_int, default=8, help="number of probe sequences (default 8)")
    p.add_argument("--probe-length", type=positive_int, default=32, help="tokens per probe sequence (default 32)")
    p.add_argument("--probe-task", default=None, help="use this task's test prompts as probes instead of random tokens")
    p.add_argument(
        "--nl-layers",
        type=int,
        nargs="*",
        default=None,
        help="layers for the NL score (default all; give the flag alone to skip it)",
    )
    p.add_argument("--block-task", default=None,
                   help=f"run layer blocking ({cite(SCF_RKL, 'appendix A.4')}) on this task")
    p.add_argument("--block-items", type=positive_int, default=20, help="task items per layer-blocking evaluation")
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
        progress=getattr(args, "verbosity", 0) > -1 and sys.stderr.isatty(),  # set by mergelab.cli's parser
        command=getattr(args, "command_line", None),
    )
    print(f"diagnostics written to {args.out} (report.html, summary.md, diagnostics.json, plots)")
    return 0
