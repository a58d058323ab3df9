"""``mergelab moe CONFIG OUT``: a Mixtral-style sparse model from a dense base and dense experts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = ("Assemble a Mixtral- or Qwen2-MoE-style sparse model from one dense base and dense experts "
               "(mergekit-moe's config shape); router rows come from the experts' prompts (gate_mode hidden or "
               "cheap_embed) or at random.")


def handler(args: argparse.Namespace) -> int:
    from mergelab.moe.assemble import assemble_moe
    from mergelab.moe.config import load_moe_config

    config = load_moe_config(args.config)
    out = assemble_moe(config, args.out, Path(args.config).parent, overwrite=args.overwrite,
                       progress=sys.stderr.isatty())
    print(f"mixture of {len(config.experts)} experts ({config.experts_per_token} per token, gate_mode "
          f"{config.gate_mode}) written to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from mergelab.cli import examples

    p = subparsers.add_parser("moe", help="assemble a Mixtral-style mixture of experts from dense fine-tunes",
                              description=DESCRIPTION,
                              **examples("mergelab moe moe.yml merged-moe/",
                                         "mergelab check moe.yml   # shapes, prompts and output size, no writes"))
    p.add_argument("config", help="YAML config in mergekit-moe's shape (base_model, gate_mode, experts, ...)")
    p.add_argument("out", help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=handler)
