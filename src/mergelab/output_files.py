"""Everything in a merged folder besides the weights: index, config, tokenizer, model card, ``mergelab.json``."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from mergelab.chat_templates import resolve_chat_template
from mergelab.checkpoint.dtypes import dtype_name
from mergelab.checkpoint.writer import OutputFolder
from mergelab.config import dump_recipe
from mergelab.hub_cache import hub_id
from mergelab.output_guard import TOKENIZER_FILES
from mergelab.plan.data import MergePlan
from mergelab.tokenizer_merge import output_vocabulary

PACKAGES = ("mergelab", "torch", "safetensors", "transformers", "numpy")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def per_layer(tensor_stats: dict[str, dict[str, Any]], plan: MergePlan) -> dict[str, dict[str, float]]:
    """Element-weighted means of the per-tensor fractions and method statistics, per layer (tensors outside the
    layer stack under 'outside_layers')."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for job in plan.jobs:
        stats = tensor_stats.get(job.name)
        if stats is None:  # re-used from a resumed shard
            continue
        key = f"layer.{job.info.layer}" if job.info.layer is not None else "outside_layers"
        n = stats["numel"]
        sums[key]["numel"] += n
        if "changed_from_base" in stats:
            sums[key]["changed_from_base"] += stats["changed_from_base"] * n
        for model, frac in stats["equal_to"].items():
            sums[key][f"equal_to:{model}"] += frac * n
        for name, value in stats.items():  # a method's own figures, element-weighted
            if name not in ("numel", "equal_to", "changed_from_base") and isinstance(value, (int, float)):
                sums[key][f"mean:{name}"] += value * n
    return {key: {k: (v if k == "numel" else v / s["numel"]) for k, v in s.items()} for key, s in sums.items()}


def model_card(plan: MergePlan) -> ModelCard:
    """A Hugging Face model card: metadata with the inputs' Hub ids (where known), library, tags and the recipe;
    a body naming the method and the recipe as YAML."""
    bases = [hub_id(ref, reader.folder) or ref for ref, reader in plan.readers.items()]
    data = ModelCardData(base_model=bases, library_name="transformers", tags=["merge", "mergelab"],
                         mergelab_recipe=plan.recipe.model_dump(mode="json", exclude_none=True))
    body = (f"# Merged model\n\nMade with mergelab using **{plan.method.name}** ({plan.method.citation}).\n\n"
            f"Base: {plan.recipe.base_model or '(none)'}\n\nModels: {', '.join(bases)}\n\n"
            f"Recipe:\n\n```yaml\n{dump_recipe(plan.recipe)}```\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_files(plan: MergePlan, output: OutputFolder) -> None:
    """Write what makes the folder loadable: index (when sharded), config, tokenizer, generation config."""
    layout = plan.layout
    if len(layout.shards) > 1:
        index = {"metadata": {"total_size": plan.output_bytes},
                 "weight_map": {t.name: layout.names[i] for i, shard in enumerate(layout.shards) for t in shard}}
        output.write_text("model.safetensors.index.json", json.dumps(index, indent=2))
    config = dict(plan.config)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name(plan.out_dtype)
    output.write_text("config.json", json.dumps(config, indent=2))
    reference = plan.readers[plan.reference].folder
    write_tokenizer(plan, output)
    if (reference / "generation_config.json").exists():
        output.copy_in(reference / "generation_config.json")


def write_tokenizer(plan: MergePlan, output: OutputFolder) -> None:
    """The output tokenizer: the merged vocabulary's (saved by transformers, added tokens included) or the
    source folder's files; a recipe's chat template goes into its ``tokenizer_config.json`` (into
    ``chat_template.jinja`` when there is none), replacing the template files of the source."""
    template = resolve_chat_template(plan.recipe.chat_template, [r.folder for r in plan.readers.values()])
    vocabulary = output_vocabulary(plan.readers)
    with tempfile.TemporaryDirectory(prefix="mergelab-tokenizer-") as staging:
        folder = Path(staging)
        if vocabulary is not None:
            vocabulary.tokenizer.save_pretrained(folder)
        else:
            for name in TOKENIZER_FILES:
                if (plan.tokenizer_folder / name).exists():
                    shutil.copy2(plan.tokenizer_folder / name, folder / name)
        config_path = folder / "tokenizer_config.json"
        if template is not None:
            for name in ("chat_template.jinja", "chat_template.json"):
                (folder / name).unlink(missing_ok=True)
            if config_path.exists():
                config = json.loads(config_path.read_text())
                config["chat_template"] = template
                config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
            else:
                (folder / "chat_template.jinja").write_text(template)
        for path in sorted(folder.iterdir()):
            output.copy_in(path)


def write_record(plan: MergePlan, output: OutputFolder, tensor_stats: dict[str, dict[str, Any]], seed: int,
                 passes: dict[str, dict[str, Any]]) -> None:
    """Write the model card and ``mergelab.json`` (with the records of the method's model-level passes)."""
    output.write_text("README.md", str(model_card(plan)))
    record = {
        "mergelab_version": _versions().get("mergelab"),
        "versions": _versions(),
        "recipe": plan.recipe.model_dump(mode="json"),
        "method": {"name": plan.method.name, "citation": plan.method.citation},
        "seed": seed,
        "out_dtype": dtype_name(plan.out_dtype),
        "inputs": {ref: {"folder": str(r.folder), "files": r.fingerprint} for ref, r in plan.readers.items()},
        "warnings": plan.warnings,
        "per_layer": per_layer(tensor_stats, plan),
        "tensors": tensor_stats,
        **passes,
    }
    output.write_text("mergelab.json", json.dumps(record, indent=1))
