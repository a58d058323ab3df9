"""Streaming sharded safetensors output with an atomic finish and resume.

Every output tensor's shape and dtype is known from the plan, so each shard's header is written first and
tensors are appended as they are computed: no shard is ever held in memory. Shards are written as
``NAME.tmp`` inside ``OUT_DIR.partial/`` and renamed when complete; ``progress.json`` records each finished
shard's checksum (XXH3-128: it guards against damage, not tampering, at 8 GB/s where SHA-256 manages 1)
so that ``--resume`` re-uses the shards that verify. ``OUT_DIR`` appears only by renaming the
finished partial folder, so a killed run leaves the old state or a resumable partial folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from mergelab.checkpoint.dtypes import safetensors_code
from mergelab.checkpoint.pagecache import start_write_back
from mergelab.errors import OutputError

WRITE_BACK_BYTES = 64 << 20  # start writing each such stretch to disk while the merge goes on


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.tensor([], dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The length-prefixed, 8-byte-aligned header for tensors stored in this order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": safetensors_code(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one shard: header first, then each tensor's bytes in plan order, hashing as it goes."""

    def __init__(self, path: Path, tensors: list[PlannedTensor]):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.expected = [t.name for t in tensors]
        self.planned = {t.name: t for t in tensors}
        self.written = 0
        self.tensor_bytes = 0
        self.checksum = xxhash.xxh3_128()
        self.file = open(self.tmp, "wb")
        self.size = self.written_back = 0
        self._write(safetensors_header(tensors, {"format": "pt"}))

    def _write(self, data: bytes | memoryview) -> None:
        """Append bytes; every ``WRITE_BACK_BYTES`` start their write-back, so ``close``'s fsync does not wait for
        the whole shard."""
        self.file.write(data)
        self.checksum.update(data)
        self.size += len(data)
        if self.size - self.written_back >= WRITE_BACK_BYTES:
            self.file.flush()
            start_write_back(self.file.fileno(), self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def add(self, name: str, block: torch.Tensor) -> None:
        """Append a tensor, or the next row block of one; blocks of a tensor must come in row order."""
        planned = self.planned[name]
        if name != self.expected[self.written] or block.shape[1:] != planned.shape[1:] or block.dtype != planned.dtype:
            raise RuntimeError(f"internal: tensor {name} {tuple(block.shape)} {block.dtype} out of plan")
        data = memoryview(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._write(data)
        self.tensor_bytes += len(data)
        if self.tensor_bytes > planned.nbytes:
            raise RuntimeError(f"internal: tensor {name} received more bytes than planned")
        if self.tensor_bytes == planned.nbytes:
            self.written += 1
            self.tensor_bytes = 0

    @property
    def complete(self) -> bool:
        return self.written == len(self.expected)

    def close(self) -> str:
        """Flush, fsync and rename into place; return the shard's checksum."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.checksum.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def rescale_shards(folder: Path, scales: dict[str, float]) -> None:
    """Multiply written tensors by factors (a method's ``finish`` pass), one shard in memory at a time, in
    float32, each shard replaced atomically."""
    if not scales:
        return
    from safetensors.torch import load_file, save_file

    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        if not scales.keys() & tensors.keys():
            continue
        for name, factor in scales.items():
            if name in tensors:
                tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
        tmp = shard.with_name(shard.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, shard)


def file_checksum(path: Path) -> str:
    """The XXH3-128 digest of a file, as ``ShardWriter`` records it."""
    checksum = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            checksum.update(block)
    return checksum.hexdigest()


class OutputFolder:
    """``OUT_DIR.partial/`` while writing; renamed to ``OUT_DIR`` by ``finish``."""

    def __init__(self, out_dir: Path, input_folders: list[Path], overwrite: bool, resume: bool, plan_key: str):
        from mergelab.output_guard import check_output_path

        check_output_path(out_dir, input_folders, overwrite)  # cwd, inputs; --overwrite only of a merge output
        self.out_dir = out_dir
        self.partial = out_dir.with_name(out_dir.name + ".partial")
        self.plan_key = plan_key
        out_abs = out_dir.resolve()
        if not out_abs.parent.is_dir():
            raise OutputError(f"cannot write {out_dir}: its parent {out_abs.parent} is not an existing folder")
        if not os.access(out_abs.parent, os.W_OK):
            raise OutputError(f"cannot write {out_dir}: its parent folder {out_abs.parent} is not writable")
        self.done: dict[str, str] = {}
        if resume and self.partial.exists():
            self.done = self._verified_progress()
        elif self.partial.exists():
            raise OutputError(f"{self.partial} holds an interrupted merge; pass --resume to continue it or delete it")
        else:
            try:
                self.partial.mkdir()
            except OSError as error:
                raise OutputError(f"cannot create {self.partial} ({error.strerror}); choose another output "
                                  "path") from None

    @property
    def progress_file(self) -> Path:
        return self.partial / "progress.json"

    def _verified_progress(self) -> dict[str, str]:
        """Shards from an interrupted run of the same plan whose checksums verify (others are redone)."""
        try:
            progress = json.loads(self.progress_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        if progress.get("plan") != self.plan_key:
            raise OutputError(f"{self.partial} was left by a different recipe or inputs; delete it to start afresh")
        return {name: digest for name, digest in progress.get("shards", {}).items()
                if (self.partial / name).exists() and file_checksum(self.partial / name) == digest}

    def record(self, shard_name: str, digest: str) -> None:
        self.done[shard_name] = digest
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": self.plan_key, "shards": self.done}, indent=1))
        os.replace(tmp, self.progress_file)

    def write_text(self, name: str, text: str) -> None:
        (self.partial / name).write_text(text)

    def copy_in(self, source: Path) -> None:
        shutil.copy2(source, self.partial / source.name)

    def finish(self) -> Path:
        """Atomically put the finished folder in place (replacing an old one only now)."""
        self.progress_file.unlink(missing_ok=True)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(self.out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out_dir, old)
        os.replace(self.partial, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def discard(self) -> None:
        """Remove the partial folder (on a user error: nothing is left behind)."""
        shutil.rmtree(self.partial, ignore_errors=True)
