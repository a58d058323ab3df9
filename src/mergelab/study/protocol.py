"""``mergelab study PROTOCOL``: plan a paper's protocol as jobs, run them on an executor, analyse, report.

A protocol is a module with

- ``TITLE`` (one line) and ``PAPER`` (the paper it follows),
- ``plan(settings) -> (jobs, context)``: the jobs (``mergelab.study.jobs.Job``, unique labels) and the
  JSON-ready facts its analysis needs (which zoo members, which subsets...),
- ``analyse(context, results) -> analysis``: ``results`` maps job labels to job results; the analysis holds
  ``tables`` (``report.table`` dicts) and whatever the figures need,
- ``figures(out, analysis, command) -> [(file name, caption)]``: PNGs drawn from the analysis only.

``run_study`` writes ``results.json`` (settings, context, every job result by label, the analysis, timings)
and ``report.md`` with its self-contained twin ``report.html``, the index page: every table of the analysis and
every figure, each saying the command that made it. Job results are stored under ``<out>/jobs`` by content
key, so rerunning a killed study picks up where it stopped.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mergelab import document
from mergelab.document import Bullets, Figure, Heading, Paragraph, Report
from mergelab.errors import MergelabError
from mergelab.study.executors import EXECUTORS, execute
from mergelab.study.jobs import job_key
from mergelab.study.report import table_block
from mergelab.study.settings import StudySettings

# protocol name -> module
PROTOCOLS = {
    "scf": "mergelab.study.scf_pairs",
    "karcher": "mergelab.study.karcher",
    "in-the-wild": "mergelab.study.in_the_wild",
    "long-to-short": "mergelab.study.long_to_short",
}




ZOOS = ("tiny-lm", "smollm2", "smollm2-arith")


def protocol_module(name: str, zoo: str = "tiny-lm"):
    """The module that plans protocol ``name`` on ``zoo``: ``PROTOCOLS[name]`` for tiny-lm (with vision where
    the paper has a vision setting), ``mergelab.study.smollm2``'s protocol object for smollm2, and
    ``mergelab.study.smollm2_arith``'s for long-to-short and scf on smollm2-arith."""
    if name not in PROTOCOLS:
        raise MergelabError(f"Unknown study protocol {name!r}; valid protocols are: {', '.join(PROTOCOLS)}.")
    if zoo not in ZOOS:
        raise MergelabError(f"Unknown study zoo {zoo!r}; use one of: {', '.join(ZOOS)}.")
    if zoo == "smollm2":
        from mergelab.study.smollm2 import protocol

        return protocol(name)
    if zoo == "smollm2-arith":
        from mergelab.study.smollm2_arith import PROTOCOLS as ARITH

        if name not in ARITH:
            raise MergelabError(f"The smollm2-arith zoo holds the long-to-short and the safety pair only; run "
                                f"protocol {name!r} with --zoo smollm2 or --zoo tiny-lm.")
        return ARITH[name]
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
    """``report.md`` and ``report.html``: the index page with every table (rendered from ``results.json``) and
    figure, each with the command that made it."""
    analysis = study["analysis"]
    settings = study["settings"]
    command = study["command"]
    report = Report(study["title"]).add(Paragraph(
        f"Protocol of {study['paper']}. Made by `{command}` (zoo size `{settings['zoo_size']}`, "
        f"{'quick' if settings['quick'] else 'full'} protocol, executor `{study['executor']}`) in "
        f"{study['seconds']:.0f} s. Every number below is read from [results.json](results.json)."))
    report.add(*(Paragraph(note) for note in analysis.get("notes", [])))
    contents = [f"[{t['title']}](#table-{i + 1})" for i, t in enumerate(analysis["tables"])]
    report.add(Heading("Contents"), Bullets(contents + [f"[figure: {caption}]({file})" for file, caption in figures]))
    for i, table in enumerate(analysis["tables"]):
        report.add(Heading(table["title"], anchor=f"table-{i + 1}"), table_block(table, command))
    for file, caption in figures:
        report.add(Heading(f"Figure: {caption}"), Figure(file, caption, command))
    return document.write(report, out)[0]
