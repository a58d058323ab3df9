"""Assemble a sparse mixture of experts from a dense Llama/Mistral (or, for Qwen2-MoE, Qwen2) base and dense
experts of its shape.

Every layer's MLP becomes a sparse block of ``len(experts)`` experts with a router (``gates``); attention, norms,
embeddings and head come from the base. Two layouts (``LAYOUTS``), in the checkpoint names transformers loads:

- ``mixtral``: ``block_sparse_moe.experts.e.w1 / w3 / w2`` (expert ``e``'s ``gate_proj``, ``up_proj``,
  ``down_proj``) and ``block_sparse_moe.gate``; the top-k router weights are renormalised to sum to 1;
- ``qwen2_moe``: ``mlp.experts.e.{gate,up,down}_proj`` and ``mlp.gate`` (``norm_topk_prob``: renormalised as
  Mixtral's), plus one always-active ``mlp.shared_expert`` whose output is scaled by
  ``sigmoid(shared_expert_gate . h)``; that gate is written as zeros, so the shared expert adds half its output
  at every token, times its ``residual_scale`` (a factor on its ``down_proj``; 2 gives its full output).

Tensors are streamed one at a time into shards whose headers are planned up front, in ``OUT.partial`` renamed to
``OUT`` when complete; nothing is written before every input has been checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.dtypes import torch_dtype
from mergelab.checkpoint.layout import num_layers
from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.checkpoint.writer import OutputFolder, PlannedTensor, ShardWriter, plan_shards, shard_file_names
from mergelab.errors import CompatibilityError
from mergelab.moe import gates
from mergelab.moe.config import MoeConfig
from mergelab.one_shot_output import one_shot_output
from mergelab.output_files import TOKENIZER_FILES
from mergelab.plan.sources import resolve_model_path

MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its sparse block's tensors, and which dense bases it can be made from."""

    model_type: str
    architecture: str
    bases: tuple[str, ...]
    router: str  # format fields: layer
    expert: str  # layer, expert, part
    parts: dict[str, str]
    shared: str | None = None  # layer, part
    shared_gate: str | None = None  # layer


LAYOUTS = {
    "mixtral": Layout("mixtral", "MixtralForCausalLM", ("llama", "mistral"),
                      "model.layers.{layer}.block_sparse_moe.gate.weight",
                      "model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight",
                      {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen2_moe": Layout("qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"),
                        "model.layers.{layer}.mlp.gate.weight",
                        "model.layers.{layer}.mlp.experts.{expert}.{part}.weight",
                        {part: part for part in MLP_PARTS},
                        "model.layers.{layer}.mlp.shared_expert.{part}.weight",
                        "model.layers.{layer}.mlp.shared_expert_gate.weight"),
}


def check_base(base: ModelReader, layout: Layout) -> int:
    """The base's layer count, after checking that the layout can hold it (architecture, biases, gated MLPs)."""
    if base.model_type not in layout.bases:
        raise CompatibilityError(f"{base.folder}: model_type {base.model_type!r} cannot become a {layout.model_type} "
                                 f"MoE; use a {' or '.join(layout.bases)} base")
    for key in ("attention_bias", "mlp_bias"):
        if base.config.get(key):
            raise CompatibilityError(f"{base.folder}: config.json sets {key}, which {layout.model_type} does not have")
    layers = num_layers(base.config)
    for layer in range(layers):
        for part in MLP_PARTS:
            if not base.has(f"model.layers.{layer}.mlp.{part}.weight"):
                raise CompatibilityError(f"{base.folder}: tensor 'model.layers.{layer}.mlp.{part}.weight' is missing; "
                                         "the base needs gated MLPs in every layer")
    return layers


def check_experts(base: ModelReader, experts: dict[str, ModelReader]) -> None:
    """Every expert has the base's architecture and every base tensor at the base's shape."""
    for ref, expert in experts.items():
        if expert.model_type != base.model_type:
            raise CompatibilityError(f"expert {ref}: model_type {expert.model_type!r} differs from the base's "
                                     f"{base.model_type!r}; experts must be fine-tunes of the base")
        for name in base.names:
            if not expert.has(name):
                raise CompatibilityError(f"expert {ref}: tensor '{name}' of the base is missing; experts must "
                                         "be fine-tunes of the base")
            if expert.shape(name) != base.shape(name):
                raise CompatibilityError(f"expert {ref}: tensor '{name}' has shape {list(expert.shape(name))} but "
                                         f"the base has {list(base.shape(name))}; every expert must have the "
                                         "base's shapes")


def moe_config(base: ModelReader, layout: Layout, n_experts: int, top_k: int, dtype: torch.dtype) -> dict[str, Any]:
    """The base's config.json turned into the layout's: same dimensions, ``n_experts`` sparse MLPs per layer."""
    config = {k: v for k, v in base.config.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp",
                                                                 "architectures", "auto_map", "torch_dtype")}
    config.update(model_type=layout.model_type, architectures=[layout.architecture], num_experts_per_tok=top_k,
                  output_router_logits=False, router_aux_loss_coef=0.001, dtype=str(dtype).removeprefix("torch."))
    if layout.model_type == "mixtral":
        config.update(num_local_experts=n_experts, router_jitter_noise=0.0, sliding_window=None)
    else:
        config.update(num_experts=n_experts, moe_intermediate_size=config["intermediate_size"],
                      shared_expert_intermediate_size=config["intermediate_size"], decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=False,
                      qkv_bias=base.has("model.layers.0.self_attn.q_proj.bias"))
    return config


