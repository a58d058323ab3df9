"""``mergelab check RECIPE``: what a merge would do and whether it would run, without writing anything.

Reports architecture, tensor-set and shape compatibility (by planning the merge), tokenizer and vocabulary
differences, input dtypes, expected output size and peak memory, the parameters each tensor group receives, and
the task-vector norms and pairwise cosines per layer group ([InTheWild] Appendix D: nearly
orthogonal task vectors cancel under averaging, aligned ones add up).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.dtypes import dtype_name
from mergelab.checkpoint.reader import ModelReader
from mergelab.config import Recipe
from mergelab.errors import MergelabError
from mergelab.plan.build import build_plan
from mergelab.plan.data import MergePlan
from mergelab.plan.describe import describe
from mergelab.stream.options import MergeOptions
from mergelab.stream.schedule import execution


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan_text: str = ""
    similarity: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def tokenizer_summary(folder: Path) -> dict[str, Any]:
    """Vocabulary size and added tokens of a model folder's tokenizer, if it has one."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab", {})
    added = [t["content"] for t in data.get("added_tokens", [])]
    return {"vocab": len(vocab) if isinstance(vocab, (dict, list)) else 0, "added": added}


def tokenizer_notes(readers: dict[str, ModelReader], reference: str) -> list[str]:
    """Differences in embedding rows and tokenizers against the reference model, with what the merge does."""
    notes = []
    ref = readers[reference]
    ref_rows = ref.config.get("vocab_size")
    ref_tok = tokenizer_summary(ref.folder)
    for name, reader in readers.items():
        if name == reference:
            continue
        rows = reader.config.get("vocab_size")
        if rows != ref_rows:
            action = ("rows beyond the base's are dropped (or refused with --strict)" if (rows or 0) > (ref_rows or 0)
                      else "the merge is refused: give the smaller-vocabulary model as the base")
            notes.append(f"{name}: vocab_size {rows} vs {ref_rows} in {reference}; {action}")
        tok = tokenizer_summary(reader.folder)
        if tok and ref_tok and (tok["vocab"] != ref_tok["vocab"] or tok["added"] != ref_tok["added"]):
            extra = sorted(set(tok["added"]) - set(ref_tok["added"]))
            notes.append(f"{name}: tokenizer differs from {reference} (vocab {tok['vocab']} vs {ref_tok['vocab']}; "
                         f"added tokens only here: {extra[:8]}); the output takes the tokenizer_source's tokenizer")
    return notes


def task_vector_similarity(plan: MergePlan) -> dict[str, Any]:
    """Per layer group: each expert's task-vector norm and the pairwise cosines (streamed, float64 sums)."""
    if not plan.jobs or plan.jobs[0].base is None:
        return {}
    n = len(plan.jobs[0].experts)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(n, n, dtype=torch.float64))
    for job in plan.jobs:
        group = f"layer.{job.info.layer}" if job.info.layer is not None else "outside_layers"
        base = plan.readers[job.base.model].get(job.base.name).double()
        deltas = []
        for source in job.experts:
            deltas.append((source.read(plan.readers).double() - base).reshape(-1))
        stacked = torch.stack(deltas)
        sums[group] += stacked @ stacked.T
        sums["all"] += stacked @ stacked.T
    names = [s.model for s in plan.jobs[0].experts]
    result = {}
    for group, gram in sums.items():
        norms = gram.diagonal().sqrt()
        cos = gram / torch.outer(norms, norms).clamp_min(1e-30)
        result[group] = {"norm": dict(zip(names, norms.tolist())), "cosine": cos.tolist()}
    result["experts"] = names
    return result


