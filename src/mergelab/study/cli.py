"""``mergelab demo`` (and the study protocols): argparse registration; heavy imports inside the handlers."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from mergelab.study.demo import print_tables, run_demo

    results = run_demo(Path(args.out), size=args.size, n_items=args.items, device=args.device,
                       command="mergelab demo" + (f" --size {args.size}" if args.size != "demo" else ""))
    print_tables(results)
    print(f"\nreport: {Path(args.out) / 'report.html'} and report.md ({results['seconds']['total']:.0f} s)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from mergelab.study.protocol import StudySettings, run_study

    flags = {"--zoo": args.zoo if args.zoo != "tiny-lm" else None, "--zoo-size": args.zoo_size,
             "--executor": args.executor if args.executor != "local" else None,
             "--ray-address": args.ray_address, "--device": args.device if args.device != "cpu" else None}
    command = " ".join(["mergelab study", args.protocol, *(["--quick"] if args.quick else []),
                        *(f"{flag} {value}" for flag, value in flags.items() if value)])
    settings = StudySettings(quick=args.quick, zoo=args.zoo, zoo_size=args.zoo_size, build_zoo=args.build_zoo,
                             device=args.device)
    out = Path(args.out or f"mergelab-study-{args.protocol}")
    study = run_study(args.protocol, out, settings, executor=args.executor, workers=args.workers,
                      ray_address=args.ray_address, store=args.store, command=command)
    print(f"report: {out / 'report.html'} and report.md ({study['seconds']:.0f} s, {len(study['jobs'])} jobs)")
    return 0


def register(subparsers) -> None:
    from mergelab.cli import examples

    p = subparsers.add_parser("demo", help="build the tiny-lm zoo, merge two pairs with SCF-RKL and baselines, "
                              "evaluate, and write a report",
                              **examples("mergelab demo",
                                         "mergelab demo --size test --items 5  # seconds: plumbing only",
                                         note="Writes report.html (self-contained), report.md, PNG plots and "
                                         "results.json to --out."))
    p.add_argument("--out", default="mergelab-demo", help="report folder (default ./mergelab-demo)")
    p.add_argument("--size", default="demo", help="zoo size: demo (default), full, or test (untrained, plumbing)")
    p.add_argument("--items", type=int, default=100, help="held-out items per task")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_demo)

    from mergelab.study.protocol import PROTOCOLS  # no heavy imports: a table of names

    p = subparsers.add_parser("study", help="run a paper's experiment protocol on the zoo and write a report",
                              **examples("mergelab study scf --quick --build-zoo",
                                         "mergelab study in-the-wild --executor ray --workers 4",
                                         note="Writes report.html (self-contained), report.md, PNG plots and "
                                         "results.json to --out; a rerun resumes from --store."))
    p.add_argument("protocol", choices=list(PROTOCOLS), help="which paper's protocol")
    p.add_argument("--quick", action="store_true", help="the minutes-long variant (fewer subsets, items, sweeps)")
    p.add_argument("--zoo", default="tiny-lm", choices=["tiny-lm", "smollm2", "smollm2-arith"],
                   help="language-model family: tiny-lm (default; with vision), smollm2 (SmolLM2-135M fine-tunes) "
                   "or smollm2-arith (long-to-short and scf's safety pair: SmolLM2-135M arithmetic and refusal "
                   "fine-tunes)")
    p.add_argument("--zoo-size", default=None, help="zoo size of the members (default: demo with --quick on tiny-lm, "
                   "else full)")
    p.add_argument("--build-zoo", action="store_true", help="build missing zoo members instead of stopping")
    p.add_argument("--out", default=None, help="report folder (default ./mergelab-study-PROTOCOL)")
    p.add_argument("--store", default=None, help="where finished jobs are kept (default OUT/jobs); a rerun resumes")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="process pool or Ray")
    p.add_argument("--workers", type=int, default=None, help="parallel jobs (default: one per core)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (host:port); default a local instance")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_study)
