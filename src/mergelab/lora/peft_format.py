"""peft's on-disk LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names are those peft's ``save_pretrained`` writes for a causal LM (``get_peft_model_state_dict``): the
module's name in the base model prefixed with ``base_model.model.``, then ``lora_A.weight`` / ``lora_B.weight``
for a linear layer, ``lora_embedding_A`` / ``lora_embedding_B`` for an embedding, ``lora_magnitude_vector``
for DoRA, and the module's own tensor names for ``modules_to_save`` and saved embedding layers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def is_adapter_folder(path: Path) -> bool:
    """A folder holding a peft adapter (``adapter_config.json``) rather than a full model."""
    return (path / CONFIG_FILE).is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter, checked to be one mergelab can apply."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON; fix or re-download the adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LoRA adapters "
                              "(with rsLoRA or DoRA) can be merged")
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; re-save the adapter with "
                              "safetensors (peft's default)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{path}: '{key}' must be a positive number, not {config.get(key)!r}")
    return config


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule: the first key that matches the end of the module name
    as a regex (``(.*\\.)?(KEY)$``), else ``default`` (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: dict[str, Any], module: str) -> float:
    """The factor on ``B @ A`` for one module: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023), with the module's own r and alpha from ``rank_pattern`` / ``alpha_pattern``."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
