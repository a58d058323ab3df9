"""Cached, resumable, atomic building of a model family: a list of members, each a folder made by a function.

A member's cache key hashes the zoo's code version, the family settings, the member's own settings and its
parent's key, so a changed recipe rebuilds exactly what it changes. Each member is written to
``NAME.partial`` and renamed to ``NAME`` only when complete (with ``zoo_member.json`` inside), so a killed or
failed build leaves finished members (reused by the next call) and never a half-written folder named ``NAME``.
"""

from __future__ import annotations

import ast
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

import mergelab
from mergelab.errors import MergelabError

MEMBER_RECORD = "zoo_member.json"
FAMILY_RECORD = "zoo.json"

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
    """Hash of the code that makes members (builder, tasks, the family's modules); a change rebuilds.

    The hash is over each module's syntax tree without its docstrings, so editing a comment or a docstring
    does not throw away a family that took twenty minutes to build; any change to code does."""
    here = Path(__file__).parent
    digest = hashlib.sha256(mergelab.__version__.encode())
    for file in [here / "builder.py", here.parent / "tasks.py", *plan.sources]:
        digest.update(file.name.encode() + code_without_docs(file.read_text()).encode())
    return digest.hexdigest()[:16]


def code_without_docs(source: str) -> str:
    """``ast.dump`` of ``source`` with every module, class and function docstring removed (comments are
    never in the tree)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


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


def stale_members(plan: FamilyPlan, folder: Path, names: list[str]) -> list[str]:
    """Those of ``names`` and their parents that are not built in ``folder`` from the current recipe."""
    keys = member_keys(plan)
    return [m.name for m in with_parents(plan, names) if not _finished_record(folder / m.name, keys[m.name])]


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


def with_parents(plan: FamilyPlan, names: list[str]) -> list[Member]:
    """The members called ``names`` and all their ancestors, in build order."""
    by_name = {m.name: m for m in plan.members}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise MergelabError(
            f"Family {plan.family!r} has no member {unknown[0]!r}; its members are: {', '.join(by_name)}."
        )
    wanted: set[str] = set()
    for name in names:
        while name is not None and name not in wanted:
            wanted.add(name)
            name = by_name[name].parent
    return [m for m in plan.members if m.name in wanted]


def build_plan(
    plan: FamilyPlan,
    folder: Path,
    device: str,
    progress: bool = True,
    members: list[str] | None = None,
    workers: int = 1,
) -> Path:
    """Build (or reuse) the members of ``plan`` under ``folder`` (all, or ``members`` and their parents);
    write ``zoo.json`` describing every finished member (``complete`` says whether all are); return ``folder``.

    With ``workers`` > 1, members whose parent is finished build side by side in that many processes (each
    member on one thread, so its weights do not depend on ``workers``); only plans that
    ``mergelab.zoo.family_plan`` can rebuild in a worker process may use it."""
    keys = member_keys(plan)
    family_key = _key(keys)
    todo = plan.members if members is None else with_parents(plan, members)
    finished = {m.name: _finished_record(folder / m.name, keys[m.name]) for m in plan.members}
    if all(finished[m.name] for m in todo) and (_read_json(folder / FAMILY_RECORD) or {}).get("key") == family_key:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    pending = [m for m in todo if not finished[m.name]]
    with tqdm(total=len(todo), initial=len(todo) - len(pending), desc=f"zoo {plan.family} ({plan.size})",
              disable=not progress) as bar:
        if workers > 1 and len(pending) > 1:
            _build_parallel(plan, pending, keys, folder, finished, device, workers, bar)
        for member in pending:
            if not finished[member.name]:
                bar.set_postfix_str(member.name)
                built = {name: folder / name for name, record in finished.items() if record}
                finished[member.name] = _build_member(member, keys[member.name], folder / member.name, built, device)
                bar.update()
    records = {name: record for name, record in finished.items() if record}
    record = {
        "family": plan.family,
        "size": plan.size,
        "key": family_key,
        "complete": len(records) == len(plan.members),
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


def _build_parallel(
    plan: FamilyPlan,
    pending: list[Member],
    keys: dict[str, str],
    folder: Path,
    finished: dict[str, dict[str, Any] | None],
    device: str,
    workers: int,
    bar: Any,
) -> None:
    """Build ``pending`` in ``workers`` spawned processes, each member once its parent is finished."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting = list(pending)
    running: dict[Any, str] = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while waiting or running:
            for member in [m for m in waiting if m.parent is None or finished[m.parent]]:
                waiting.remove(member)
                built = {name: folder / name for name, record in finished.items() if record}
                job = pool.submit(_build_in_worker, plan.family, plan.size, member.name, keys[member.name],
                                  folder / member.name, built, device)
                running[job] = member.name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in done:
                finished[running.pop(job)] = job.result()
                bar.update()


def _build_in_worker(family: str, size: str, name: str, key: str, target: Path, built: dict[str, Path],
                     device: str) -> dict[str, Any]:
    from mergelab.zoo import family_plan

    member = next(m for m in family_plan(family, size).members if m.name == name)
    return _build_member(member, key, target, built, device)


def _finished_record(target: Path, key: str) -> dict[str, Any] | None:
    """The member record in ``target`` if that member is finished and built from the current recipe."""
    record = _read_json(target / MEMBER_RECORD)
    return record if record and record.get("key") == key else None


def _build_member(member: Member, key: str, target: Path, built: dict[str, Path], device: str) -> dict[str, Any]:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    import torch

    try:
        with _deterministic(), _transformers_bars_off():
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


class _transformers_bars_off:
    """transformers' own bars ("Loading weights", "Writing model shards") off while a member is built: the zoo's
    bar is the one progress display of a build."""

    def __enter__(self) -> None:
        from transformers.utils import logging as transformers_logging

        self.was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as transformers_logging

        if self.was_on:
            transformers_logging.enable_progress_bar()


class _deterministic:
    """Deterministic kernels and one CPU thread (a fixed reduction order whatever the core count) for the
    duration of one member build; restores the previous settings. Two threads did not pay for these tiny
    models: on the shared 2-core machine a training step took 2-16x longer with two threads than with one."""

    def __enter__(self) -> None:
        import torch

        self.previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.use_deterministic_algorithms(self.previous[0])
        torch.set_num_threads(self.previous[1])
