"""Wall time and peak RSS of ``mergelab merge`` against the I/O floor and ``mergekit-yaml``, side by side.

Writes realistic-shape bf16 checkpoints (a base and two experts; SmolLM2-135M and/or Qwen2.5-1.5B shapes),
then times, as separate processes in one run: the I/O floor (read every input byte once, write and fsync
the output's size once), mergelab, and mergekit, for each method. Peak RSS is the child's ``ru_maxrss``.

    python benchmarks/bench_engine.py --shapes smollm2-135m qwen2.5-1.5b --methods task_arithmetic ties
    python benchmarks/bench_engine.py --shapes qwen2.5-1.5b --methods all --experts 2 --no-mergekit
    python benchmarks/bench_engine.py --shapes qwen2.5-1.5b --layers 1 --methods tsv --no-mergekit

``--layers N`` keeps the shape's first N decoder layers (0: the embedding and the final norm alone): every layer
has the same tensors, so a method's peak memory on N >= 1 layers is close to its peak on the whole model (Iso-C on
the 1.5B shape: 0.90 GiB with one layer, 1.04 GiB with 28), measured in a fraction of the time (the SVD methods
take 6-23 CPU minutes on the whole 1.5B shape on the 2-core machine).

``--methods all`` runs every method mergelab registers (asked from a child process, so that this parent, whose
memory a child's peak RSS can include, never imports torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHAPES = {
    # name: (architecture, model_type, vocab, hidden, intermediate, layers, heads, kv_heads, qkv_bias)
    "smollm2-135m": ("LlamaForCausalLM", "llama", 49152, 576, 1536, 30, 9, 3, False),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", "qwen2", 151936, 1536, 8960, 28, 12, 2, True),
}


def layer_shapes(hidden: int, inter: int, heads: int, kv: int, bias: bool) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv * head_dim, hidden),
        "self_attn.v_proj.weight": (kv * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    if bias:
        shapes.update({"self_attn.q_proj.bias": (hidden,), "self_attn.k_proj.bias": (kv * head_dim,),
                       "self_attn.v_proj.bias": (kv * head_dim,)})
    return shapes


def write_model(folder: Path, shape: str, seed: int, base: Path | None, layers: int | None = None) -> None:
    """A bf16 checkpoint of the given shape (its first ``layers`` decoder layers, if given); an expert is its base
    plus seeded noise. Runs in a child process (``--write``) so that the measuring parent stays small: a child's
    peak RSS can include its parent's."""
    import torch
    from safetensors.torch import save_file

    arch, model_type, vocab, hidden, inter, all_layers, heads, kv, bias = SHAPES[shape]
    layers = all_layers if layers is None else layers
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    names = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        names.update({f"model.layers.{i}.{k}": v for k, v in layer_shapes(hidden, inter, heads, kv, bias).items()})
    from safetensors import safe_open

    tensors = {}
    with safe_open(base / "model.safetensors", "pt") if base is not None else contextlib.nullcontext() as base_file:
        for name, dims in names.items():  # the base read one tensor at a time: one model in memory, not two
            if base_file is None:
                tensors[name] = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
            else:
                noise = torch.randn(dims, generator=gen) * 0.002
                tensors[name] = (base_file.get_tensor(name).float() + noise).to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": [arch], "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-6, "max_position_embeddings": 4096}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GiB) and CPU seconds (user + system) of one child process. Its stderr (progress
    bars) goes to a file: a pipe read only after the child exits blocks the child once its 64 KiB are full."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime


IO_FLOOR = """
import os, sys
total = 0
for path in sys.argv[2:]:
    with open(path, 'rb', buffering=0) as f:
        while chunk := f.read(1 << 24):
            total += len(chunk)
out_bytes = int(sys.argv[1])
block = bytes(1 << 24)
with open(os.environ['FLOOR_OUT'], 'wb') as f:
    written = 0
    while written < out_bytes:
        n = min(len(block), out_bytes - written)
        f.write(block[:n]); written += n
    f.flush(); os.fsync(f.fileno())
"""


# Methods and the inputs they take: a base and one other model, every model without a base, or a base and all
# experts. mergekit has no tsv, iso_c, iso_cts, *_sb, scf_rkl or scf_kl; those run without it.
PAIR_METHODS = {"slerp": {"t": 0.5}, "scf_rkl": {}, "scf_kl": {}, "arcee_fusion": {}}
NO_BASE_METHODS = {"linear", "karcher", "multislerp"}
NOT_IN_MERGEKIT = {"tsv", "iso_c", "iso_cts", "task_arithmetic_sb", "ties_sb", "scf_rkl", "scf_kl", "fim_ta",
                   "fim_ties"}
