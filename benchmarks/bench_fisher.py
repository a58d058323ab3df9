"""Wall time and peak RSS of FIM-Merging's random-token diagonal Fisher on the real SmolLM2-135M base (issue 7).

Builds (or reuses) the converted ``smollm2`` base, then times, each in its own process: loading the model alone
(the memory a Fisher pass cannot go below), and ``mergelab.fisher.diagonal_fisher`` without its cache (N random
sequences of ``length`` tokens, the paper's defaults 8 x 64, seed 42). Wall, CPU and peak RSS (``ru_maxrss``)
are the child's, from ``bench_engine.run_measured``; the child also prints the Fisher's own seconds.

    python benchmarks/bench_fisher.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_engine import run_measured

LOAD_ONLY = """
import sys
from mergelab.fisher import load_causal_lm
load_causal_lm(__import__('pathlib').Path(sys.argv[1]), sys.argv[2])
"""

FISHER = """
import sys
from pathlib import Path
from mergelab.checkpoint.reader import open_model
from mergelab.fisher import FisherSettings, diagonal_fisher
folder, device, samples, length, out = sys.argv[1:]
fisher = diagonal_fisher(open_model(folder), FisherSettings(int(samples), int(length)), device, use_cache=False)
Path(out).write_text(f"{fisher.seconds:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: unset)")
    args = parser.parse_args()

    from mergelab import zoo  # imports neither torch nor transformers: the measuring parent stays small

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run([str(bin_dir / "mergelab"), "zoo", "build", "smollm2", "--members", "base"], check=True, env=env)
    base = zoo.family_dir("smollm2", "test") / "base"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; SmolLM2-135M base, device {args.device}, "
          f"threads {args.threads or 'torch default'}, load average {os.getloadavg()[0]:.1f}")
    wall, rss, cpu = run_measured([sys.executable, "-c", LOAD_ONLY, str(base), args.device], env)
    print(f"| load the model only | {wall:.1f} s | {cpu:.1f} s | | {rss:.2f} GiB |")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = Path(tmp) / "seconds"
        cmd = [sys.executable, "-c", FISHER, str(base), args.device, str(args.samples), str(args.length), str(seconds)]
        wall, rss, cpu = run_measured(cmd, env)
        print(f"| diagonal Fisher, N = {args.samples} x {args.length} tokens | {wall:.1f} s | {cpu:.1f} s | "
              f"{seconds.read_text()} s | {rss:.2f} GiB |  (load average after {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
