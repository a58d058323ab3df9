"""mergelab moe: a Mixtral model from tiny-lm zoo experts loads in transformers and generates; its routers (read
through transformers' own Mixtral router logits) send an expert's own prompts to that expert; bad configs are
refused with nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergelab import zoo
from mergelab.cli import main
from mergelab.tasks import TASKS

SKILLS = ("addition", "reverse", "upper")


@pytest.fixture(scope="module")
def family():
    return zoo.build("tiny-lm", "test", members=["base", *SKILLS], progress=False)


def _prompts(task: str, split: str, n: int) -> list[str]:
    return [e.prompt for e in TASKS[task].examples(split, n)]


def _config(path, family, gate_mode):
    config = {"base_model": str(family / "base"), "gate_mode": gate_mode, "experts_per_token": 2,
              "experts": [{"source_model": str(family / s), "positive_prompts": _prompts(s, "train", 12)}
                          for s in SKILLS]}
    path.write_text(yaml.safe_dump(config))
    return path


def _top1_share(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Share of routing decisions (tokens x layers) that pick each expert first, from the model's router logits."""
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    counts = torch.zeros(experts)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids, output_router_logits=True).router_logits
        for layer_logits in logits:
            counts += torch.bincount(layer_logits.argmax(-1), minlength=counts.numel())
    return counts / counts.sum()


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_output_loads_in_transformers_and_generates(family, tmp_path, gate_mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    out = tmp_path / "moe"
    assert main(["moe", str(_config(tmp_path / "moe.yml", family, gate_mode)), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, MixtralForCausalLM) and model.config.num_local_experts == len(SKILLS)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Add: 12 + 30 =", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_hidden_routing_prefers_each_experts_own_prompts(family, tmp_path):
    """Measured on held-out prompts through transformers' router logits. (cheap_embed is not held to this: it
    sees token identities only, and on these prompts, which share words and digits, it routed at about chance.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    assert main(["moe", str(_config(tmp_path / "moe.yml", family, "hidden")), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for e, skill in enumerate(SKILLS):
        share = _top1_share(model, tokenizer, _prompts(skill, "test", 8))  # held-out prompts of the same skill
        assert int(share.argmax()) == e, (skill, share)
        assert share[e] > 1 / len(SKILLS) + 0.1, (skill, share)  # well above chance


def test_experts_and_base_tensors_are_copied_exactly(family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moe"
    assert main(["moe", str(_config(tmp_path / "moe.yml", family, "random")), str(out)]) == 0
    written = load_file(out / "model.safetensors")
    base = load_file(family / "base" / "model.safetensors")
    for e, skill in enumerate(SKILLS):
        expert = load_file(family / skill / "model.safetensors")
        for part, short in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            assert torch.equal(written[f"model.layers.1.block_sparse_moe.experts.{e}.{short}.weight"],
                               expert[f"model.layers.1.mlp.{part}.weight"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(written[name], base[name])
    # transformers' loader turns the per-expert tensors into its fused layout: the first expert's gate rows
    model = AutoModelForCausalLM.from_pretrained(out)
    fused = model.model.layers[1].mlp.experts.gate_up_proj[0]
    first = load_file(family / SKILLS[0] / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(fused[: first.shape[0]], first)


def test_bad_configs_are_refused_and_nothing_written(family, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(family / SKILLS[1], odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    config = yaml.safe_load(_config(tmp_path / "ok.yml", family, "hidden").read_text())
    config["experts"][1]["source_model"] = str(odd)
    (tmp_path / "odd.yml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "odd.yml"), str(tmp_path / "out1")]) == 2
    assert "tensor 'model.layers.0.mlp.up_proj.weight' has shape" in capsys.readouterr().err

    config = yaml.safe_load(_config(tmp_path / "ok.yml", family, "hidden").read_text())
    config["experts"][2]["positive_prompts"] = []
    (tmp_path / "empty.yml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "empty.yml"), str(tmp_path / "out2")]) == 2
    assert "experts[2]" in capsys.readouterr().err
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_check_reports_an_moe_config_without_writing(family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path / "moe.yml", family, "hidden")
    assert main(["check", str(config)]) == 0
    text = capsys.readouterr().out
    assert "the MoE assembly would run" in text and "mixtral output: 2 layers x 3 experts, 2 per token" in text
    assert main(["moe", str(config), str(tmp_path / "moe")]) == 0
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "moe").parameters())
    assert f"{params / 1e6:.1f} M parameters" in capsys.readouterr().out + text
    broken = yaml.safe_load(config.read_text())
    broken["experts"][0]["positive_prompts"] = []
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(broken))
    assert main(["check", str(tmp_path / "bad.yml")]) == 1
    assert "NOT run" in capsys.readouterr().out


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
def test_experts_equal_to_the_base_reproduce_the_base(family, tmp_path, architecture):
    """Router weights of the top-k experts sum to 1, so a mixture of copies of the base MLP is the base MLP: the
    MoE's logits equal the dense base's (a check of the whole layout and config; qwen2_moe's shared expert is
    scaled to zero)."""
    from transformers import AutoModelForCausalLM

    config = {"base_model": str(family / "base"), "gate_mode": "random", "architecture": architecture,
              "experts": [{"source_model": str(family / "base")}] * 3}
    if architecture == "qwen2_moe":
        config["shared_experts"] = [{"source_model": str(family / SKILLS[0]), "residual_scale": 0.0}]
    (tmp_path / "same.yml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "same.yml"), str(tmp_path / "moe")]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert moe.config.model_type == architecture
    dense = AutoModelForCausalLM.from_pretrained(family / "base").eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_qwen2_moe_routes_and_keeps_the_shared_expert(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM

    config = yaml.safe_load(_config(tmp_path / "moe.yml", family, "hidden").read_text())
    config["shared_experts"] = [{"source_model": str(family / "base"), "residual_scale": 2.0}]
    (tmp_path / "qwen.yml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "qwen.yml"), str(tmp_path / "moe")]) == 0
    written = load_file(tmp_path / "moe" / "model.safetensors")
    base = load_file(family / "base" / "model.safetensors")
    torch.testing.assert_close(written["model.layers.0.mlp.shared_expert.down_proj.weight"],
                               2.0 * base["model.layers.0.mlp.down_proj.weight"])
    assert not written["model.layers.0.mlp.shared_expert_gate.weight"].any()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert isinstance(model, Qwen2MoeForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    for e, skill in enumerate(SKILLS):
        assert int(_top1_share(model, tokenizer, _prompts(skill, "test", 8)).argmax()) == e
    config["architecture"] = "mixtral"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "bad.yml"), str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_negative_prompts_steer_an_expert_away(family, tmp_path):
    """Expert 0 given expert 1's prompts as negatives gets a lower router logit on held-out prompts of that skill
    (layer 0, where the MoE's router input is exactly the base's), and still wins on its own prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logits = {}
    for label in ("plain", "negative"):
        config = yaml.safe_load(_config(tmp_path / f"{label}.yml", family, "hidden").read_text())
        if label == "negative":
            config["experts"][0]["negative_prompts"] = _prompts(SKILLS[1], "train", 12)
        (tmp_path / f"{label}.yml").write_text(yaml.safe_dump(config))
        assert main(["moe", str(tmp_path / f"{label}.yml"), str(tmp_path / label)]) == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / label).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / label)
        ids = tokenizer(" ".join(_prompts(SKILLS[1], "test", 8)), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits[label] = model(ids, output_router_logits=True).router_logits[0][:, 0].mean()
        assert int(_top1_share(model, tokenizer, _prompts(SKILLS[0], "test", 8)).argmax()) == 0
    assert logits["negative"] < logits["plain"], logits
