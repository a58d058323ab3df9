"""Wall time and peak memory of the exact quantile kernel and of whole-tensor method ops on one large tensor.

The tensor is a synthetic, seeded stand-in for Qwen2.5-1.5B's embedding (151936 x 1536 bf16, 233M elements):
base ~ N(0, 0.02²), experts = base + N(0, 0.0005²), all rounded to bf16. Each phase runs in its own process,
which builds its inputs in row blocks, then resets its peak-RSS mark (``/proc/self/clear_refs``) so that
``extra`` is the op's own peak memory above its inputs. Phases:

- ``quantile``: ``mergelab.ops.quantile.quantiles`` of the float32 |expert − base| at (0.25, 0.5, 0.75);
- ``numpy_quantile``: ``numpy.quantile`` of the same (exact too, CPU only) for comparison;
- ``scf_rkl``: the SCF-RKL method on the bf16 pair as the engine runs it (cast to float32, then the method),
  with a breakdown (per-row KL, saliency, threshold, mask and output);
- ``mergekit_arcee``: mergekit 0.1.5's arcee_fusion tensor op (float32 KL, quantiles of a 10^6 sample) on the
  same float32 pair, as the reference point (run from mergekit's own module, never from mergelab);
- one phase per method that needs a whole tensor (``karcher``, ``model_stock``, ``multislerp``, ``slerp``,
  ``sce``, ``tsv``, ``iso_c``, ``iso_cts``): the method on the base and two experts (three models for
  the methods without a base, one expert for slerp) cast to float32, as the engine hands it a whole tensor;
  ``--kind matrix`` names the tensor a layer's MLP projection (give ``--rows 8960``), where the SVD methods
  work on its spectrum, instead of the embedding, where they take the task-vector mean.

    python benchmarks/bench_quantile.py [--rows 151936 --cols 1536] [--phases quantile scf_rkl ...]
    python benchmarks/bench_quantile.py --rows 8960 --kind matrix --phases tsv iso_c iso_cts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

METHOD_PHASES = ("karcher", "model_stock", "multislerp", "slerp", "sce", "tsv", "iso_c", "iso_cts")
PHASES = ("quantile", "numpy_quantile", "scf_rkl", "mergekit_arcee", *METHOD_PHASES)


def make_models(rows: int, cols: int, seed: int, experts: int = 1) -> tuple[torch.Tensor, ...]:
    """The seeded bf16 base and experts, built in row blocks (no full-size float32 temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    models = [torch.empty(rows, cols, dtype=torch.bfloat16) for _ in range(1 + experts)]
    step = max(1, (1 << 22) // cols)
    for start in range(0, rows, step):
        block = torch.randn(min(step, rows - start), cols, generator=gen) * 0.02
        models[0][start : start + step] = block
        for expert in models[1:]:
            expert[start : start + step] = block + torch.randn(block.shape, generator=gen) * 0.0005
    return tuple(models)


def abs_delta(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """float32 |expert − base|, in row blocks."""
    out = torch.empty(base.shape, dtype=torch.float32)
    step = max(1, (1 << 22) // base.shape[1])
    for start in range(0, base.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = (expert[rows].float() - base[rows].float()).abs_()
    return out


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs`` 5) and return that RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS")


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def exact_quantiles(delta: torch.Tensor) -> dict:
    from mergelab.ops.quantile import quantiles

    return {"quantiles": quantiles(delta, (0.25, 0.5, 0.75))}


def numpy_quantiles(delta: torch.Tensor) -> dict:
    import numpy as np

    return {"quantiles": np.quantile(delta.numpy(), (0.25, 0.5, 0.75)).tolist()}


def scf_rkl_op(base: torch.Tensor, expert: torch.Tensor) -> dict:
    """The engine's view: cast the bf16 pair to float32, run the method."""
    from mergelab.methods.scf import SPECS
    from mergelab.methods.spec import MethodCall, TensorInfo

    spec = next(s for s in SPECS if s.name == "scf_rkl")
    params = {p.name: p.default for p in spec.params}
    info = TensorInfo("model.embed_tokens.weight", None, "embedding", 28)
    _, stats = spec.fn(MethodCall(base.float(), [expert.float()], info, params))
    return {"stats": stats}


def scf_breakdown(base: torch.Tensor, expert: torch.Tensor) -> dict:
    """Seconds of each step of the SCF-RKL op, run one after the other."""
    from mergelab.methods.scf_saliency import Thresholding, passes
    from mergelab.ops.divergence import softmax_kl_rows
    from mergelab.ops.quantile import quantiles

    base32, expert32 = base.float(), expert.float()
    figures = {}
    row_kl, figures["row_kl_s"] = timed(softmax_kl_rows, base32, expert32, 1e-8)
    start = time.perf_counter()
    scores = (expert32 - base32).abs_().mul_(row_kl.float().unsqueeze(-1))
    figures["saliency_s"] = time.perf_counter() - start
    settings = Thresholding(1.5, 0.25, 0.5, 0.75, "linear")
    threshold, figures["threshold_s"] = timed(lambda s: settings.threshold(*quantiles(s, (0.25, 0.5, 0.75))), scores)
    mask, figures["mask_s"] = timed(passes, scores, threshold)
    _, figures["where_s"] = timed(torch.where, mask, expert32, base32)
    return figures


def method_op(name: str, kind: str):
    """The whole-tensor op of method ``name`` on the engine's float32 casts of the bf16 models."""
    def op(base: torch.Tensor, *experts: torch.Tensor) -> dict:
        from mergelab.methods import METHODS
        from mergelab.methods.spec import TensorInfo

        spec = METHODS[name]
        info = (TensorInfo("model.layers.0.mlp.up_proj.weight", 0, "mlp_up", 28) if kind == "matrix"
                else TensorInfo("model.embed_tokens.weight", None, "embedding", 28))
        models = [t.float() for t in (base, *experts)]
        if spec.base == "ignored":
            call = spec.call_with(None, models, info)
        else:
            call = spec.call_with(models[0], models[1:], info, **({"t": 0.5} if name == "slerp" else {}))
        result = spec.fn(call)
        return {"stats": result[1] if isinstance(result, tuple) else {}}
    return op


def mergekit_arcee_op(base: torch.Tensor, expert: torch.Tensor) -> dict:
    """mergekit's arcee_fusion tensor op on the float32 pair (its own functions, as its merge method runs them)."""
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    base32, expert32 = base.float(), expert.float()
    importance = _compute_importance(expert32, base32)
    mask, _ = DynamicThresholdFusion().compute_fusion_mask(importance)
    _ = base32 + (expert32 - base32) * mask
    return {"selected": float(mask.mean())}


def run_phase(phase: str, rows: int, cols: int, seed: int, kind: str = "embedding") -> dict:
    """Build the inputs, run one phase, and return its figures."""
    inputs = make_models(rows, cols, seed, 2 if phase in METHOD_PHASES and phase != "slerp" else 1)
    figures: dict = {"phase": phase, "elements": inputs[0].numel()}
    if phase in ("quantile", "numpy_quantile"):
        inputs = (abs_delta(*inputs),)
    ops = {"quantile": exact_quantiles, "numpy_quantile": numpy_quantiles, "scf_rkl": scf_rkl_op,
           "mergekit_arcee": mergekit_arcee_op}
    op = ops[phase] if phase in ops else method_op(phase, kind)
    before = reset_peak()
    result, figures["seconds"] = timed(op, *inputs)
    figures.update(result)
    figures["peak_rss_gib"] = rss_kib("VmHWM") / 2**20
    figures["extra_gib"] = (rss_kib("VmHWM") - before) / 2**20
    if phase == "scf_rkl":
        figures.update(scf_breakdown(*inputs))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=151936)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--kind", choices=("embedding", "matrix"), default="embedding",
                        help="which tensor the method phases take it for")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_phase(args.child, args.rows, args.cols, args.seed, args.kind)))
        return
    print(f"# {args.rows} x {args.cols} bf16 ({args.rows * args.cols / 1e6:.1f}M elements), seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    f32_gib = args.rows * args.cols * 4 / 2**30
    for phase in args.phases:
        cmd = [sys.executable, __file__, "--child", phase, "--rows", str(args.rows), "--cols", str(args.cols),
               "--seed", str(args.seed), "--kind", args.kind]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{phase:15s} {figures['seconds']:7.2f} s   peak RSS {figures['peak_rss_gib']:5.2f} GiB   "
              f"extra {figures['extra_gib']:5.2f} GiB ({figures['extra_gib'] / f32_gib:.2f}x the float32 tensor)")
        print("    " + json.dumps({k: v for k, v in figures.items()
                                   if k not in ("phase", "seconds", "peak_rss_gib", "extra_gib")}))


if __name__ == "__main__":
    main()
