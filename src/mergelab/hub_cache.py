"""Hub-style model references (``org/name`` or ``org/name@revision``) resolved through the local Hugging Face
cache, offline, and the Hub id a local folder stands for (for the model card's ``base_model``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mergelab.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_FOLDER = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def split_reference(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for a Hub-style reference, or None when it does not look like one."""
    repo, _, revision = ref.partition("@")
    return (repo, revision or None) if HUB_ID.match(repo) else None


def cached_snapshot(ref: str) -> Path | None:
    """The cache snapshot folder of a Hub-style reference that is not a local path, or None when ``ref`` is no
    Hub id. Offline (``local_files_only``); a Hub id missing from the cache raises CheckpointError."""
    parts = split_reference(ref)
    if parts is None or Path(ref).expanduser().exists():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = parts
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                      cache_dir=os.environ.get("HF_HUB_CACHE")))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        at = f" --revision {revision}" if revision else ""
        raise CheckpointError(f"model '{ref}' is neither a folder nor in the local Hugging Face cache; check the "
                              f"path, or download it with `huggingface-cli download {repo}{at}`") from None


def hub_id(ref: str, folder: Path) -> str | None:
    """The Hub id a model input stands for: the reference itself, the cache folder it lies in
    (``models--org--name/snapshots/...``), or its config's ``_name_or_path`` when that is a Hub id."""
    parts = split_reference(ref)
    if parts is not None and not Path(ref).expanduser().exists():
        return parts[0]
    for part in folder.resolve().parts:
        match = CACHE_FOLDER.match(part)
        if match:
            return f"{match['org']}/{match['name']}"
    config = folder / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    return name if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists() else None
