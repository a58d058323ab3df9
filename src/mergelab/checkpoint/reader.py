"""Lazy, per-tensor access to Hugging Face model folders (single-file or sharded safetensors).

Headers are parsed and checked up front (truncation, offsets, index paths), so a bad file is refused before
anything is written; tensor data is memory-mapped one tensor (or row block) at a time.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.dtypes import SAFETENSORS, torch_dtype
from mergelab.checkpoint.pagecache import make_resident
from mergelab.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it is, from a safetensors header (``offset``: its first byte in the file)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def row_bytes(self) -> int:
        return int(torch.Size(self.shape[1:]).numel()) * torch.tensor([], dtype=self.dtype).element_size()


def parse_safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a safetensors file and its raw bytes, after checking the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download or rebuild it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} has a corrupt or truncated safetensors header; re-download or rebuild it")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON); re-download or rebuild it") \
            from None
    data_len = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry; re-download or "
                                  "rebuild it") from None
        if dtype not in SAFETENSORS:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        end = max(end, stop)
        if not 0 <= start <= stop:
            raise CheckpointError(f"{path}: tensor '{name}' has invalid data offsets; re-download or rebuild it")
    if end > data_len:
        raise CheckpointError(f"{path} is truncated: its header needs {end} data bytes but the file holds "
                              f"{data_len}; re-download or rebuild it")
    return header, raw


@dataclass
class ModelReader:
    """One model folder: its config, its tensor catalogue, and lazy tensor reads."""

    folder: Path
    config: dict[str, Any]
    entries: dict[str, TensorEntry]
    fingerprint: dict[str, dict[str, Any]]
    pickle_state: dict[str, torch.Tensor] | None = None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def has(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or rows ``[start, stop)`` of it, as a private memory map of just those bytes.

        The mapping is made resident here (``MADV_POPULATE_READ``: the calling reader thread waits for the disk
        and maps the page-cache pages), so the thread that computes on it neither faults nor copies; it is
        unmapped when the tensor is freed, so the resident set holds only the pieces in flight. Copy-on-write
        (``ACCESS_COPY``): writing to the tensor can never reach the file.
        """
        if self.pickle_state is not None:
            tensor = self.pickle_state[name]
            return tensor if rows is None else tensor[rows[0]: rows[1]]
        entry = self.entries[name]
        first, last = (0, entry.shape[0] if entry.shape else 1) if rows is None else rows
        shape = (last - first, *entry.shape[1:]) if entry.shape else ()
        count = int(torch.Size(shape).numel())
        if count == 0:
            return torch.empty(shape, dtype=entry.dtype)
        start = entry.offset + first * entry.row_bytes
        size = count * torch.tensor([], dtype=entry.dtype).element_size()
        with self._lock:
            fd = self._handles.get(entry.file)
            if fd is None:
                fd = self._handles[entry.file] = os.open(entry.file, os.O_RDONLY)
        if os.fstat(fd).st_size < start + size:
            raise CheckpointError(f"{entry.file} ended while reading tensor '{name}' (it shrank after it was "
                                  "opened); re-download it")
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, start + size - aligned, offset=aligned, access=mmap.ACCESS_COPY)
        make_resident(mapped)
        return torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=start - aligned).reshape(shape)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], dict[str, Path] | None, bool]:
    """The weight files of a folder, the index's name -> file map if any, and whether they are pickles."""
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index_path = folder / index_name
        if index_path.exists():
            if pickled and not allow_pickle:
                raise CheckpointError(_pickle_refusal(folder))
            return (*_read_index(folder, index_path), pickled)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None, False
    if (folder / "pytorch_model.bin").exists():
        if not allow_pickle:
            raise CheckpointError(_pickle_refusal(folder))
        return [folder / "pytorch_model.bin"], None, True
    raise CheckpointError(f"{folder} holds no model weights (no *.safetensors or index file); point the recipe at a "
                          "Hugging Face model folder")


def _pickle_refusal(folder: Path) -> str:
    return (f"{folder} stores weights as .bin pickles, which can run code when loaded; convert them to safetensors "
            "or pass --allow-pickle to load them with weights_only=True")


def _read_index(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, Path]]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path} is not a valid index (no 'weight_map'); re-download or "
                              "rebuild it") from None
    root = folder.resolve()
    mapping: dict[str, Path] = {}
    for name, rel in weight_map.items():
        target = (folder / rel).resolve()
        if root not in target.parents:
            raise CheckpointError(f"{index_path}: tensor '{name}' points to '{rel}', outside the model folder; "
                                  "fix the index")
        if not target.exists():
            raise CheckpointError(f"{index_path}: tensor '{name}' points to missing file '{rel}'; re-download it")
        mapping[name] = target
    return sorted(set(mapping.values())), mapping


def open_model(folder: str | Path, allow_pickle: bool = False) -> ModelReader:
    """Open a model folder lazily: parse every header, check it, and read nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; check the path in the recipe")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{config_path} is not valid JSON; fix or re-download it") from None
    files, index_map, pickled = _weight_files(folder, allow_pickle)
    if pickled:
        return _open_pickled(folder, config, files)
    entries: dict[str, TensorEntry] = {}
    fingerprint: dict[str, dict[str, Any]] = {}
    for file in files:
        header, raw = parse_safetensors_header(file)
        stat = file.stat()
        fingerprint[file.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "header_sha256": hashlib.sha256(raw).hexdigest()}
        for name, entry in header.items():
            if name == "__metadata__" or (index_map is not None and index_map.get(name) != file):
                continue
            entries[name] = TensorEntry(file, torch_dtype(SAFETENSORS[entry["dtype"]]), tuple(entry["shape"]),
                                        8 + len(raw) + entry["data_offsets"][0])
    if index_map is not None:
        missing = sorted(set(index_map) - set(entries))
        if missing:
            raise CheckpointError(f"{folder}: the index lists tensor '{missing[0]}' but its shard does not hold it; "
                                  "re-download the model")
    return ModelReader(folder=folder, config=config, entries=entries, fingerprint=fingerprint)


def _open_pickled(folder: Path, config: dict[str, Any], files: list[Path]) -> ModelReader:
    """Load .bin pickles with ``weights_only=True`` (memory-mapped where torch can)."""
    state: dict[str, torch.Tensor] = {}
    fingerprint = {}
    for file in files:
        try:
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{file} cannot be loaded as a weights-only pickle ({exc}); convert it") from None
        state.update(part)
        fingerprint[file.name] = {"size": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    entries = {name: TensorEntry(folder, t.dtype, tuple(t.shape)) for name, t in state.items()}
    return ModelReader(folder=folder, config=config, entries=entries, fingerprint=fingerprint, pickle_state=state)
