"""``mergelab merge`` and ``mergelab check``: argparse registration and the handlers (heavy imports inside)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("mergelab")


def register(subparsers) -> None:
    register_merge(subparsers)
    register_check(subparsers)


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


def _merge_options(args: argparse.Namespace):
    from mergelab.engine import MergeOptions

    return MergeOptions(device=args.device, float64=args.float64, shard_size=args.shard_size,
                        overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
                        allow_mixed=args.allow_mixed, strict=args.strict, seed=args.seed,
                        read_ahead=args.read_ahead,
                        progress=args.verbosity > -1 and sys.stderr.isatty(),
                        **({} if args.compute_threads is None else {"compute_threads": args.compute_threads}))


def cmd_merge(args: argparse.Namespace) -> int:
    from mergelab.config import load_recipe
    from mergelab.errors import RecipeError

    if args.out_dir is None and not args.print_plan:
        raise RecipeError("name the output folder (OUT_DIR) after the recipe, or pass --print-plan")
    recipe = _announce_differences(load_recipe(args.recipe, args.compat))
    log.info("recipe %s: %s of %d model(s)", args.recipe, recipe.merge_method, len(recipe.model_paths()))
    recipe_dir = Path(args.recipe).parent
    if args.print_plan:
        from mergelab.engine import open_inputs
        from mergelab.plan.build import build_plan
        from mergelab.plan.describe import describe

        with naming_the_recipe(args.recipe):
            readers = open_inputs(recipe, recipe_dir, args.allow_pickle)
            print(describe(build_plan(recipe, readers, strict=args.strict, allow_mixed=args.allow_mixed)))
        return 0
    from mergelab.engine import run_merge

    started = time.perf_counter()
    with naming_the_recipe(args.recipe):
        out = run_merge(recipe, args.out_dir, _merge_options(args), recipe_dir)
    log_merge_record(out, time.perf_counter() - started)
    print(f"merged model written to {out}")
    return 0


@contextlib.contextmanager
def naming_the_recipe(path: str):
    """Prefix a recipe error raised while planning (unknown method or parameter) with the recipe file."""
    from mergelab.errors import RecipeError

    try:
        yield
    except RecipeError as error:
        if str(path) in str(error):
            raise
        raise RecipeError(f"{path}: {error}") from None


def log_merge_record(out: Path, seconds: float) -> None:
    """INFO lines (``-v``) from the finished folder's ``mergelab.json``: inputs, method, tensors, dtype, time."""
    if not log.isEnabledFor(logging.INFO):
        return
    import json

    record = json.loads((out / "mergelab.json").read_text())
    for ref, entry in record["inputs"].items():
        log.info("input %s: %s (%d weight file(s))", ref, entry["folder"], len(entry["files"]))
    tensors = record["tensors"]
    log.info("%s (%s): %d tensors written as %s in %.1f s, seed %s", record["method"]["name"],
             record["method"]["citation"], len(tensors), record["out_dtype"], seconds, record["seed"])


def cmd_check(args: argparse.Namespace) -> int:
    from mergelab.check import CheckReport, check, format_report
    from mergelab.config import load_recipe
    from mergelab.engine import open_inputs
    from mergelab.errors import MergelabError
    from mergelab.lora.adapted import adapter_notes
    from mergelab.moe.check import check_moe, is_moe_config

    if is_moe_config(args.recipe):  # a ``mergelab moe`` config rather than a merge recipe
        report = check_moe(args.recipe)
        print(format_report(report).replace("the merge would", "the MoE assembly would", 1))
        return 0 if report.ok else 1
    try:
        recipe = _announce_differences(load_recipe(args.recipe, args.compat))
        with naming_the_recipe(args.recipe):
            readers = open_inputs(recipe, Path(args.recipe).parent, args.allow_pickle)
            report = check(recipe, readers, strict=args.strict, allow_mixed=args.allow_mixed,
                           similarity=not args.no_similarity)
        report.notes += adapter_notes(readers)
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
    from mergelab.cli import examples

    p = subparsers.add_parser("check", help="report whether a recipe would merge and what it would do (no writes)",
                              **examples("mergelab check recipe.yml",
                                         "mergelab check recipe.yml --no-similarity   # skip reading every weight",
                                         "mergelab check moe.yml   # a 'mergelab moe' config"))
    p.add_argument("recipe", help="YAML recipe, or a 'mergelab moe' config")
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
    from mergelab.cli import examples, positive_int

    p = subparsers.add_parser("merge", help="merge models from a YAML recipe into a model folder",
                              **examples("mergelab merge recipe.yml merged/",
                                         "mergelab merge recipe.yml --print-plan",
                                         "mergelab merge recipe.yml merged/ --overwrite  # replace a previous merge",
                                         "mergelab merge recipe.yml merged/ --resume     # continue an interrupted one",
                                         note="Relative model paths in the recipe are looked up beside the recipe "
                                         "file and in the working directory; a name found in both is refused."))
    p.add_argument("recipe", help="YAML recipe (mergekit's shape)")
    p.add_argument("out_dir", nargs="?", help="output model folder (written atomically)")
    p.add_argument("--print-plan", action="store_true", help="show which method and parameters each tensor gets")
    p.add_argument("--device", default="cpu", help="cpu or cuda (maths on this device)")
    p.add_argument("--float64", action="store_true", help="compute in float64 instead of float32")
    p.add_argument("--shard-size", type=_size, default=5 * 10**9, help="maximum output shard size in bytes (5G)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a previous mergelab output (only once finished); any other "
                   "folder is refused")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from OUT_DIR.partial")
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe's)")
    p.add_argument("--read-ahead", type=int, default=2, help="output tensors whose inputs are read in advance")
    p.add_argument("--compute-threads", type=positive_int, default=None,
                   help="CPU: tensor pieces computed side by side (default: the cores, at most 4)")
    add_merge_flags(p)
    p.set_defaults(func=cmd_merge)
