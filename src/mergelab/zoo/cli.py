"""``mergelab zoo build FAMILY [--size] [--device] [--out] [--members]`` and ``mergelab zoo list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.zoo import FAMILIES, build, families, family_dir, sizes
from mergelab.zoo.builder import FAMILY_RECORD


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zoo`` command (with ``build`` and ``list``) to a ``mergelab`` argparse subparsers object."""
    from mergelab.cli import examples

    zoo = subparsers.add_parser("zoo", help="build and list offline model families",
                                **examples("mergelab zoo build tiny-lm --size test", "mergelab zoo list",
                                           "mergelab zoo show tiny-lm --size demo"))
    commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build_parser = commands.add_parser(
        "build", help="build (or reuse) a model family; prints its folder",
        **examples("mergelab zoo build tiny-lm --size test            # seconds: untrained, for plumbing",
                   "mergelab zoo build tiny-lm --size demo --workers 2",
                   "mergelab zoo build tiny-lm --size demo --members addition reverse --out ./zoo/tiny"))
    build_parser.add_argument("family", help=f"one of: {', '.join(families())}")
    offered = "; ".join(f"{name}: {', '.join(family_sizes)}" for name, (_, family_sizes) in FAMILIES.items())
    build_parser.add_argument("--size", default="test", help=f"{offered} (default: test)")
    build_parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    build_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="family folder (default: $MERGELAB_ZOO or ~/.cache/mergelab/zoo, then FAMILY-SIZE)",
    )
    build_parser.add_argument(
        "--members",
        nargs="+",
        default=None,
        metavar="NAME",
        help="build only these members and their parents (default: all)",
    )
    build_parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="build independent members side by side in this many processes (same weights; default: 1)",
    )
    build_parser.set_defaults(func=_build)
    list_parser = commands.add_parser("list", help="list the families and which sizes are built")
    list_parser.set_defaults(func=_list)
    show_parser = commands.add_parser("show", help="print a built family's zoo.json as a markdown table")
    show_parser.add_argument("family", help=f"one of: {', '.join(families())}")
    show_parser.add_argument("--size", default="test", help="the size that was built (default: test)")
    show_parser.add_argument("--out", type=Path, default=None, help="family folder, as given to build")
    show_parser.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    folder = build(
        args.family, size=args.size, device=args.device, out=args.out, members=args.members, workers=args.workers,
        progress=getattr(args, "verbosity", 0) > -1,
    )
    record = json.loads((folder / FAMILY_RECORD).read_text())
    print(
        f"{folder}  ({len(record['members'])} members{'' if record['complete'] else ' so far'}, "
        f"{record['disk_bytes'] / 1e6:.1f} MB, built in {record['build_seconds_total']:.0f} s)"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    for family in families():
        for size in sizes(family):
            folder = family_dir(family, size)
            print(f"{family:10s} {size:5s} {_state(folder / FAMILY_RECORD):10s} {folder}")
    return 0


def _state(record: Path) -> str:
    if not record.is_file():
        return "not built"
    return "built" if json.loads(record.read_text()).get("complete") else "partial"


def _show(args: argparse.Namespace) -> int:
    record_path = family_dir(args.family, args.size, args.out) / FAMILY_RECORD
    if not record_path.is_file():
        raise MergelabError(
            f"{record_path} does not exist; build it first with: mergelab zoo build {args.family} --size {args.size}"
        )
    print(markdown(json.loads(record_path.read_text())))
    return 0


def markdown(record: dict) -> str:
    """A family record as a markdown table: member, parent, steps, build seconds, then one column per scored
    task (exact match or accuracy in %, the base's score with the same head in brackets where recorded) and one
    per held-out perplexity (the base's in brackets)."""
    tasks = list(dict.fromkeys(t for m in record["members"].values() for t in m["scores"]))
    texts = list(dict.fromkeys(t for m in record["members"].values() for t in m.get("perplexity", {})))
    header = ["member", "parent", "steps", "build s", *tasks, *(f"{t} perplexity" for t in texts)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, member in record["members"].items():
        cells = [name, member["parent"] or "-", str(member["steps"]), f"{member['build_seconds']:.0f}"]
        for task in tasks:
            score = member["scores"].get(task)
            cell = "" if score is None else f"{100 * score['accuracy']:.1f}"
            if score and "base_accuracy" in score:
                cell += f" ({100 * score['base_accuracy']:.1f})"
            cells.append(cell)
        for text in texts:
            ppl = member.get("perplexity", {}).get(text)
            cells.append("" if ppl is None else f"{ppl['perplexity']:.2f} ({ppl['base_perplexity']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    total = record["build_seconds_total"]
    lines.append("")
    lines.append(
        f"{record['family']} `{record['size']}`: {len(record['members'])} members"
        f"{'' if record['complete'] else ' (partial build)'}, {record['disk_bytes'] / 1e6:.1f} MB on disk, "
        f"{total:.0f} s of build time ({total / 60:.1f} min)."
    )
    return "\n".join(lines)
