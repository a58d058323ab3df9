"""The ``mergelab`` command. Heavy libraries (torch, transformers) are imported inside the handlers, so
``mergelab --help`` starts at once. User errors print one line and exit with status 2.

Verbosity uses the standard ``logging`` levels: warnings by default, ``-v`` INFO, ``-vv`` DEBUG (which also
shows the traceback behind a file-system error), ``-q`` errors only and no progress bars. The flags are
accepted before or after the command name.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import textwrap
from collections.abc import Callable

log = logging.getLogger("mergelab")

# Sub-command modules that add themselves with ``register(subparsers)``; imported only when present.
SUBCOMMAND_MODULES = ("mergelab.merge_cli", "mergelab.zoo.cli", "mergelab.evaluation.cli", "mergelab.diagnostics.cli",
                      "mergelab.study.cli", "mergelab.lora.cli", "mergelab.moe.cli")


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


class Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line usage error (the full usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's layout, except that the examples epilog keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*lines: str, note: str = "") -> dict:
    """``add_parser`` keywords that end a command's help with examples (and a note)."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    text += f"\n\n{textwrap.fill(note, 79)}" if note else ""
    return {"epilog": text, "formatter_class": ExamplesFormatter}


def add_verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q on the main parser and on every sub-command (a sub-command's flags leave the main one's alone)."""
    default = 0 if top else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="count", default=default,
                       help="more log output: -v INFO, -vv DEBUG")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="errors only, no progress bars")


def _all_subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _all_subparsers(sub)


def build_parser() -> argparse.ArgumentParser:
    from mergelab import __version__

    parser = Parser(
        prog="mergelab", description="Merge fine-tuned models in weight space and measure whether the merge is "
        "better, stable and safe.",
        **examples("mergelab zoo build tiny-lm --size test   # offline models to try things on",
                   "mergelab merge recipe.yml merged/", "mergelab eval merged/ --tasks addition reverse",
                   "mergelab diagnose merged/ --base base/ --experts a/ b/ --out diag/", "mergelab demo",
                   note="Run 'mergelab COMMAND --help' for each command's options and examples."))
    parser.add_argument("--version", action="version", version=f"mergelab {__version__}")
    add_verbosity(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True)
    registrars: list[Callable] = []
    for module_name in SUBCOMMAND_MODULES:
        try:
            registrars.append(importlib.import_module(module_name).register)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
    for register in registrars:
        register(subparsers)
    for sub in _all_subparsers(parser):
        add_verbosity(sub, top=False)
    return parser


LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["mergelab", *argv])  # what reports say made them
    level = LEVELS.get(args.verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too: ours are the display
    from mergelab.errors import MergelabError

    try:
        return args.func(args)
    except MergelabError as error:
        print(f"mergelab: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the user gave cannot be read or written
        if error.filename is None or level <= logging.DEBUG:
            raise
        print(f"mergelab: error: {error.filename}: {error.strerror}; check the path and its permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergelab: interrupted; a partial merge can be continued with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
