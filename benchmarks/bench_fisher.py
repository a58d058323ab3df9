"""Wall time and peak RSS of the random-token diagonal Fisher (FIM-Merging eq. 7), unit by unit from the
checkpoint against the whole model in memory, side by side in one run.

On the real SmolLM2-135M base (the converted ``smollm2`` zoo base, default) or on a random bf16 checkpoint of a
``bench_engine`` shape (``--shape qwen2.5-1.5b``), times, each in its own process: loading the whole model in
float32 (the floor of the whole-model pass), ``mergelab.fisher.compute_fisher`` unit by unit (``fisher_units``)
and, unless ``--no-whole``, with the whole model (N random sequences of ``length`` tokens, the paper's defaults
8 x 64, seed 42). Wall, CPU and peak RSS (``ru_maxrss``) are the child's, from ``bench_engine.run_measured``.

    python benchmarks/bench_fisher.py [--device cuda] [--threads 1]
    python benchmarks/bench_fisher.py --shape qwen2.5-1.5b --no-whole --threads 1
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

from bench_engine import SHAPES, run_measured

LOAD_ONLY = """
import sys
from mergelab.fisher import load_causal_lm
load_causal_lm(__import__('pathlib').Path(sys.argv[1]), sys.argv[2])
"""

FISHER = """
import sys
from pathlib import Path
from mergelab.checkpoint.reader import open_model
from mergelab.fisher import FisherSettings, compute_fisher
folder, device, samples, length, out, streamed = sys.argv[1:]
compute_fisher(open_model(folder), FisherSettings(int(samples), int(length)), Path(out), device, streamed == "1")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random bf16 checkpoint of this shape instead of "
                        "the real SmolLM2-135M base")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model rows (they need ~12 bytes "
                        "per parameter)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: unset)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergelab-bench-fisher")
    args = parser.parse_args()

    from mergelab import zoo  # imports neither torch nor transformers: the measuring parent stays small

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.shape:
        base = args.workdir / args.shape
        if not (base / "model.safetensors").exists():
            engine = Path(__file__).with_name("bench_engine.py")
            subprocess.run([sys.executable, str(engine), "--write", str(base), args.shape, "0", "-"], check=True)
        label = f"random {args.shape} (bf16)"
    else:
        subprocess.run([str(bin_dir / "mergelab"), "zoo", "build", "smollm2", "--members", "base"], check=True,
                       env=env)
        base = zoo.family_dir("smollm2", "test") / "base"
        label = "SmolLM2-135M base"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {label}, device {args.device}, "
          f"threads {args.threads or 'torch default'}, load average {os.getloadavg()[0]:.1f}")
    print("| step | wall | CPU | peak RSS |\n|---|---|---|---|")
    rows = [("diagonal Fisher, unit by unit", "1")]
    if not args.no_whole:
        wall, rss, cpu = run_measured([sys.executable, "-c", LOAD_ONLY, str(base), args.device], env)
        print(f"| load the whole model in float32 | {wall:.1f} s | {cpu:.1f} s | {rss:.2f} GiB |")
        rows.append(("diagonal Fisher, whole model", "0"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, streamed in rows:
            out = Path(tmp) / f"fisher-{streamed}.safetensors"
            cmd = [sys.executable, "-c", FISHER, str(base), args.device, str(args.samples), str(args.length),
                   str(out), streamed]
            wall, rss, cpu = run_measured(cmd, env)
            print(f"| {name}, N = {args.samples} x {args.length} tokens | {wall:.1f} s | {cpu:.1f} s | "
                  f"{rss:.2f} GiB |  (load average after {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
