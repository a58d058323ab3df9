"""What a plan is: each output tensor's inputs (``Source``) and resolved parameters (``TensorJob``), and the
whole merge (``MergePlan``), including where each tensor goes in the output (its shard layout).

Plans are frozen: nothing after planning changes them (a method's model-level results travel in the
``MethodCall``, see ``methods.context``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.layout import TensorInfo
from mergelab.checkpoint.reader import ModelReader
from mergelab.checkpoint.writer import PlannedTensor, plan_shards, shard_file_names
from mergelab.config import Recipe
from mergelab.methods.spec import MethodSpec

DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class Source:
    """One input tensor: which model, which name, and how many leading rows to keep (vocabulary rule)."""

    model: str
    name: str
    rows: int | None = None

    def read(self, readers: dict[str, ModelReader]) -> torch.Tensor:
        """The whole input tensor as the merge reads it: its leading ``rows`` only, by the vocabulary rule."""
        tensor = readers[self.model].get(self.name)
        return tensor if self.rows is None else tensor[: self.rows]


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs, the method and the parameters resolved for it."""

    name: str
    shape: tuple[int, ...]
    info: TensorInfo
    base: Source | None
    experts: list[Source]
    params: dict[str, Any]

    @property
    def sources(self) -> list[Source]:
        """The inputs in call order: base first if any, then the experts."""
        return ([self.base] if self.base else []) + self.experts


@dataclass(frozen=True)
class ShardLayout:
    """Which output tensors go to which shard file, in write order."""

    shards: list[list[PlannedTensor]]
    names: list[str]

    @classmethod
    def of(cls, tensors: list[PlannedTensor], shard_size: int) -> ShardLayout:
        shards = plan_shards(tensors, shard_size)
        return cls(shards, shard_file_names(len(shards)))


@dataclass(frozen=True)
class MergePlan:
    """The resolved recipe: method, models, output tensors in write order, output dtype, config, shard layout."""

    recipe: Recipe
    method: MethodSpec
    readers: dict[str, ModelReader]
    reference: str
    jobs: list[TensorJob]
    out_dtype: torch.dtype
    config: dict[str, Any]
    tokenizer_folder: Path
    layout: ShardLayout
    warnings: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for shard in self.layout.shards for t in shard)
