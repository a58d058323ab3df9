"""The ``mergelab moe`` config, in mergekit-moe's shape, validated strictly.

```yaml
base_model: path/to/base          # attention, norms, embeddings and head come from here
architecture: mixtral             # mixtral (default) | qwen2_moe (the default when shared_experts is given)
gate_mode: hidden                 # hidden | cheap_embed | random
dtype: bfloat16                   # optional; default the base's
experts_per_token: 2
experts:
  - source_model: path/to/expert_a
    positive_prompts: ["..."]     # required for hidden and cheap_embed
    negative_prompts: ["..."]     # optional
shared_experts:                   # qwen2_moe only: exactly one, always active
  - source_model: path/to/base
    residual_scale: 2.0           # optional factor on its down_proj (its sigmoid gate starts at 1/2)
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergelab.config import known_dtype
from mergelab.errors import RecipeError, closest
from mergelab.yaml_files import read_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertEntry(Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    residual_scale: float | None = None


class MoeConfig(Strict):
    base_model: str
    architecture: Literal["mixtral", "qwen2_moe"] | None = None
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    experts: list[ExpertEntry]
    shared_experts: list[ExpertEntry] | None = None
    seed: int = 0

    @property
    def output_architecture(self) -> str:
        return self.architecture or ("qwen2_moe" if self.shared_experts else "mixtral")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        return known_dtype(value)


def validate(config: MoeConfig, source: str) -> MoeConfig:
    """Checks that need more than one field: expert count, top-k, and prompts where the gate mode needs them."""
    n = len(config.experts)
    if n < 2:
        raise RecipeError(f"{source}: a mixture needs at least 2 experts, the config gives {n}")
    if not 1 <= config.experts_per_token <= n:
        raise RecipeError(f"{source}: experts_per_token is {config.experts_per_token} but must lie in 1..{n} "
                          "(the number of experts)")
    shared = config.shared_experts or []
    if config.output_architecture == "mixtral" and shared:
        raise RecipeError(f"{source}: Mixtral has no shared experts; remove shared_experts or set architecture: "
                          "qwen2_moe")
    if config.output_architecture == "qwen2_moe" and len(shared) != 1:
        raise RecipeError(f"{source}: architecture qwen2_moe needs exactly one entry under shared_experts (the "
                          f"always-active expert), the config gives {len(shared)}")
    if any(e.positive_prompts or e.negative_prompts for e in shared):
        raise RecipeError(f"{source}: shared_experts take no prompts (the shared expert is always active; its gate "
                          "starts at sigmoid(0) = 1/2, see residual_scale); remove them")
    for i, expert in enumerate(config.experts):
        if expert.residual_scale is not None:
            raise RecipeError(f"{source}: experts[{i}] sets residual_scale, which applies to shared_experts only")
    for i, expert in enumerate(config.experts):
        for key in ("positive_prompts", "negative_prompts"):
            prompts = getattr(expert, key)
            if prompts is not None and (not prompts or not all(p.strip() for p in prompts)):
                raise RecipeError(f"{source}: experts[{i}] ({expert.source_model}) has an empty {key} list or an "
                                  "empty prompt; give at least one non-empty prompt or remove the key")
        if config.gate_mode != "random" and not expert.positive_prompts:
            raise RecipeError(f"{source}: experts[{i}] ({expert.source_model}) has no positive_prompts, which "
                              f"gate_mode '{config.gate_mode}' needs; add prompts or use gate_mode: random")
    return config


def load_moe_config(path: str | Path) -> MoeConfig:
    """Read and validate a YAML MoE config; a problem raises ``RecipeError`` naming the key."""
    path = Path(path)
    data = read_yaml(path, "MoE config")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: an MoE config is a YAML mapping with 'base_model' and 'experts'")
    try:
        config = MoeConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            key = str(first["loc"][-1])
            owner = ExpertEntry if {"experts", "shared_experts"} & {str(p) for p in first["loc"]} else MoeConfig
            hint = closest(key, list(owner.model_fields))
            raise RecipeError(f"{path}: unknown key '{key}' at {loc}{hint}; remove or rename it") from None
        if first["type"] == "missing":
            raise RecipeError(f"{path}: required key '{loc}' is missing; add it") from None
        raise RecipeError(f"{path}: {loc}: {first['msg']}") from None
    return validate(config, str(path))
