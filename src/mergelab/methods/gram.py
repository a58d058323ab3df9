"""The ``TwoPass`` state shared by the geometry methods whose per-tensor statistics are inner products.

SLERP's angle ([Shoemake1985]), Model Stock's cosines ([Jang2024], per tensor or per row) and Multi-SLERP's norms
and mean direction ([Goddard2025]) are functions of the Gram matrix ``G_ij = ⟨x_i, x_j⟩`` of the tensor's N
vectors (the inputs or their task vectors), and their output is then a per-tensor (or per-row) linear
combination of those vectors. So one statistics pass accumulates the Gram matrix over row blocks
(``ops.row_gram.RowGram``, split-independent), and the output pass is elementwise: memory is a few blocks, and a
whole tensor (``TwoPass.whole``) runs the same code on one block, so every block size gives the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from mergelab.methods.spec import MethodCall, MethodResult, TensorInfo, TwoPass
from mergelab.ops.row_gram import RowGram


class GramPass:
    """One tensor's state: the Gram matrix of ``vectors(call)`` over the blocks of one statistics pass, then
    ``solve`` (what the output pass needs, from the ``RowGram``) and ``merge`` on each block of the output pass.
    ``row`` counts the rows the output pass has merged, for per-row coefficients."""

    def __init__(self, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        self.name, self.params, self.shape = info.name, params, shape
        self.gram: RowGram | None = None
        self.passes = 0
        self.row = 0

    @property
    def done(self) -> bool:
        return self.passes > 0

    def vectors(self, call: MethodCall) -> list[torch.Tensor]:
        """The N vectors whose Gram matrix the method needs, on one block."""
        raise NotImplementedError

    def solve(self, gram: RowGram) -> None:
        """Turn the complete Gram matrix into the output pass's coefficients and statistics."""
        raise NotImplementedError

    def merge(self, call: MethodCall) -> MethodResult:
        """The output on one block."""
        raise NotImplementedError

    def observe(self, call: MethodCall) -> None:
        vectors = self.vectors(call)
        if self.gram is None:
            self.gram = RowGram(len(vectors), self.shape, vectors[0].device)
        self.gram.add(vectors)

    def end_pass(self) -> None:
        self.passes += 1
        self.solve(self.gram)

    def rows_of(self, call: MethodCall, values: torch.Tensor) -> torch.Tensor:
        """The per-row ``values`` of the block's rows, shaped to broadcast over the block (output pass)."""
        block = call.base if call.base is not None else call.experts[0]
        count = block.shape[0] if block.dim() else 1
        taken = values[self.row : self.row + count].to(block.device, block.dtype)
        self.row += count
        return taken.reshape(count, *[1] * (block.dim() - 1)) if block.dim() else taken.reshape(())


def gram_two_pass(state: type[GramPass]) -> TwoPass:
    """The ``TwoPass`` of a ``GramPass`` method."""
    return TwoPass(start=state, block=lambda call, s: s.merge(call))


def linear_combination(vectors: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """``Σ c_i x_i`` in the vectors' dtype, one product and one sum per term, element by element (never a fused
    multiply-add, whose use by a kernel could differ between its vector and tail loops, so between blocks)."""
    total = vectors[0] * coefficients[0]
    for vector, coefficient in zip(vectors[1:], coefficients[1:]):
        total += vector * coefficient
    return total
