"""The typed context of a method's model-level passes (``MethodSpec.prepare`` / ``finish``).

A whole-model pass sees the readers of the base and the experts, the tensor list with each tensor's resolved
parameters, and the device, never the plan or the options. What needs a file, a model or a Fisher is asked of
the context (``read``, ``causal_lm``, ``fisher``), so a method itself opens nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader
from mergelab.fisher import DiagonalFisher, FisherSettings, diagonal_fisher, load_causal_lm
from mergelab.plan.data import Source, TensorJob
from mergelab.streamed_lm import StreamedLM, StreamingUnsupported


@dataclass(frozen=True)
class ModelContext:
    """Inputs of a whole-model pass.

    ``readers``: every input model by its recipe reference; ``base``: the base's reference (None when the
    method takes none); ``reference``: the model whose config and tensor list the output follows; ``tensors``:
    the output tensors in write order, each with its sources and resolved parameters; ``merged``: in ``finish``,
    the written output folder (complete, not yet renamed into place).
    """

    readers: Mapping[str, ModelReader]
    base: str | None
    reference: str
    tensors: tuple[TensorJob, ...]
    device: str
    merged: ModelReader | None = None

    @property
    def shared_params(self) -> dict[str, Any]:
        """The parameters of the first tensor: those a model-level pass reads are shared by every tensor."""
        return self.tensors[0].params if self.tensors else {}

    def read(self, source: Source) -> torch.Tensor:
        """One input tensor as the merge reads it (leading rows only, by the vocabulary rule)."""
        return source.read(self.readers)

    def fisher(self, model: str, settings: FisherSettings) -> DiagonalFisher:
        """The random-token diagonal Fisher of one input model (cached on disk, ``mergelab.fisher``)."""
        return diagonal_fisher(self.readers[model], settings, self.device)

    @contextmanager
    def causal_lm(self, reader: ModelReader) -> Iterator[torch.nn.Module]:
        """A model folder as a float32 causal LM on the context's device, in eval mode, whose units are read
        from the checkpoint as they run (``streamed_lm``), or loaded whole where the model does not allow it."""
        try:
            lm = StreamedLM(reader, self.device)
        except StreamingUnsupported:
            yield load_causal_lm(reader.folder, self.device)
            return
        with lm.streaming():
            yield lm.model
