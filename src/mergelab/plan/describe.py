"""``--print-plan``: a readable plan, per tensor group (same method parameters)."""

from __future__ import annotations

from typing import Any

from mergelab.checkpoint.dtypes import dtype_name
from mergelab.plan.data import MergePlan


def describe(plan: MergePlan) -> str:
    """A readable plan: per tensor group (same method parameters), which tensors and which values."""
    groups: dict[str, list[str]] = {}
    for job in plan.jobs:
        key = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        groups.setdefault(key, []).append(job.name)
    lines = [f"method: {plan.method.name} ({plan.method.citation})",
             f"base: {plan.recipe.base_model or '(none)'}; reference for shapes and config: {plan.reference}",
             f"output: {len(plan.jobs)} tensors, {plan.output_bytes / 1e9:.3f} GB as {dtype_name(plan.out_dtype)}"]
    for key, names in groups.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
        lines.append(f"- {key or '(no parameters)'}\n    {shown}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
