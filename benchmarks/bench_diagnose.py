"""Wall time and peak RSS of ``mergelab diagnose`` on the SmolLM2-135M base against one expert (issue 6).

Builds (or reuses) the ``smollm2`` zoo's base and one expert, merges them by task arithmetic (weight 0.5) with
``mergelab merge``, then times ``mergelab diagnose MERGED --base BASE --experts EXPERT`` as separate processes:
weight space only (``--no-activations``; also with ``--no-svd``, which skips principal angles, spectral shift
and spectra) and function space only (``--no-weights``), default settings otherwise (k = 16, 8 random probes of
32 tokens, NL score on every layer). Wall, CPU and peak RSS (``ru_maxrss``) are the child's, from
``bench_engine.run_measured``; each diagnose also reports its in-process seconds in ``diagnostics.json``
(``timing``), which leave out start-up and imports. ``--threads`` sets ``OMP_NUM_THREADS`` for diagnose: on a
loaded machine two threads made each float64 SVD several times slower than one (BENCHMARKS.md).

    python benchmarks/bench_diagnose.py --size test --expert math
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from bench_engine import run_measured

PARTS = {  # name: (what it measures, diagnose flags)
    "weights": ("weight space", ["--no-activations"]),
    "weights-no-svd": ("weight space without SVD", ["--no-activations", "--no-svd"]),
    "activations": ("function space", ["--no-weights"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="test", choices=["test", "full"], help="zoo size of the expert")
    parser.add_argument("--expert", default="math", help="the smollm2 expert to diagnose against")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergelab-bench-diagnose"))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="what to time")
    parser.add_argument("--diagnose-args", default="", help="extra flags for mergelab diagnose")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of diagnose (default: unset)")
    args = parser.parse_args()

    from mergelab import zoo  # imports neither torch nor transformers: the measuring parent stays small

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # in a child: a process's peak RSS counts its parent's at fork time, so the parent must not load models
    subprocess.run([str(bin_dir / "mergelab"), "zoo", "build", "smollm2", "--size", args.size, "--members",
                    args.expert], check=True, env=env)
    family = zoo.family_dir("smollm2", args.size)
    base, expert = family / "base", family / args.expert
    threads = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    root = args.workdir / f"{args.size}-{args.expert}"
    merged = root / "merged"
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(expert), "parameters": {"weight": 0.5}}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe))
    for leftover in (merged, merged.with_name(merged.name + ".partial")):  # a killed or older run
        shutil.rmtree(leftover, ignore_errors=True)
    wall, rss, cpu = run_measured([str(bin_dir / "mergelab"), "merge", str(root / "recipe.yml"), str(merged)], env)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; smollm2 {args.size} {args.expert}")
    print(f"merge (task arithmetic, weight 0.5): {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.2f} GiB")
    print(f"diagnose threads: {args.threads or 'torch default'}")
    print("| part | flags | wall | CPU (user + sys) | in-process wall | peak RSS | load average before / after |")
    print("|---|---|---|---|---|---|---|")
    for part in args.parts:
        label, flags = PARTS[part]
        out = root / f"diagnose-{part}"
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        cmd = [str(bin_dir / "mergelab"), "diagnose", str(merged), "--base", str(base), "--experts", str(expert),
               "--out", str(out), *flags, *args.diagnose_args.split()]
        wall, rss, cpu = run_measured(cmd, dict(env, **threads))
        timing = json.loads((out / "diagnostics.json").read_text())["timing"]
        inside = sum(t["seconds"] for t in timing.values())
        print(f"| {label} | {' '.join(flags + args.diagnose_args.split())} | {wall:.1f} s | {cpu:.1f} s | "
              f"{inside:.1f} s | {rss:.2f} GiB | {load_before:.1f} / {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
