"""A prepare pass's extras left on disk (``StoredTensor``) are read once per tensor, however many row blocks
the tensor is streamed in, and let go after its last output block."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from mergelab.checkpoint.stored import StoredTensor
from mergelab.stream.extras import PieceExtras


def test_stored_extras_are_read_once_per_tensor_and_dropped_after_its_last_output_piece(tmp_path, monkeypatch):
    path = tmp_path / "fisher.safetensors"
    values = {"a": torch.rand(6, 3), "b": torch.rand(4)}
    save_file(values, path)
    reads = []
    load = StoredTensor.load
    monkeypatch.setattr(StoredTensor, "load", lambda self: reads.append(self.name) or load(self))
    extras = PieceExtras({"a": {"fisher": StoredTensor(path, "a"), "alpha": [0.5]},
                          "b": {"fisher": StoredTensor(path, "b")}, "c": {"alpha": [1.0]}})
    # tensor a: a statistics pass and an output pass of three blocks each; b whole; c with nothing stored
    for last in (False, False, False, False, False):
        seen = extras.of("a", last)
        assert torch.equal(seen["fisher"], values["a"]) and seen["alpha"] == [0.5]
    assert "a" in extras.loaded
    assert torch.equal(extras.of("a", True)["fisher"], values["a"])
    assert torch.equal(extras.of("b", True)["fisher"], values["b"])
    assert extras.of("c", True) == {"alpha": [1.0]}
    assert reads == ["a", "b"] and extras.loaded == {}
