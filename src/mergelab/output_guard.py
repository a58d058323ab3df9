"""Where a merge may write: checks made before anything is created or replaced.

A merge writes a new folder, or replaces a previous mergelab output when asked to (``--overwrite``). A
previous output is recognised by its ``mergelab.json`` record (written last, with the recipe and versions)
and by holding nothing but the files a merge writes: weight shards, index, config, tokenizer files, model
card. Anything else in it (a user's notes, another model) and the folder is refused, never deleted. The
working directory, its parents and folders holding an input model are refused too, and so are ``OUT.old`` and
``OUT.partial`` when they are not a merge's (a merge uses those names, and removes them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mergelab.errors import OutputError

# the tokenizer files a merge copies from its tokenizer source, and the other files mergelab's writing commands
# (merge, moe, extract-lora) write; each of those leaves one record file, which marks the folder as its output
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MERGE_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "README.md", "mergelab.json", "chat_template.jinja", "moe.json", "lora_extraction.json",
               "adapter_config.json", "adapter_model.safetensors")
RECORD_FILES = ("mergelab.json", "moe.json", "lora_extraction.json")
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def check_output_path(out_dir: Path, input_folders: list[Path], overwrite: bool) -> None:
    """Refuse an output path that would replace or hide something that is not a previous merge."""
    out_abs = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if out_abs == cwd or out_abs in cwd.parents:
        raise OutputError(f"output '{out_dir}' is the working directory or a folder above it; name a new "
                          f"folder for the merged model, e.g. {Path(out_dir) / 'merged'}")
    if out_dir.name in ("", ".", ".."):
        raise OutputError(f"output '{out_dir}' does not name a folder of its own; name a new folder, e.g. "
                          f"{out_abs / 'merged'}")
    for folder in input_folders:
        folder_abs = folder.resolve()
        if out_abs == folder_abs or folder_abs in out_abs.parents:
            raise OutputError(f"output {out_dir} lies inside input model folder {folder}; choose another path")
        if out_abs in folder_abs.parents:
            raise OutputError(f"output {out_dir} holds input model folder {folder}; choose another path")
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        raise OutputError(f"{old} exists, and a merge uses that name while it replaces {out_dir}; move it away")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.is_dir() and any(not is_partial_file(entry) for entry in partial.iterdir()):
        raise OutputError(f"{partial} is not an interrupted merge (it holds other files), and a merge writes to "
                          "that name; move it away")
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise OutputError(f"output {out_dir} exists and is not a folder; choose another path")
    if not overwrite:
        raise OutputError(f"output folder {out_dir} already exists; pass --overwrite to replace a previous merge "
                          "or choose another path")
    refuse_unless_previous_output(out_dir)


def refuse_unless_previous_output(folder: Path) -> None:
    """``--overwrite`` may replace an empty folder or a previous mergelab output, nothing else."""
    entries = sorted(folder.iterdir())
    if not entries:
        return
    if not any(is_merge_record(folder / name) for name in RECORD_FILES):
        raise OutputError(f"{folder} is not a previous mergelab output (it has no {' / '.join(RECORD_FILES)}), so "
                          "--overwrite will not replace it; choose another path or empty it yourself")
    foreign = [entry.name for entry in entries if not is_merge_file(entry)]
    if foreign:
        raise OutputError(f"{folder} holds '{foreign[0]}', which a merge does not write, so --overwrite will not "
                          "replace the folder; move that out first or choose another path")


def is_merge_record(path: Path) -> bool:
    """Whether ``path`` is a ``mergelab.json`` that a merge wrote (a JSON object with recipe and version)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if path.name != "mergelab.json":  # moe.json, lora_extraction.json: a JSON object
        return isinstance(record, dict)
    return isinstance(record, dict) and "recipe" in record and "mergelab_version" in record


def is_partial_file(entry: Path) -> bool:
    """Whether an entry of ``OUT.partial`` is what an interrupted merge leaves: its files, a shard being written
    (``NAME.tmp``) and its progress record."""
    name = entry.name.removesuffix(".tmp")
    return entry.is_file() and (is_merge_name(name) or name in ("progress.json", "progress"))


def is_merge_file(entry: Path) -> bool:
    """Whether a folder entry is one of the files a merge writes."""
    return entry.is_file() and is_merge_name(entry.name)


def is_merge_name(name: str) -> bool:
    return name in MERGE_FILES or name in TOKENIZER_FILES or SHARD_NAME.match(name) is not None
