"""``mergelab eval MODEL --tasks ...``: accuracy, repetition, pass@n, self-consistency, perplexity.

``--lm-eval TASKS`` also runs the same tasks (and GSM8K) through lm-evaluation-harness, offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``mergelab`` command's subparsers."""
    from mergelab.cli import examples, positive_int
    from mergelab.tasks import TASKS  # a table of names: no heavy imports

    p = subparsers.add_parser(
        "eval", help="evaluate a model folder on tasks",
        description="Score a model folder on mergelab's tasks: exact-match accuracy, repetition rate, pass@n, "
        "self-consistency, perplexity. --lm-eval also runs the tasks (and GSM8K) through lm-evaluation-harness, "
        "offline.",
        **examples("mergelab eval merged/ --tasks addition reverse",
                   "mergelab eval merged/ --tasks addition --samples 8 --out scores.json   # pass@8",
                   "mergelab eval merged/ --ppl-file held_out.txt"))
    p.add_argument("model", type=Path, help="a Hugging Face model folder (weights, config, tokenizer)")
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help="task names: " + "; ".join(f"{name} ({task.description})" for name, task in TASKS.items()))
    p.add_argument("--items", type=int, default=50, help="test items per task (default 50)")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=1,
        help="sampled continuations per item for pass@k and self-consistency (default 1: greedy only)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="override each task's generation limit")
    p.add_argument("--batch-size", type=positive_int, default=16, help="generated rows per batch (default 16)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="task split (default test)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument(
        "--ppl-file",
        type=Path,
        default=None,
        help="held-out text file (paragraphs separated by blank lines) for perplexity and entropy",
    )
    p.add_argument("--keep-generations", action="store_true", help="store every completion in the JSON")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument(
        "--lm-eval",
        nargs="+",
        default=[],
        metavar="TASK",
        help="run these tasks through lm-evaluation-harness offline (zoo task names, gsm8k = the held-out "
        "part of the GSM8K test set, gsm8k_all = all of it); needs pip install 'mergelab[lmeval]'",
    )
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many items per task")
    p.add_argument(
        "--lm-eval-dir",
        type=Path,
        default=None,
        help="lm-eval: keep the task YAML/JSONL, results.json and per-item samples here (default: a "
        "temporary folder, removed afterwards)",
    )
    p.add_argument("--vision-tasks", nargs="+", default=[],
                   help="vision tasks (see mergelab.zoo.vision.TASKS): MODEL is a vision backbone folder, scored "
                   "with each task's own head")
    p.add_argument("--heads", type=Path, default=None,
                   help="vision family folder holding the task heads (default: the full vision zoo)")
    p.set_defaults(func=handler)
    return p


def _vision(args: argparse.Namespace) -> dict:
    """Held-out accuracy of a (merged) vision backbone on each task, with that task's expert head."""
    from mergelab.zoo import vision

    n = None if args.items <= 0 else args.items
    return {"model": str(args.model), "vision": {
        task: {"accuracy": vision.evaluate(args.model, task, n=n, heads=args.heads, device=args.device),
               "n_items": n} for task in args.vision_tasks}}


def handler(args: argparse.Namespace) -> int:
    from mergelab.evaluation import lm_eval_bridge  # heavy imports here, so `mergelab --help` stays quick
    from mergelab.evaluation.runner import format_table
    from mergelab.model_refs import resolve_model_ref

    resolve_model_ref(str(args.model), None)  # a missing folder, an adapter, a GGUF file or a Hub id: say so
    if args.lm_eval:
        lm_eval_bridge.require_lm_eval()  # fail before any model is loaded
    results: dict = {}
    if args.vision_tasks:
        results = _vision(args)
        for task, row in results["vision"].items():
            print(f"{task:>16}  accuracy {100 * row['accuracy']:.1f} %")
    elif args.tasks or args.ppl_file is not None or not args.lm_eval:
        results = _native(args)
        print(format_table(results))
    if args.lm_eval:
        lm_results = lm_eval_bridge.run_lm_eval(
            args.model,
            args.lm_eval,
            out_dir=args.lm_eval_dir,
            limit=args.limit,
            n_items=args.items,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=args.device,
            chat=args.chat,
            seed=args.seed,
        )
        print(lm_eval_bridge.format_table(lm_results))
        results["lm_eval"] = lm_eval_bridge.standard_results(lm_results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.out}")
    return 0


def _native(args: argparse.Namespace) -> dict:
    """mergelab's own evaluation (``--tasks``, ``--ppl-file``)."""
    from mergelab.evaluation.runner import evaluate

    ppl_texts = None
    if args.ppl_file is not None:
        ppl_texts = [t.strip() for t in args.ppl_file.read_text().split("\n\n") if t.strip()]
    return evaluate(
        args.model,
        args.tasks,
        n_items=args.items,
        n_samples=args.samples,
        device=args.device,
        temperature=args.temperature,
        top_p=args.top_p,
        split=args.split,
        batch_size=args.batch_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        ppl_texts=ppl_texts,
        keep_generations=args.keep_generations,
        progress=sys.stderr.isatty(),
    )
