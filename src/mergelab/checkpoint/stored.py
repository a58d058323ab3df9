"""A tensor left in a safetensors file by a model-level pass (a Fisher in its cache file), read only when the
tensor it belongs to is merged, so a pass's per-tensor results are never all in memory together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    name: str

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, "pt") as handle:
            return handle.get_tensor(self.name)
