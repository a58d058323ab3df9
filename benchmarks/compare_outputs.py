"""Byte-identical outputs across two mergelab source trees, for every method family.

Builds bf16 checkpoints of the SmolLM2-135M tensor shapes (``bench_engine.write_model``; ``--layers`` keeps
fewer decoder layers so the run stays short), merges each recipe below with each source tree as a separate
``mergelab merge`` process, and compares the SHA-256 of every output file that a merge defines by its bytes
(weight shards, index, config). ``mergelab.json`` is compared on its per-tensor statistics and pass records
(its version and path fields differ by design).

    python benchmarks/compare_outputs.py --src /work/main/src src --workdir /tmp/compare

Exit status 1 when any output differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine  # noqa: E402

SEED = 7


def recipes(base: str, experts: list[str]) -> dict[str, tuple[dict, list[str]]]:
    """Name -> (recipe, extra ``mergelab merge`` flags)."""
    two = [{"model": base}] + [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.6, 0.4))]
    dense = [{"model": base}] + [{"model": e, "parameters": {"weight": w, "density": d}}
                                 for e, w, d in zip(experts, (0.6, 0.4), (0.3, 0.5))]

    def merge(method: str, models: list, **parameters) -> dict:
        return {"merge_method": method, "base_model": base, "models": models, "parameters": parameters,
                "dtype": "bfloat16", "seed": SEED}

    table = {
        "linear": (merge("linear", [{"model": e, "parameters": {"weight": 1.0}} for e in experts]), []),
        "passthrough": ({"merge_method": "passthrough", "models": [{"model": experts[0]}], "dtype": "bfloat16"},
                        []),
        "task_arithmetic": (merge("task_arithmetic", two, **{"lambda": 0.8}), []),
        "ties": (merge("ties", dense), []),
        "dare_ties": (merge("dare_ties", dense), []),
        "dare_linear": (merge("dare_linear", dense), []),
        "della": (merge("della", dense, epsilon=0.1), []),
        "breadcrumbs": (merge("breadcrumbs", dense, gamma=0.02), []),
        "scf_rkl": (merge("scf_rkl", [{"model": base}, {"model": experts[0]}]), []),
        "scf_rkl_two": (merge("scf_rkl", [{"model": base}] + [{"model": e} for e in experts],
                              multi_expert="mean"), []),
        "arcee_fusion": (merge("arcee_fusion", [{"model": base}, {"model": experts[0]}]), []),
        "karcher": (merge("karcher", two), []),
        "karcher_fisher": (merge("karcher", two, fisher_precondition="diagonal"), []),
        "slerp": (merge("slerp", [{"model": base}, {"model": experts[0]}], t=0.3), []),
        "multislerp": (merge("multislerp", two), []),
        "model_stock": (merge("model_stock", [{"model": base}] + [{"model": e} for e in experts]), []),
        "sce": (merge("sce", [{"model": base}] + [{"model": e} for e in experts], select_topk=0.5), []),
        "tsv": (merge("tsv", two), []),
        "iso_c": (merge("iso_c", two), []),
        "iso_cts": (merge("iso_cts", two), []),
        "task_arithmetic_sb": (merge("task_arithmetic_sb", two), []),
        "ties_sb": (merge("ties_sb", dense), []),
        "ties_sharded": (merge("ties", dense), ["--shard-size", "40M"]),
        "fim_ta": (merge("fim_ta", two, fisher_samples=2, fisher_length=8), []),
        "fim_ties": (merge("fim_ties", two, fisher_samples=2, fisher_length=8, density=0.3), []),
        "slices": ({"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                    "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                            {"model": experts[0], "layer_range": [1, 3],
                                             "parameters": {"weight": [0.2, 0.9]}}]},
                               {"sources": [{"model": base, "layer_range": [1, 2]},
                                            {"model": experts[1], "layer_range": [0, 1]}]}]}, []),
    }
    return table


def build_models(workdir: Path, layers: int) -> tuple[Path, list[Path]]:
    base, experts = workdir / "base", [workdir / f"expert{i}" for i in range(2)]
    if not base.exists():
        bench_engine.write_model(base, "smollm2-135m", 0, None, layers)
    for i, expert in enumerate(experts):
        if not expert.exists():
            bench_engine.write_model(expert, "smollm2-135m", i + 1, base, layers)
    return base, experts


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each byte-defined output file, and of ``mergelab.json``'s statistics and pass records."""
    result = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
              if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}
    record = json.loads((folder / "mergelab.json").read_text())
    for key in ("tensors", "per_layer", "prepare", "finish"):
        if key in record:
            value = record[key]
            if key == "prepare":  # timings and cache locations differ by run
                value = {k: v for k, v in value.items() if k != "fisher_seconds"}
                if "fisher" in value:
                    value["fisher"] = {k: v for k, v in value["fisher"].items()
                                       if k not in ("seconds", "cached", "cache_file")}
            result[f"mergelab.json:{key}"] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, nargs=2, required=True, help="the two src folders to compare")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers of the SmolLM2-135M shape")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--first-only", action="store_true",
                        help="only merge with the first src (prepares the reference outputs ahead of time)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, experts = build_models(args.workdir / "models", args.layers)
    table = recipes(str(base), [str(e) for e in experts])
    different = []
    for name, (recipe, flags) in table.items():
        if args.only and name not in args.only:
            continue
        recipe_path = args.workdir / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        results = []
        for index, src in enumerate(args.src[:1] if args.first_only else args.src):
            out = args.workdir / f"out{index}" / name
            out.parent.mkdir(exist_ok=True)
            if not out.exists():
                env = dict(os.environ, PYTHONPATH=str(src.resolve()),
                           MERGELAB_CACHE=str(args.workdir / f"cache{index}"))
                subprocess.run([sys.executable, "-m", "mergelab.cli", "merge", str(recipe_path), str(out), *flags],
                               env=env, check=True, stderr=subprocess.DEVNULL)
            results.append(digests(out))
        if args.first_only:
            continue
        same = results[0] == results[1]
        print(f"{name:16} {'identical' if same else 'DIFFERENT'}  " +
              " ".join(f"{k}={v[:12]}" for k, v in results[0].items() if k.endswith(".safetensors")), flush=True)
        if not same:
            different.append(name)
    print("all outputs identical" if not different else f"different: {', '.join(different)}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
