"""``mergelab extract-lora FINETUNED --base BASE --rank R OUT``: write a peft LoRA adapter from a fine-tune."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("Write a peft LoRA adapter from a fine-tune's task vector: a truncated SVD of each layer matrix's "
               "change from the base, with the reconstruction error of every module recorded in lora_extraction.json.")


def _rank_for(text: str) -> tuple[str, int]:
    pattern, _, rank = text.rpartition("=")
    if not pattern or not rank.strip().isdigit() or int(rank) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not PATTERN=RANK (e.g. q_proj=8, 'layers\\.0\\..*=4')")
    return pattern, int(rank)


def handler(args: argparse.Namespace) -> int:
    from mergelab.checkpoint.dtypes import torch_dtype
    from mergelab.lora.extract import RankRule, extract_lora, summary

    rule = RankRule(args.rank, dict(args.rank_for or []), args.energy)
    record = extract_lora(args.finetuned, args.base, args.out, rule,
                          dtype=torch_dtype(args.dtype) if args.dtype else None, lora_only=args.lora_only,
                          overwrite=args.overwrite, threads=args.threads, progress=sys.stderr.isatty())
    print(summary(record))
    print(f"adapter written to {args.out} (per-module errors in lora_extraction.json)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from mergelab.cli import examples

    p = subparsers.add_parser("extract-lora", help="a peft LoRA adapter from a fine-tune's task vector (truncated SVD)",
                              description=DESCRIPTION,
                              **examples("mergelab extract-lora math-expert/ adapter/ --base base/ --rank 16",
                                         "mergelab extract-lora ft/ adapter/ --base base/ --energy 0.9 --rank 64",
                                         "mergelab extract-lora ft/ adapter/ --base base/ --rank 8 --rank-for mlp=32"))
    p.add_argument("finetuned", help="the fine-tuned model folder")
    p.add_argument("out", help="output adapter folder (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--base", required=True, help="the base model folder the fine-tune started from")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of every layer matrix (with --energy: the most any matrix keeps)")
    p.add_argument("--rank-for", type=_rank_for, action="append", metavar="PATTERN=R",
                   help="rank for modules whose name ends in a match of the regex PATTERN (peft's rank_pattern "
                        "rule; first match wins; repeatable)")
    p.add_argument("--energy", type=float, default=None,
                   help="per matrix, the smallest rank keeping this fraction of the task vector's squared "
                        "Frobenius norm (e.g. 0.9)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="dtype of the factors (default: the base's)")
    p.add_argument("--lora-only", action="store_true",
                   help="leave out changed tensors that are not layer matrices (norms, embeddings, head) instead "
                        "of saving them whole as modules_to_save")
    p.add_argument("--threads", type=int, default=None,
                   help="matrices factorised side by side, one torch thread each (default: the cores, at most 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=handler)
