"""Each tensor's ``MethodCall.extras`` as its pieces see them: values a prepare pass left on disk
(``StoredTensor``, a Fisher) are read at the tensor's first piece and kept until its last output piece, so a
tensor streamed in row blocks reads them once, and only the tensors in flight hold theirs."""

from __future__ import annotations

import threading
from typing import Any

from mergelab.checkpoint.stored import StoredTensor


class PieceExtras:
    def __init__(self, extras: dict[str, dict[str, Any]]):
        self.extras = extras
        self.loaded: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def of(self, name: str, last_output_piece: bool) -> dict[str, Any]:
        """The extras of tensor ``name`` for one of its pieces (``last_output_piece``: no piece of it follows)."""
        given = self.extras.get(name, {})
        if not any(isinstance(value, StoredTensor) for value in given.values()):
            return given
        with self.lock:
            values = self.loaded.get(name)
            if values is None:
                values = {key: value.load() if isinstance(value, StoredTensor) else value
                          for key, value in given.items()}
                self.loaded[name] = values
            if last_output_piece:
                del self.loaded[name]
        return values