SPARSE = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def recipe_for(method: str, base: Path, experts: list[Path]) -> tuple[dict, list[Path]]:
    """A benchmark recipe and the folders it reads."""
    if method in PAIR_METHODS:
        models = [{"model": str(experts[0])}]
        top = PAIR_METHODS[method]
        return {"merge_method": method, "base_model": str(base), "models": models, "dtype": "bfloat16",
                **({"parameters": top} if top else {})}, [base, experts[0]]
    if method == "passthrough":  # one model, copied
        return {"merge_method": method, "dtype": "bfloat16", "models": [{"model": str(experts[0])}]}, experts[:1]
    if method in NO_BASE_METHODS:
        return {"merge_method": method, "dtype": "bfloat16",
                "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in experts]}, experts
    per_model = {"weight": 0.5} if method not in ("model_stock", "sce") else {}
    if method in SPARSE:
        per_model["density"] = 0.3
    models = [{"model": str(f), **({"parameters": per_model} if per_model else {})} for f in experts]
    return {"merge_method": method, "base_model": str(base), "models": models, "dtype": "bfloat16"}, [base, *experts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m"], choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"],
                        help="method names, or 'all' for every registered method")
    parser.add_argument("--experts", type=int, default=2, help="number of experts besides the base")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergelab-bench"))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--mergelab-args", default="", help="extra flags for mergelab merge")
    parser.add_argument("--compute-threads", type=int, nargs="+", default=None,
                        help="run mergelab once per value of --compute-threads, side by side (default: once)")
    parser.add_argument("--compare-src", type=Path, nargs="*", default=[],
                        help="also run mergelab from these source trees (a 'src' folder of another commit), "
                             "side by side, for before/after ratios measured in one run")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep the shape's first N decoder layers (default: all); the module docstring says why")
    parser.add_argument("--parameters", type=json.loads, default={},
                        help='recipe-level parameters as JSON, added to every recipe (e.g. \'{"select_topk": 0.5}\')')
    parser.add_argument("--write", nargs=4, metavar=("FOLDER", "SHAPE", "SEED", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        folder, shape, seed, base = args.write
        write_model(Path(folder), shape, int(seed), None if base == "-" else Path(base), args.layers)
        return
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.methods == ["all"]:
        listing = "from mergelab.methods import METHODS; print(' '.join(METHODS))"
        args.methods = subprocess.run([sys.executable, "-c", listing], env=env, check=True, capture_output=True,
                                      text=True).stdout.split()
    for shape in args.shapes:
        root = args.workdir / (shape if args.layers is None else f"{shape}-{args.layers}-layers")
        folders = [root / "base"] + [root / f"expert{i}" for i in range(args.experts)]
        for i, f in enumerate(folders):
            if not (f / "model.safetensors").exists():
                shutil.rmtree(f, ignore_errors=True)
                layers = [] if args.layers is None else ["--layers", str(args.layers)]
                subprocess.run([sys.executable, __file__, "--write", str(f), shape, str(i),
                                "-" if i == 0 else str(folders[0]), *layers], check=True)
        out_bytes = (folders[0] / "model.safetensors").stat().st_size
        floors: dict[tuple[str, ...], tuple[float, float, float]] = {}
        for method in args.methods:
            recipe, used = recipe_for(method, folders[0], folders[1:])
            if args.parameters:
                recipe["parameters"] = {**recipe.get("parameters", {}), **args.parameters}
            inputs = tuple(str(f / "model.safetensors") for f in used)
            subprocess.run(["cat", *inputs], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
            if inputs not in floors:
                floor_out = root / "floor.bin"
                floors[inputs] = run_measured([sys.executable, "-c", IO_FLOOR, str(out_bytes), *inputs],
                                              dict(env, FLOOR_OUT=str(floor_out)))
                floor_out.unlink()
            recipe_path = root / f"{method}.yml"
            recipe_path.write_text(yaml.safe_dump(recipe))
            results = {"floor": floors[inputs]}
            out = root / f"out-mergelab-{method}"
            for leftover in (out, out.with_name(out.name + ".partial")):  # a killed earlier run
                shutil.rmtree(leftover, ignore_errors=True)
            for src in [None, *args.compare_src]:
                run_env = env if src is None else dict(env, PYTHONPATH=str(src.resolve()))
                for threads in args.compute_threads or [None]:
                    flags = args.mergelab_args.split()
                    flags += [] if threads is None else ["--compute-threads", str(threads)]
                    label = "mergelab" + ("" if src is None else f" src={src}") + \
                        ("" if threads is None else f" threads={threads}")
                    results[label] = run_measured([sys.executable, "-m", "mergelab.cli", "merge", str(recipe_path),
                                                   str(out), *flags], run_env)
                    shutil.rmtree(out, ignore_errors=True)
            if not args.no_mergekit and method not in NOT_IN_MERGEKIT:
                mk_out = root / f"out-mergekit-{method}"
                shutil.rmtree(mk_out, ignore_errors=True)
                results["mergekit"] = run_measured([str(bin_dir / "mergekit-yaml"), str(recipe_path), str(mk_out),
                                                    "--no-copy-tokenizer"], env)
                shutil.rmtree(mk_out, ignore_errors=True)
            with_base = method not in NO_BASE_METHODS and method != "passthrough"
            print(format_row(f"{shape} N={len(used) - with_base}", method, results),
                  flush=True)


def format_row(shape: str, method: str, results: dict[str, tuple[float, float, float]]) -> str:
    floor_wall = results["floor"][0]
    cells = [f"{shape} {method} (load {os.getloadavg()[0]:.1f})"]
    for name, (wall, rss, cpu) in results.items():
        cells.append(f"{name}: {wall:.2f} s ({wall / floor_wall:.2f}x floor), cpu {cpu:.1f} s, peak RSS {rss:.2f} GiB")
    if "mergekit" in results:
        fastest = min(wall for name, (wall, _, _) in results.items() if name.startswith("mergelab"))
        cells.append(f"mergekit/mergelab wall: {results['mergekit'][0] / fastest:.2f}x")
    return " | ".join(cells)


if __name__ == "__main__":
    main()
