"""Offline, reproducible model families to merge, evaluate and test on (see ``docs/ZOO.md`` and ``zoo.json``).

``build(family, size, members=None)`` builds (or reuses) a family, or only the named members and their
parents, and returns its folder; ``member(family, name, size)`` returns one member's Hugging Face folder;
``require(family, size, names)`` checks that members are built (and offers the command that builds them);
``families()`` lists what can be built. Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.zoo.builder import FamilyPlan, build_plan, default_root, stale_members, with_parents

# family -> (module with ``plan(size)``, the sizes it offers)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny-lm": ("mergelab.zoo.tinylm", ("test", "demo", "full")),
    "smollm2": ("mergelab.zoo.smollm2", ("test", "full")),
    "smollm2-arith": ("mergelab.zoo.smollm2_arith", ("test", "full")),
    "vision": ("mergelab.zoo.vision", ("test", "full")),
}


def families() -> list[str]:
    """Names of the families ``build`` knows."""
    return list(FAMILIES)


def sizes(family: str) -> tuple[str, ...]:
    """The sizes ``family`` can be built at; unknown names raise ``MergelabError`` listing valid ones."""
    if family not in FAMILIES:
        raise MergelabError(f"Unknown zoo family {family!r}; valid families are: {', '.join(FAMILIES)}.")
    return FAMILIES[family][1]


def family_plan(family: str, size: str) -> FamilyPlan:
    """The build plan of ``family`` at ``size``; unknown names raise ``MergelabError`` listing valid ones."""
    valid = sizes(family)
    if size not in valid:
        raise MergelabError(f"Unknown zoo size {size!r} for {family!r}; valid sizes are: {', '.join(valid)}.")
    return importlib.import_module(FAMILIES[family][0]).plan(size)


def family_dir(family: str, size: str, out: Path | None = None) -> Path:
    """Where ``family`` at ``size`` lives: ``out`` if given, else ``<zoo root>/<family>-<size>``."""
    return Path(out) if out is not None else default_root() / f"{family}-{size}"


def build(
    family: str,
    size: str = "test",
    device: str = "cpu",
    out: Path | None = None,
    progress: bool = True,
    members: list[str] | None = None,
    workers: int = 1,
) -> Path:
    """Build (or reuse from the cache) every member of ``family``, or only ``members`` and their parents,
    and return the family folder. ``workers`` > 1 builds independent members side by side in that many
    processes (the weights are the same whatever ``workers`` is)."""
    plan = family_plan(family, size)
    if workers < 1:
        raise MergelabError(f"workers must be at least 1, not {workers}.")
    if members is not None:
        with_parents(plan, members)  # unknown names fail before any device check or build
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MergelabError(f"Unknown device {device!r}; use 'cpu' or 'cuda'.")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergelabError(f"Device {device!r} was asked for but torch sees no CUDA device; use --device cpu.")
    return build_plan(plan, family_dir(family, size, out), device, progress, members, workers)


def member(family: str, name: str, size: str = "test", out: Path | None = None) -> Path:
    """The folder of member ``name`` of ``family`` (built first, with its parents, if needed)."""
    return build(family, size, out=out, members=[name]) / name


def require(family: str, size: str, names: list[str], build_missing: bool = False, device: str = "cpu",
            progress: bool = True) -> Path:
    """The family folder, after checking that ``names`` (and their parents) are built and current.

    Missing or stale members are built when ``build_missing``; otherwise a ``MergelabError`` gives the command
    that builds them."""
    folder = family_dir(family, size)
    missing = stale_members(family_plan(family, size), folder, names)
    if missing and not build_missing:
        raise MergelabError(
            f"The {family} zoo at size {size!r} lacks {', '.join(missing)} in {folder}; build them with "
            f"'mergelab zoo build {family} --size {size} --members {' '.join(names)}' or add --build-zoo."
        )
    if missing:
        build(family, size, device=device, members=names, progress=progress, workers=2)
    return folder
