"""The ``mergelab`` command. Heavy libraries (torch, transformers) are imported inside the handlers, so
``mergelab --help`` starts at once. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

# Sub-command modules that add themselves with ``register(subparsers)``; imported only when present.
SUBCOMMAND_MODULES = ("mergelab.zoo.cli", "mergelab.evaluation.cli", "mergelab.diagnostics.cli",
                      "mergelab.study.cli")


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1000): '500M', '5G', '1000000'."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size in bytes (e.g. 5G, 500M, 1000000)") from None


def _positive(text: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


def _merge_options(args: argparse.Namespace):
    from mergelab.engine import MergeOptions

    return MergeOptions(device=args.device, float64=args.float64, shard_size=args.shard_size,
                        overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
                        allow_mixed=args.allow_mixed, strict=args.strict, seed=args.seed,
                        read_ahead=args.read_ahead,
                        **({} if args.compute_threads is None else {"compute_threads": args.compute_threads}))


def cmd_merge(args: argparse.Namespace) -> int:
    from mergelab.config import load_recipe

    recipe = _announce_differences(load_recipe(args.recipe, args.compat))
    recipe_dir = Path(args.recipe).parent
    if args.print_plan:
        from mergelab.engine import open_inputs
        from mergelab.plan import build_plan, describe

        readers = open_inputs(recipe, recipe_dir, args.allow_pickle)
        print(describe(build_plan(recipe, readers, strict=args.strict, allow_mixed=args.allow_mixed)))
        return 0
    if args.out_dir is None:
        raise SystemExit("mergelab merge: OUT_DIR is required unless --print-plan is given")
    from mergelab.engine import run_merge

    out = run_merge(recipe, args.out_dir, _merge_options(args), recipe_dir)
    print(f"merged model written to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mergelab.check import CheckReport, check, format_report
    from mergelab.config import load_recipe
    from mergelab.engine import open_inputs
    from mergelab.errors import MergelabError

    try:
        recipe = _announce_differences(load_recipe(args.recipe, args.compat))
        readers = open_inputs(recipe, Path(args.recipe).parent, args.allow_pickle)
        report = check(recipe, readers, strict=args.strict, allow_mixed=args.allow_mixed,
                       similarity=not args.no_similarity)
    except MergelabError as error:
        report = CheckReport(problems=[str(error)])
    print(format_report(report))
    return 0 if report.ok else 1


def _announce_differences(recipe):
    """The recipe (``--compat`` applied by ``load_recipe``), after printing where its output will differ from
    mergekit's."""
    from mergelab.mergekit_differences import differences

    for line in differences(recipe):
        print(f"differs from mergekit: {line}")
    return recipe


def register_check(subparsers) -> None:
    p = subparsers.add_parser("check", help="report whether a recipe would merge and what it would do (no writes)")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--no-similarity", action="store_true",
                   help="skip the task-vector norms and cosines (which read every weight)")
    add_merge_flags(p)
    p.set_defaults(func=cmd_check)


def add_merge_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``merge`` and ``check``: which inputs are acceptable."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin pickle checkpoints (with weights_only=True); refused by default")
    parser.add_argument("--allow-mixed", action="store_true", help="merge models whose config model_type differs")
    parser.add_argument("--compat", choices=["mergekit"], default=None,
                        help="reproduce mergekit 0.1.5's arithmetic and reading of the recipe (its working dtype, "
                        "TIES vote, ...) instead of mergelab's float32, paper-faithful default")
    parser.add_argument("--strict", action="store_true",
                        help="refuse inputs whose vocabulary is larger than the base's instead of dropping rows")


def register_merge(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge models from a YAML recipe into a model folder")
    p.add_argument("recipe", help="YAML recipe (mergekit's shape)")
    p.add_argument("out_dir", nargs="?", help="output model folder (written atomically)")
    p.add_argument("--print-plan", action="store_true", help="show which method and parameters each tensor gets")
    p.add_argument("--device", default="cpu", help="cpu or cuda (maths on this device)")
    p.add_argument("--float64", action="store_true", help="compute in float64 instead of float32")
    p.add_argument("--shard-size", type=_size, default=5 * 10**9, help="maximum output shard size in bytes (5G)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (only once finished)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from OUT_DIR.partial")
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe's)")
    p.add_argument("--read-ahead", type=int, default=2, help="output tensors whose inputs are read in advance")
    p.add_argument("--compute-threads", type=_positive, default=None,
                   help="CPU: tensor pieces computed side by side (default: the cores, at most 4)")
    add_merge_flags(p)
    p.set_defaults(func=cmd_merge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergelab", description="Merge fine-tuned models in weight space and measure whether the merge is "
        "better, stable and safe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    subparsers = parser.add_subparsers(dest="command", required=True)
    registrars: list[Callable] = [register_merge, register_check]
    for module_name in SUBCOMMAND_MODULES:
        try:
            registrars.append(importlib.import_module(module_name).register)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
    for register in registrars:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from mergelab.errors import MergelabError

    try:
        return args.func(args)
    except MergelabError as error:
        print(f"mergelab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergelab: interrupted; a partial merge can be continued with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
