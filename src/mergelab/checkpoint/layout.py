"""Tensor name -> (layer index, module kind), as data.

The Llama, Mistral, Qwen2, Qwen3 and Gemma families share Hugging Face's decoder naming
(``model.layers.N.self_attn.q_proj.weight``...); other models fall back to generic name patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Module kinds that the patterns below assign.
MODULE_KINDS = ("embedding", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm", "head",
                "other")


@dataclass(frozen=True)
class TensorInfo:
    """Which tensor a method is merging: its name, transformer layer (None outside the layer stack), kind."""

    name: str
    layer: int | None
    kind: str
    num_layers: int

    @property
    def is_matrix_in_layer(self) -> bool:
        """A 2-D projection inside the layer stack: what the SVD methods operate on."""
        return self.layer is not None and self.kind not in ("norm", "embedding", "head", "other")


DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")

# First match wins: (regex on the part of the name after the layer index, or on the whole name, kind).
KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(embed_tokens|wte|word_embeddings|tok_embeddings|embeddings?)\.weight$", "embedding"),
    (r"(^|\.)(lm_head|output|head|classifier)\.(weight|bias)$", "head"),
    (r"(q_proj|query|\.wq)\.", "attn_q"),
    (r"(k_proj|key|\.wk)\.", "attn_k"),
    (r"(v_proj|value|\.wv)\.", "attn_v"),
    (r"(o_proj|out_proj|attn\.c_proj|attention\.dense|\.wo)\.", "attn_o"),
    (r"(gate_proj|w1|gate_up_proj)\.", "mlp_gate"),
    (r"(up_proj|w3|c_fc|fc1|dense_h_to_4h)\.", "mlp_up"),
    (r"(down_proj|w2|mlp\.c_proj|fc2|dense_4h_to_h)\.", "mlp_down"),
    (r"(norm|ln_\d|ln_f|layernorm)", "norm"),
)
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def num_layers(config: dict[str, Any]) -> int:
    """Transformer layer count from a ``config.json`` dict (0 when the config does not say)."""
    cfg = config.get("text_config", config) if "num_hidden_layers" not in config else config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return 0


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to, or None for embeddings, final norm and head."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """The module kind of a tensor name (one of ``MODULE_KINDS``)."""
    for pattern, kind in KIND_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def tensor_info(name: str, config: dict[str, Any]) -> TensorInfo:
    """Everything a method may need to know about which tensor it merges."""
    return TensorInfo(name=name, layer=layer_index(name), kind=module_kind(name), num_layers=num_layers(config))


def rename_layer(name: str, new_index: int) -> str:
    """``name`` with its layer index replaced (used when slices renumber layers)."""
    return LAYER_PATTERN.sub(lambda m: m.group(0).replace(f".{m.group(1)}.", f".{new_index}."), name, count=1)
