"""``mergelab study PROTOCOL``: plan a paper's protocol as jobs, run them on an executor, analyse, report.

A protocol is a module with

- ``TITLE`` (one line) and ``PAPER`` (the paper it follows),
- ``plan(settings) -> (jobs, context)``: the jobs (``mergelab.study.jobs.Job``, unique labels) and the
  JSON-ready facts its analysis needs (which zoo members, which subsets...),
- ``analyse(context, results) -> analysis``: ``results`` maps job labels to job results; the analysis holds
  ``tables`` (``report.table`` dicts) and whatever the figures need,
- ``figures(out, analysis, command) -> [(file name, caption)]``: PNGs drawn from the analysis only.

``run_study`` writes ``results.json`` (settings, context, every job result by label, the analysis, timings)
and ``report.md``, the index page: every table of the analysis and every figure, each saying the command that
made it. Job results are stored under ``<out>/jobs`` by content key, so rerunning a killed study picks up where
it stopped.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.study.executors import EXECUTORS, execute
from mergelab.study.jobs import job_key
from mergelab.study.report import render_table

# protocol name -> module
PROTOCOLS = {
    "scf": "mergelab.study.scf",
    "karcher": "mergelab.study.karcher",
    "in-the-wild": "mergelab.study.in_the_wild",
    "long-to-short": "mergelab.study.long_to_short",
}


@dataclass
class StudySettings:
    """What a protocol's plan depends on. ``quick``: the minutes-long variant; ``zoo``: the language-model
    family (``tiny-lm``, or ``smollm2``: the protocols of ``mergelab.study.smollm2``); ``zoo_size``: the zoo
    size its members come from (default: ``demo`` when quick, ``full`` otherwise; smollm2 has no ``demo``, so
    its default is ``full``); ``build_zoo``: build missing members instead of stopping with the command that
    builds them."""

    quick: bool = False
    zoo: str = "tiny-lm"
    zoo_size: str | None = None
    build_zoo: bool = False
    device: str = "cpu"
    progress: bool = True

    def size(self) -> str:
        return self.zoo_size or ("demo" if self.quick and self.zoo == "tiny-lm" else "full")


ZOOS = ("tiny-lm", "smollm2")


def protocol_module(name: str, zoo: str = "tiny-lm"):
    """The module that plans protocol ``name`` on ``zoo``: ``PROTOCOLS[name]`` for tiny-lm (with vision where
    the paper has a vision setting), ``mergelab.study.smollm2``'s protocol object for smollm2."""
    if name not in PROTOCOLS:
        raise MergelabError(f"Unknown study protocol {name!r}; valid protocols are: {', '.join(PROTOCOLS)}.")
    if zoo not in ZOOS:
        raise MergelabError(f"Unknown study zoo {zoo!r}; use one of: {', '.join(ZOOS)}.")
    if zoo == "smollm2":
        from mergelab.study.smollm2 import protocol

        return protocol(name)
    return importlib.import_module(PROTOCOLS[name])


def run_study(name: str, out: str | Path, settings: StudySettings, executor: str = "local",
              workers: int | None = None, ray_address: str | None = None, store: str | Path | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Run protocol ``name`` into the folder ``out`` and return what ``results.json`` holds."""
    module = protocol_module(name, settings.zoo)
    if executor not in EXECUTORS:
        raise MergelabError(f"Unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}.")
    out = Path(out)
    command = command or (f"mergelab study {name}" + (" --quick" if settings.quick else "")
                          + (f" --zoo {settings.zoo}" if settings.zoo != "tiny-lm" else ""))
    started = time.perf_counter()
    jobs, context = module.plan(settings)
    labels = [job.label for job in jobs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"protocol {name} planned two jobs with one label")
    key_of = {job.label: job_key(job) for job in jobs}
    unique = {key_of[job.label]: job for job in jobs}  # the same content under two labels runs once
    store = Path(store) if store else out / "jobs"
    out.mkdir(parents=True, exist_ok=True)
    finished = dict(execute(unique, store, executor, workers, ray_address, settings.device, settings.progress))
    by_label = {label: finished[key] for label, key in key_of.items()}
    analysis = module.analyse(context, by_label)
    study = {
        "protocol": name,
        "title": module.TITLE,
        "paper": module.PAPER,
        "command": command,
        "settings": {**asdict(settings), "zoo_size": settings.size()},
        "executor": executor,
        "context": context,
        "jobs": by_label,
        "analysis": analysis,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(study, indent=1))
    write_report(out, study, module.figures(out, analysis, command))
    return study


def write_report(out: Path, study: dict[str, Any], figures: list[tuple[str, str]]) -> Path:
    """``report.md``: the index page with every table (rendered from ``results.json``) and figure."""
    analysis = study["analysis"]
    settings = study["settings"]
    lines = [f"# {study['title']}", "",
             f"Protocol of {study['paper']}. Made by `{study['command']}` (zoo size `{settings['zoo_size']}`, "
             f"{'quick' if settings['quick'] else 'full'} protocol, executor `{study['executor']}`) in "
             f"{study['seconds']:.0f} s. Every number below is read from [results.json](results.json).", ""]
    if analysis.get("notes"):
        lines += [*analysis["notes"], ""]
    lines += ["## Contents", ""]
    lines += [f"- [{t['title']}](#table-{i + 1})" for i, t in enumerate(analysis["tables"])]
    lines += [f"- [figure: {caption}]({file})" for file, caption in figures]
    lines.append("")
    for i, table in enumerate(analysis["tables"]):
        lines += [f'<a id="table-{i + 1}"></a>', "", f"## {table['title']}", "", render_table(table), ""]
        if table.get("note"):
            lines += [table["note"], ""]
    for file, caption in figures:
        lines += [f"## Figure: {caption}", "", f"![{caption}]({file})", "", f"Made by `{study['command']}`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