def router_rows(config: MoeConfig, base_folder: Path, base: ModelReader, layers: int) -> torch.Tensor:
    """``[layers, experts, hidden]`` router rows for the config's gate mode (see ``gates``)."""
    hidden = base.shape("model.embed_tokens.weight")[1]
    if config.gate_mode == "random":
        return gates.random_rows(layers, len(config.experts), hidden, config.seed)
    positive = [e.positive_prompts for e in config.experts]
    negative = [e.negative_prompts for e in config.experts]
    sets = positive + [n for n in negative if n]
    if config.gate_mode == "hidden":
        means = gates.hidden_means(base_folder, sets, layers)
    else:
        means = gates.embed_means(base_folder, base, sets, layers, base.config.get("rms_norm_eps", 1e-6))
    found = iter(means[len(positive):])
    return gates.discriminant_rows(means[: len(positive)], [next(found) if n else None for n in negative])


def output_tensors(base: ModelReader, experts: list[ModelReader], rows: torch.Tensor, layout: Layout,
                   shared: ModelReader | None = None, residual_scale: float | None = None):
    """``(name, shape, read)`` for every output tensor in write order; ``read()`` loads it."""
    for name in base.names:
        match = MLP_TENSOR.match(name)
        if match is None:
            yield name, base.shape(name), lambda name=name: base.get(name)
            continue
        layer, part = int(match.group(1)), match.group(2)
        if part == MLP_PARTS[0]:
            yield layout.router.format(layer=layer), tuple(rows[layer].shape), lambda layer=layer: rows[layer]
            if layout.shared_gate is not None:
                hidden = rows.shape[-1]
                yield layout.shared_gate.format(layer=layer), (1, hidden), lambda hidden=hidden: torch.zeros(1, hidden)
        for e, expert in enumerate(experts):
            yield (layout.expert.format(layer=layer, expert=e, part=layout.parts[part]), base.shape(name),
                   lambda expert=expert, name=name: expert.get(name))
        if shared is not None:
            factor = residual_scale if part == "down_proj" and residual_scale is not None else None
            yield (layout.shared.format(layer=layer, part=part), base.shape(name),
                   lambda name=name, factor=factor: shared.get(name) if factor is None
                   else shared.get(name).float() * factor)


def assemble_moe(config: MoeConfig, out: str | Path, config_dir: Path | None = None, *, overwrite: bool = False,
                 shard_size: int = 5 * 10**9, progress: bool = True) -> Path:
    """Write the MoE model of ``config`` to ``out``; bad input raises ``MergelabError`` and writes nothing."""
    from tqdm import tqdm

    layout = LAYOUTS[config.output_architecture]
    base_folder = Path(resolve_model_path(config.base_model, config_dir))
    base = open_model(base_folder)
    entries = [*config.experts, *(config.shared_experts or [])]
    experts = {e.source_model: open_model(resolve_model_path(e.source_model, config_dir)) for e in entries}
    try:
        layers = check_base(base, layout)
        check_experts(base, experts)
        floats = [base.dtype(n) for n in base.names if base.dtype(n).is_floating_point]
        dtype = torch_dtype(config.dtype) if config.dtype else floats[0]
        rows = router_rows(config, base_folder, base, layers)
        readers = [experts[e.source_model] for e in config.experts]
        shared = config.shared_experts[0] if config.shared_experts else None
        tensors = list(output_tensors(base, readers, rows, layout, shared and experts[shared.source_model],
                                      shared and shared.residual_scale))
        planned = [PlannedTensor(name, tuple(shape), dtype) for name, shape, _ in tensors]
        shards = plan_shards(planned, shard_size)
        names = shard_file_names(len(shards))
        output = one_shot_output(Path(out), [base.folder, *(r.folder for r in readers)], overwrite)
        try:
            reads = iter(tensors)
            bar = tqdm(total=len(tensors), unit="tensor", desc="assembling", disable=not progress)
            for shard_name, shard in zip(names, shards):
                writer = ShardWriter(output.partial / shard_name, shard)
                try:
                    for planned_tensor in shard:
                        name, _, read = next(reads)
                        tensor = read()
                        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                            raise CompatibilityError(f"tensor for '{name}' contains NaN or Inf; repair its model")
                        writer.add(name, tensor.to(planned_tensor.dtype))
                        bar.update(1)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
            bar.close()
            _write_metadata(output, config, base, layout, planned, shards, names, dtype, layers)
        except BaseException:
            output.discard()
            raise
        return output.finish()
    finally:
        for reader in [base, *experts.values()]:
            reader.close()


def _write_metadata(output: OutputFolder, config: MoeConfig, base: ModelReader, layout: Layout,
                    planned: list[PlannedTensor], shards: list[list[PlannedTensor]], names: list[str],
                    dtype: torch.dtype, layers: int) -> None:
    """config.json (the layout's), the index when sharded, the base's tokenizer and generation config, moe.json."""
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.name: names[i] for i, shard in enumerate(shards) for t in shard}}
        output.write_text("model.safetensors.index.json", json.dumps(index, indent=2))
    output.write_text("config.json", json.dumps(moe_config(base, layout, len(config.experts),
                                                            config.experts_per_token, dtype), indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (base.folder / name).exists():
            output.copy_in(base.folder / name)
    output.write_text("moe.json", json.dumps({"config": config.model_dump(mode="json"), "layers": layers,
                                              "experts": [e.source_model for e in config.experts]}, indent=1))
