"""LoRA adapters in and out on a realistic shape (SmolLM2-135M by default, bf16): wall time and peak RSS.

1. merge with a rank-16 peft adapter as an input (applied on read) against materialise-then-merge (peft
   ``merge_and_unload`` + ``save_pretrained``, then the same merge over the saved copy), each step a separate
   process measured with ``wait4`` (peak RSS = the child's ``ru_maxrss``);
2. ``mergelab extract-lora`` at rank 16 from a synthetic fine-tune whose layer task vectors have a power-law
   spectrum (s_i = 0.02 / i, random singular vectors) plus bf16 rounding, and the whole-model error by rank
   that it records.

    python benchmarks/bench_lora.py --shape smollm2-135m --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import SHAPES, run_measured  # noqa: E402

MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
model.save_pretrained(out)
"""

MATERIALISE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""

MAKE_FINETUNE = """
import json, shutil, sys, torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)  # setup only: one thread is much faster than two on the shared machine
base, out = sys.argv[1:3]
shutil.copytree(base, out)
tensors = load_file(f"{out}/model.safetensors")
generator = torch.Generator().manual_seed(1)
for name, t in tensors.items():
    if ".layers." in name and t.dim() == 2:
        m, n = t.shape
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
        sigma = 0.02 / torch.arange(1, k + 1)
        tensors[name] = (t.float() + (u * sigma) @ v.T).to(t.dtype)
save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
"""


def write_base(root: Path, shape: str) -> Path:
    base = root / "base"
    if not (base / "model.safetensors").exists():
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "bench_engine.py"), "--write", str(base), shape,
                        "0", "-"], check=True)
        config = json.loads((base / "config.json").read_text())  # what transformers needs beyond bench_engine's
        config.update(hidden_act="silu", bos_token_id=0, eos_token_id=0)
        (base / "config.json").write_text(json.dumps(config, indent=1))
    return base


def fmt(label: str, measured: tuple[float, float, float]) -> str:
    wall, rss, cpu = measured
    return f"| {label} | {wall:.1f} s | {rss:.2f} GiB | {cpu:.1f} s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergelab-bench-lora"))
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = args.workdir / args.shape
    root.mkdir(parents=True, exist_ok=True)
    base = write_base(root, args.shape)
    adapter, full, tuned = root / "adapter", root / "materialised", root / "finetune"
    for folder in (adapter, full, tuned, root / "out-adapter", root / "out-full", root / "extracted"):
        for leftover in (folder, folder.with_name(folder.name + ".partial")):  # a killed earlier run
            shutil.rmtree(leftover, ignore_errors=True)
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(base), str(adapter), str(args.rank)], check=True, env=env)
    subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # warm cache

    def recipe(model: Path, name: str) -> Path:
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
                                        "models": [{"model": str(model), "parameters": {"weight": 0.8}}]}))
        return path

    merge = [sys.executable, "-m", "mergelab.cli", "merge"]
    print("| step | wall | peak RSS | CPU |\n|---|---|---|---|", flush=True)
    print(fmt(f"adapter as input: merge (rank {args.rank}, applied on read)",
              run_measured([*merge, str(recipe(adapter, "adapter")), str(root / "out-adapter")], env)), flush=True)
    materialise = run_measured([sys.executable, "-c", MATERIALISE, str(base), str(adapter), str(full)], env)
    then_merge = run_measured([*merge, str(recipe(full, "full")), str(root / "out-full")], env)
    print(fmt("materialise: peft merge_and_unload + save_pretrained", materialise))
    print(fmt("then merge over the saved copy", then_merge))
    print(fmt("materialise-then-merge, total (peak: the larger)",
              (materialise[0] + then_merge[0], max(materialise[1], then_merge[1]), materialise[2] + then_merge[2])),
          flush=True)
    subprocess.run([sys.executable, "-c", MAKE_FINETUNE, str(base), str(tuned)], check=True, env=env)
    extract = run_measured([sys.executable, "-m", "mergelab.cli", "extract-lora", str(tuned), str(root / "extracted"),
                            "--base", str(base), "--rank", str(args.rank)], env)
    print(fmt(f"extract-lora --rank {args.rank} (full SVD of every layer matrix)", extract), flush=True)
    record = json.loads((root / "extracted" / "lora_extraction.json").read_text())
    print("\nwhole-model relative error ||D - BA|| / ||D|| by rank (Eckart-Young, from the record):")
    print("| rank | " + " | ".join(record["error_at_rank"]) + " |")
    print("|---|" + "---|" * len(record["error_at_rank"]))
    print("| error | " + " | ".join(f"{v:.3f}" for v in record["error_at_rank"].values()) + " |")
    print(f"\nstored adapter at rank {args.rank}: relative error {record['relative_error']:.4f}, "
          f"{record['parameters']:,} parameters; disk written by materialise: "
          f"{sum(f.stat().st_size for f in full.iterdir()) / 1e6:.0f} MB")
    for folder in (full, tuned, root / "out-adapter", root / "out-full", root / "extracted"):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
