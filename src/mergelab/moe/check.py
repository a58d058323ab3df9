"""``mergelab check MOE_CONFIG``: whether ``mergelab moe`` would run on a config and what it would write,
without computing the router (no forward pass) or writing anything."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from mergelab.check import CheckReport
from mergelab.errors import MergelabError


def is_moe_config(path: str | Path) -> bool:
    """A YAML file in mergekit-moe's shape (``experts`` and no ``merge_method``) rather than a merge recipe."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def check_moe(path: str | Path) -> CheckReport:
    """Validate the config, open the base and experts and check their shapes; report the output's layout."""
    from mergelab.checkpoint.dtypes import torch_dtype
    from mergelab.checkpoint.reader import open_model
    from mergelab.moe.assemble import LAYOUTS, check_base, check_experts, output_tensors
    from mergelab.moe.config import load_moe_config
    from mergelab.plan.sources import resolve_model_path

    report = CheckReport()
    readers = {}
    try:
        config = load_moe_config(path)
        layout = LAYOUTS[config.output_architecture]
        folder = Path(path).parent
        base = readers[config.base_model] = open_model(resolve_model_path(config.base_model, folder))
        entries = [*config.experts, *(config.shared_experts or [])]
        for expert in entries:
            readers[expert.source_model] = open_model(resolve_model_path(expert.source_model, folder))
        layers = check_base(base, layout)
        check_experts(base, {e.source_model: readers[e.source_model] for e in entries})
        n = len(config.experts)
        shared = readers[config.shared_experts[0].source_model] if config.shared_experts else None
        rows = torch.empty(layers, n, base.shape("model.embed_tokens.weight")[1])
        total = sum(torch.Size(shape).numel() for _, shape, _ in output_tensors(
            base, [readers[e.source_model] for e in config.experts], rows, layout, shared))
    except MergelabError as error:
        report.problems.append(str(error))
        return report
    finally:
        for reader in readers.values():
            reader.close()
    dtype = torch_dtype(config.dtype) if config.dtype else next(
        base.dtype(t) for t in base.names if base.dtype(t).is_floating_point)
    size = total * torch.tensor([], dtype=dtype).element_size()
    report.notes.append(f"{layout.model_type} output: {layers} layers x {n} experts"
                        f"{' + 1 shared' if shared else ''}, {config.experts_per_token} per token, gate_mode "
                        f"{config.gate_mode}; {total / 1e6:.1f} M parameters, {size / 1e9:.3f} GB as "
                        f"{str(dtype).removeprefix('torch.')}")
    for i, expert in enumerate(config.experts):
        report.notes.append(f"expert {i}: {expert.source_model} ({len(expert.positive_prompts or [])} positive, "
                            f"{len(expert.negative_prompts or [])} negative prompts)")
    if config.gate_mode != "random" and not (base.folder / "tokenizer.json").exists() and not (
            base.folder / "tokenizer_config.json").exists():
        report.problems.append(f"{base.folder} has no tokenizer, which gate_mode '{config.gate_mode}' needs to read "
                               "the prompts; add tokenizer files or use gate_mode: random")
    return report
