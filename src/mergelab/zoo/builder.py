"""Cached, resumable, atomic building of a model family: a list of members, each a folder made by a function.

A member's cache key hashes the zoo's code version, the family settings, the member's own settings and its
parent's key, so a changed recipe rebuilds exactly what it changes. Each member is written to
``NAME.partial`` and renamed to ``NAME`` only when complete (with ``zoo_member.json`` inside), so a killed or
failed build leaves finished members (reused by the next call) and never a half-written folder named ``NAME``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mergelab
from mergelab.errors import MergelabError

MEMBER_RECORD = "zoo_member.json"
FAMILY_RECORD = "zoo.json"
SIZES = ("test", "full")

# make(out_dir, built_members, device) -> record of what was done (data, steps, hyper-parameters, scores)
MakeFn = Callable[[Path, dict[str, Path], str], dict[str, Any]]


@dataclass(frozen=True)
class Member:
    """One model of a family: its parent (a member built before it, or None), what determines its weights."""

    name: str
    parent: str | None
    settings: dict[str, Any]
    make: MakeFn = field(repr=False, compare=False)


@dataclass(frozen=True)
class FamilyPlan:
    """Everything a family build needs: shared settings, members in build order, scenarios and licences."""

    family: str
    size: str
    settings: dict[str, Any]
    members: list[Member]
    scenarios: dict[str, list[str]]
    licences: dict[str, str]
    sources: tuple[Path, ...]  # the modules whose code determines the members' weights


def default_root() -> Path:
    """``$MERGELAB_ZOO`` if set, else ``~/.cache/mergelab/zoo``."""
    return Path(os.environ.get("MERGELAB_ZOO") or Path.home() / ".cache" / "mergelab" / "zoo")


def code_version(plan: FamilyPlan) -> str:
    """Hash of the source that makes members (builder, tasks, the family's modules); a change rebuilds."""
    here = Path(__file__).parent
    digest = hashlib.sha256(mergelab.__version__.encode())
    for file in [here / "builder.py", here.parent / "tasks.py", *plan.sources]:
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def member_keys(plan: FamilyPlan) -> dict[str, str]:
    """The cache key of every member, chained through parents."""
    keys: dict[str, str] = {}
    version = code_version(plan)
    for member in plan.members:
        parent_key = keys[member.parent] if member.parent else None
        keys[member.name] = _key(version, plan.family, plan.size, plan.settings, member.settings, parent_key)
    return keys


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _disk_usage(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_plan(plan: FamilyPlan, folder: Path, device: str, progress: bool = True) -> Path:
    """Build (or reuse) every member of ``plan`` under ``folder``; write ``zoo.json``; return ``folder``."""
    keys = member_keys(plan)
    family_key = _key(keys)
    record = _read_json(folder / FAMILY_RECORD)
    if record and record.get("key") == family_key and all((folder / m.name).is_dir() for m in plan.members):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for member in tqdm(plan.members, desc=f"zoo {plan.family} ({plan.size})", disable=not progress):
        target = folder / member.name
        done = _read_json(target / MEMBER_RECORD)
        if not (done and done.get("key") == keys[member.name]):
            done = _build_member(member, keys[member.name], target, paths, device)
        records[member.name] = done
        paths[member.name] = target
    record = {
        "family": plan.family,
        "size": plan.size,
        "key": family_key,
        "code_version": code_version(plan),
        "settings": plan.settings,
        "scenarios": plan.scenarios,
        "licences": plan.licences,
        "build_seconds_this_call": round(time.perf_counter() - started, 2),
        "build_seconds_total": round(sum(r["build_seconds"] for r in records.values()), 2),
        "disk_bytes": _disk_usage(folder),
        "members": records,
    }
    _write_json_atomic(folder / FAMILY_RECORD, record)
    return folder


def _build_member(member: Member, key: str, target: Path, built: dict[str, Path], device: str) -> dict[str, Any]:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with _deterministic():
            details = member.make(partial, built, device)
        record = {
            "name": member.name,
            "key": key,
            "parent": member.parent,
            "settings": member.settings,
            **details,
            "build_seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__,
            "device": device,
        }
        _write_json_atomic(partial / MEMBER_RECORD, record)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise MergelabError(
                f"The disk filled while building zoo member {member.name!r} in {target.parent}; "
                "free space and rerun (finished members are kept)."
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


class _deterministic:
    """Deterministic kernels and one CPU thread (a fixed reduction order whatever the core count) for the
    duration of one member build; restores the previous settings."""

    def __enter__(self) -> None:
        self.previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self.previous[0])
        torch.set_num_threads(self.previous[1])
