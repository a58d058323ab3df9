"""How far mergelab's default output is from ``mergekit-yaml`` 0.1.5's, and under ``--compat mergekit`` (issue 20).

Builds a base and three fine-tunes stored in bfloat16 (tiny Llama, 2 layers, hidden 32; ``tests/tinymodels.py``),
runs each recipe once with ``mergekit-yaml`` and twice with mergelab (default, ``compat: mergekit``), and prints a
Markdown row per run: the share of elements that differ, the largest difference in steps of the output dtype at
the element's magnitude, and the largest difference over the tensor's largest magnitude (README, "Coming from
mergekit").

    python benchmarks/bench_mergekit_differences.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import load_folder, make_family, run_mergekit  # noqa: E402

from mergelab.api import merge  # noqa: E402


def recipes(b: str, e: list[str]) -> dict[str, dict]:
    def models(weights, **extra):
        return [{"model": m, "parameters": {"weight": w, **extra}} for m, w in zip(e, weights)]

    plain = [{"model": m} for m in e]
    return {
        "ties bf16, equal weights": {"merge_method": "ties", "base_model": b, "dtype": "bfloat16",
                                     "models": models([1.0, 1.0, 1.0], density=0.5)},
        "ties float32, weights 0.3/1.0/0.6": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                                              "models": models([0.3, 1.0, 0.6], density=0.5)},
        "task_arithmetic fp16": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float16",
                                 "parameters": {"lambda": 0.8}, "models": models([0.3, 1.0, 0.6])},
        "breadcrumbs fp16": {"merge_method": "breadcrumbs", "base_model": b, "dtype": "float16",
                             "models": models([0.5, 0.5, 0.5], density=0.6, gamma=0.05)},
        "linear bf16": {"merge_method": "linear", "dtype": "bfloat16", "models": models([0.2, 0.5, 0.3])},
        "slerp bf16": {"merge_method": "slerp", "base_model": b, "dtype": "bfloat16", "parameters": {"t": 0.3},
                       "models": [{"model": b}, {"model": e[0]}]},
        "karcher float32 with base": {"merge_method": "karcher", "base_model": b, "dtype": "float32",
                                      "models": plain[:2]},
        "arcee_fusion float32": {"merge_method": "arcee_fusion", "base_model": b, "dtype": "float32",
                                 "models": [{"model": b}, plain[0]]},
        "arcee_fusion bf16": {"merge_method": "arcee_fusion", "base_model": b, "dtype": "bfloat16",
                              "models": [{"model": b}, plain[0]]},
        "model_stock bf16": {"merge_method": "model_stock", "base_model": b, "dtype": "bfloat16", "models": plain},
        "sce bf16": {"merge_method": "sce", "base_model": b, "dtype": "bfloat16", "models": plain,
                     "parameters": {"select_topk": 0.5}},
        "multislerp bf16": {"merge_method": "multislerp", "base_model": b, "dtype": "bfloat16",
                            "models": models([1.0, 0.5, 2.0])},
        "nuslerp bf16": {"merge_method": "nuslerp", "base_model": b, "dtype": "bfloat16",
                         "models": models([0.3, 0.7])[:2]},
    }


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float, float, set]:
    """(share of differing elements, largest difference in steps, largest relative difference, dtype pairs)."""
    differing = total = 0
    steps = relative = 0.0
    dtypes = set()
    for name, reference in theirs.items():
        a, c = ours[name].float(), reference.float()
        dtypes.add(f"{str(ours[name].dtype)[6:]}/{str(reference.dtype)[6:]}")
        d = (a - c).abs()
        step = torch.finfo(reference.dtype).eps * torch.maximum(a.abs(), c.abs()).clamp_min(1e-30)
        steps = max(steps, float((d / step).max()))
        relative = max(relative, float(d.max() / c.abs().max()))
        differing += int((d > 0).sum())
        total += d.numel()
    return differing / total, steps, relative, dtypes


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mergekit-differences-")).resolve()
    base, experts = make_family(root / "family", 3, layers=2, dtype=torch.bfloat16)
    print("| recipe | mode | dtypes (mergelab/mergekit) | elements differing | largest, steps | largest, rel. |")
    print("|---|---|---|---|---|---|")
    for name, recipe in recipes(str(base), [str(e) for e in experts]).items():
        theirs = load_folder(run_mergekit(recipe, root, "mergekit"))
        for mode, extra in (("default", {}), ("compat", {"compat": "mergekit"})):
            ours = load_folder(merge({**recipe, **extra}, root / "mergelab", overwrite=True))
            share, steps, relative, dtypes = compare(ours, theirs)
            print(f"| {name} | {mode} | {', '.join(sorted(dtypes))} | {100 * share:.1f} % | {steps:.0f} | "
                  f"{relative:.2g} |", flush=True)


if __name__ == "__main__":
    main()
