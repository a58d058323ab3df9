"""The Gram matrix of N same-shaped vectors fed in row blocks, per row and in total, independent of the split."""

from __future__ import annotations

import math

import torch

_CHUNK = 1 << 20  # elements per vector in one float64 product batch (rows are never cut)


def pairs(n: int) -> list[tuple[int, int]]:
    """The Gram matrix's upper triangle ``(i, j)``, ``i ≤ j``, row by row: the order of ``row_dots``'s columns."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def pairwise_row_sums(values: torch.Tensor) -> torch.Tensor:
    """The sums over the last dimension of ``values`` (consumed) by a pairwise tree of elementwise additions:
    the first half of each row plus its second half, until one column is left (an odd last column is first
    added into the first). Every addition is one correctly rounded IEEE operation on two elements chosen by the
    row's length alone, so a row's sum is the same on any device whatever else is in the tensor."""
    width = values.shape[-1]
    if width == 0:
        return values.new_zeros(values.shape[:-1])
    while width > 1:
        if width % 2:
            values[..., 0] += values[..., width - 1]
            width -= 1
        half = width // 2
        values = values[..., :half] + values[..., half:width]
        width = half
    return values[..., 0]


def row_dots(vectors: list[torch.Tensor], which: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``⟨x_i[r], x_j[r]⟩`` for every row ``r`` (first-dimension slice; each element of a 1-D tensor, the one
    value of a 0-d one) and pair ``(i, j)`` of ``which`` (default ``pairs(N)``; at least two pairs), as an
    (R, E) float64 tensor, ``E = len(which)``.

    Each product is taken in float64 (exact for float32 inputs: 24 + 24 mantissa bits fit in 53), and each
    row's products are summed so that the sum depends on the row alone, not on how many rows come with it, the
    device or the thread count. On the CPU, by one torch reduction over the last dimension (the cheapest:
    0.2 ns per product against 0.4-0.7 for the tree and 30-40 ns for an exact accumulator like
    ``ops.l1_norm.L1Norm``; BENCHMARKS.md, issue 19): torch splits one reduction's inner dimension across
    threads only when it has a single output, and here every call reduces ``E ≥ 2`` rows at once,
    so each row is summed whole by one thread, in the kernel's fixed order for its length
    (``tests/test_geometry_streaming.py`` checks one and several rows, one and two threads). Elsewhere by
    ``pairwise_row_sums``: CUDA's reduction kernels share a row's sum between threads by a layout chosen from
    the number of rows, so the order is fixed by construction instead.
    """
    which = pairs(len(vectors)) if which is None else which
    if len(which) < 2:
        raise ValueError("row_dots needs at least two pairs (one reduction must have several outputs)")
    rows = vectors[0].shape[0] if vectors[0].dim() else 1
    flat = [v.reshape(rows, math.prod(v.shape[1:])) for v in vectors]  # a 1-D tensor: rows of one element
    width = flat[0].shape[1]
    table = torch.empty(rows, len(which), dtype=torch.float64, device=vectors[0].device)
    step = max(1, _CHUNK // max(width, 1))
    for a in range(0, rows, step):
        b = min(a + step, rows)
        wide = [f[a:b].double() for f in flat]
        products = torch.empty(table.shape[1], b - a, width, dtype=torch.float64, device=table.device)
        for e, (i, j) in enumerate(which):
            torch.mul(wide[i], wide[j], out=products[e])
        table[a:b] = (products.sum(dim=2) if products.device.type == "cpu" else pairwise_row_sums(products)).T
    return table


class RowGram:
    """The Gram matrix of N vectors fed as row blocks of one tensor (in row order, each row exactly once):
    kept per row (``per_row``), and summed over the whole tensor (``total``) with ``math.fsum``, the correctly
    rounded sum of the row values, so the total does not depend on the blocks either. For float32 inputs a 1-D
    tensor's total is the exact dot product, correctly rounded; a matrix's is within float64 rounding of it.

    Memory: ``E`` float64 values per row (per element of a 1-D tensor), ``E = N (N + 1) / 2``.
    """

    def __init__(self, n: int, shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.n = n
        self.table = torch.zeros(shape[0] if shape else 1, len(pairs(n)), dtype=torch.float64, device=device)
        self.cursor = 0

    def add(self, vectors: list[torch.Tensor]) -> None:
        """Take the next rows of every vector."""
        dots = row_dots(vectors)
        self.table[self.cursor : self.cursor + dots.shape[0]] = dots
        self.cursor += dots.shape[0]

    def _matrices(self, columns: torch.Tensor) -> torch.Tensor:
        """(..., E) upper-triangle values to symmetric (..., N, N) matrices."""
        out = torch.empty(*columns.shape[:-1], self.n, self.n, dtype=torch.float64, device=columns.device)
        for e, (i, j) in enumerate(pairs(self.n)):
            out[..., i, j] = out[..., j, i] = columns[..., e]
        return out

    def total(self) -> torch.Tensor:
        """The (N, N) Gram matrix of the whole tensors, in float64 (on the CPU)."""
        sums = [math.fsum(column) for column in self.table.cpu().T.tolist()]
        return self._matrices(torch.tensor(sums, dtype=torch.float64))

    def per_row(self) -> torch.Tensor:
        """The (R, N, N) Gram matrices of each row, in float64."""
        return self._matrices(self.table)
