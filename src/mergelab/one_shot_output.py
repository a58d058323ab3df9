"""The output folder of commands that write in one go, without ``--resume`` (``extract-lora``, ``moe``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mergelab.checkpoint.writer import OutputFolder
from mergelab.errors import OutputError
from mergelab.output_guard import is_partial_file


def one_shot_output(out: Path, inputs: list[Path], overwrite: bool) -> OutputFolder:
    """``OUT.partial`` to write into, renamed to ``OUT`` by ``finish``. A partial folder left by an interrupted
    run cannot be continued: ``overwrite`` removes it (only when it holds nothing but such a run's files: the
    guard of ``output_guard``), else it is refused by name."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if not overwrite:
            raise OutputError(f"{partial} was left by an interrupted run; delete it or pass --overwrite")
        if partial.is_dir() and all(is_partial_file(entry) for entry in partial.iterdir()):
            shutil.rmtree(partial)
    return OutputFolder(out, inputs, overwrite, False, "")
