"""Offline, reproducible model families to merge, evaluate and test on (see ``docs`` and ``zoo.json``).

``build(family, size)`` builds (or reuses) a family and returns its folder; ``member(family, name, size)``
returns one member's Hugging Face folder; ``families()`` lists what can be built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.zoo.builder import SIZES, FamilyPlan, build_plan, default_root


def _planners() -> dict[str, Callable[[str], FamilyPlan]]:
    from mergelab.zoo import smollm2, tinylm

    return {"tiny-lm": tinylm.plan, "smollm2": smollm2.plan}


def families() -> list[str]:
    """Names of the families ``build`` knows."""
    return list(_planners())


def family_plan(family: str, size: str) -> FamilyPlan:
    """The build plan of ``family`` at ``size``; unknown names raise ``MergelabError`` listing valid ones."""
    planners = _planners()
    if family not in planners:
        raise MergelabError(f"Unknown zoo family {family!r}; valid families are: {', '.join(planners)}.")
    if size not in SIZES:
        raise MergelabError(f"Unknown zoo size {size!r} for {family!r}; valid sizes are: {', '.join(SIZES)}.")
    return planners[family](size)


def family_dir(family: str, size: str, out: Path | None = None) -> Path:
    """Where ``family`` at ``size`` lives: ``out`` if given, else ``<zoo root>/<family>-<size>``."""
    return Path(out) if out is not None else default_root() / f"{family}-{size}"


def build(family: str, size: str = "test", device: str = "cpu", out: Path | None = None, progress: bool = True) -> Path:
    """Build (or reuse from the cache) every member of ``family`` and return the family folder."""
    plan = family_plan(family, size)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MergelabError(f"Unknown device {device!r}; use 'cpu' or 'cuda'.")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergelabError(f"Device {device!r} was asked for but torch sees no CUDA device; use --device cpu.")
    return build_plan(plan, family_dir(family, size, out), device, progress)


def member(family: str, name: str, size: str = "test", out: Path | None = None) -> Path:
    """The folder of member ``name`` of ``family`` (built first if needed)."""
    names = [m.name for m in family_plan(family, size).members]
    if name not in names:
        raise MergelabError(f"Family {family!r} has no member {name!r}; its members are: {', '.join(names)}.")
    return build(family, size, out=out) / name
