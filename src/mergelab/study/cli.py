"""``mergelab demo`` (and the study protocols): argparse registration; heavy imports inside the handlers."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from mergelab.study.demo import print_tables, run_demo

    results = run_demo(Path(args.out), size=args.size, n_items=args.items, device=args.device,
                       command="mergelab demo" + (f" --size {args.size}" if args.size != "demo" else ""))
    print_tables(results)
    print(f"\nreport: {Path(args.out) / 'report.md'} ({results['seconds']['total']:.0f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the tiny-lm zoo, merge two pairs with SCF-RKL and baselines, "
                              "evaluate, and write a report")
    p.add_argument("--out", default="mergelab-demo", help="report folder (default ./mergelab-demo)")
    p.add_argument("--size", default="demo", help="zoo size: demo (default), full, or test (untrained, plumbing)")
    p.add_argument("--items", type=int, default=100, help="held-out items per task")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_demo)