def peak_memory_bytes(plan: MergePlan, options: MergeOptions | None = None) -> int:
    """What the engine holds at once beyond the interpreter, for the largest piece it computes (an estimate, not a
    bound): the inputs, in their storage dtypes, of ``read_ahead + 1`` pieces being read and of the pieces being
    computed (one per compute lane); each lane's work copies in the compute dtype (cache-sized tiles where the job
    is tiled, the whole piece otherwise, one per input plus one; a method's own workspace, such as an SVD's, is
    not counted); the outputs being computed, queued for the writer (two) and being written (one). A piece is a
    row block where the engine streams the tensor, else the whole tensor: the job's ``stream.schedule.execution``,
    as the engine runs it."""
    options = options or MergeOptions()
    work_size = 8 if options.float64 else 4
    out_size = torch.tensor([], dtype=plan.out_dtype).element_size()
    peak = 0
    for job in plan.jobs:
        shape = job.shape or (1,)
        run = execution(plan.method, job, options)
        tiled, lanes, blocks = run.tiled, run.lanes, run.blocks
        rows = shape[0] if blocks is None else max(stop - start for start, stop in blocks)
        numel = rows * torch.Size(shape[1:]).numel()
        sources = job.sources
        input_bytes = numel * sum(torch.tensor([], dtype=plan.readers[s.model].dtype(s.name)).element_size()
                                  for s in sources)
        work = (min(numel, options.tile_elements) if tiled else numel) * work_size * (len(sources) + 1)
        held = input_bytes * (options.read_ahead + 1 + lanes) + work * lanes + numel * out_size * (lanes + 3)
        peak = max(peak, held)
    return peak


def fisher_pass_bytes(plan: MergePlan) -> int:
    """What the Fisher pass (``fisher_units``) holds at once beyond the interpreter (an estimate): three float32
    copies (the weights, one sequence's gradients, the accumulator) of the largest unit it reads, a decoder layer
    or a tensor outside the layers (a tied embedding and head count once: the same tensor)."""
    units: dict[tuple[str, Any], int] = {}
    for job in plan.jobs:
        key = ("layer", job.info.layer) if job.info.layer is not None else ("tensor", job.name)
        units[key] = units.get(key, 0) + torch.Size(job.shape).numel() * 4
    return 3 * max(units.values(), default=0)


def check(recipe: Recipe, readers: dict[str, ModelReader], *, strict: bool = False, allow_mixed: bool = False,
          similarity: bool = True) -> CheckReport:
    report = CheckReport()
    for name, reader in readers.items():
        dtypes = sorted({dtype_name(reader.dtype(t)) for t in reader.names})
        report.notes.append(f"{name}: {reader.model_type or 'unknown model_type'}, {len(reader.names)} tensors, "
                            f"dtype {', '.join(dtypes)}")
    try:
        plan = build_plan(recipe, readers, strict=strict, allow_mixed=allow_mixed)
    except MergelabError as error:
        report.problems.append(str(error))
        return report
    report.notes += tokenizer_notes(readers, plan.reference)
    report.notes += [f"warning: {w}" for w in plan.warnings]
    report.notes.append(f"expected output size {plan.output_bytes / 1e9:.3f} GB; expected peak memory about "
                        f"{peak_memory_bytes(plan) / 1e9:.3f} GB beyond the interpreter and libraries")
    fisher_input = plan.method.fisher_of(plan.jobs[0].params) if plan.method.fisher_of and plan.jobs else None
    if fisher_input is not None:
        model = recipe.base_model if fisher_input == "base" else plan.reference
        report.notes.append(f"the diagonal Fisher of {model} runs first, unit by unit, holding about "
                            f"{fisher_pass_bytes(plan) / 1e9:.3f} GB at once (once per model and settings; later "
                            "merges read it from the cache)")
    report.plan_text = describe(plan)
    if similarity:
        report.similarity = task_vector_similarity(plan)
    return report


def format_report(report: CheckReport) -> str:
    lines = ["mergelab check: the merge would " + ("run" if report.ok else "NOT run")]
    lines += [f"problem: {p}" for p in report.problems]
    lines += [f"- {n}" for n in report.notes]
    if report.plan_text:
        lines += ["", "plan:", report.plan_text]
    sim = report.similarity
    if sim:
        names = sim["experts"]
        lines += ["", "task vectors per layer group (norm of each expert; pairwise cosine):"]
        for group, values in sim.items():
            if group == "experts":
                continue
            norms = " ".join(f"{values['norm'][n]:.3g}" for n in names)
            cos = values["cosine"]
            pairs = " ".join(f"{cos[i][j]:+.3f}" for i in range(len(names)) for j in range(i + 1, len(names)))
            lines.append(f"  {group:>16}: norms {norms}; cosines {pairs or '-'}")
    return "\n".join(lines)
