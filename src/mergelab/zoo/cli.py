"""``mergelab zoo build FAMILY [--size] [--device] [--out]`` and ``mergelab zoo list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mergelab.zoo import SIZES, build, families, family_dir
from mergelab.zoo.builder import FAMILY_RECORD


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zoo`` command (with ``build`` and ``list``) to a ``mergelab`` argparse subparsers object."""
    zoo = subparsers.add_parser("zoo", help="build and list offline model families")
    commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build_parser = commands.add_parser("build", help="build (or reuse) a model family; prints its folder")
    build_parser.add_argument("family", help=f"one of: {', '.join(families())}")
    build_parser.add_argument("--size", default="test", help=f"one of: {', '.join(SIZES)} (default: test)")
    build_parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    build_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="family folder (default: $MERGELAB_ZOO or ~/.cache/mergelab/zoo, then FAMILY-SIZE)",
    )
    build_parser.set_defaults(func=_build)
    list_parser = commands.add_parser("list", help="list the families and which sizes are built")
    list_parser.set_defaults(func=_list)


def _build(args: argparse.Namespace) -> int:
    folder = build(args.family, size=args.size, device=args.device, out=args.out)
    record = json.loads((folder / FAMILY_RECORD).read_text())
    print(
        f"{folder}  ({len(record['members'])} members, {record['disk_bytes'] / 1e6:.1f} MB, "
        f"built in {record['build_seconds_total']:.0f} s)"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    for family in families():
        for size in SIZES:
            folder = family_dir(family, size)
            state = "built" if (folder / FAMILY_RECORD).is_file() else "not built"
            print(f"{family:10s} {size:5s} {state:10s} {folder}")
    return 0
