"""SCE: Select, Calculate, Erase ([Wan2024] FuseChat, sec. 3.3), for task vectors ``δ_i = θ_i − θ_0``.

1. Select: keep the ``select_topk`` fraction of entries (of those whose variance is not zero) with the largest
   variance ``σ² = (1/N) Σ_i (δ_i − δ̄)²`` across the models' task vectors.
2. Calculate: model weights ``η_i = mean(δ_i²) / Σ_j mean(δ_j²)`` on the selected entries (equal weights if
   every selected entry is zero).
3. Erase: elect each entry's sign from the summed task vectors, drop entries of the other sign, and take the
   ``η``-weighted mean of what is left: ``θ = θ_0 + Σ_i η_i m_i δ_i / Σ_i η_i m_i``.

``variant: mergekit`` (default) is mergekit's ``sce``: the selection mask also zeroes the task vectors, so
sign election and the mean use only selected entries. ``variant: fusechat`` is the FuseChat authors' released
code: the selection only decides the weights, and election and the mean use the full task vectors.

Streamed in row blocks (``TwoPass``): step 1 needs the ``k``-th largest variance of the whole tensor
(``k = floor(select_topk · n)``, n counting the non-zero variances, which takes a counting pass), found exactly by
``ops.rank_window.RankWindow`` (a stable descending sort's first ``k`` entries: entries tied at the threshold are
taken in position order, counted across blocks); step 2 needs each model's ``Σ δ_i²`` over the selection, summed
per row in float64 (``ops.row_gram.row_dots``; exact products for float32 task vectors) and over the rows with
``math.fsum``, so it does not depend on the blocks; step 3 is elementwise given those. A whole tensor runs the
same code on one block (``TwoPass.whole``), so every block size gives the same bits.

Deliberate difference from mergekit: mergekit falls back to equal weights when ``Σ_j mean(δ_j²) < 1e-6``,
which real fine-tunes (|δ| around 1e-3) can fall under; here the fallback is only for an exact zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param, TensorInfo, TwoPass
from mergelab.methods.task_arithmetic import INT8_MASK
from mergelab.ops.consensus import disjoint_sum, elect_sign
from mergelab.ops.rank_window import RankWindow
from mergelab.ops.row_gram import row_dots


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the task vectors, per entry: ``(1/N) Σ_i (δ_i − δ̄)²`` with
    ``δ̄ = (1/N) Σ_i δ_i``, by running sums in the task vectors' dtype (elementwise, so the same in any block)."""
    mean = deltas[0].clone()
    for delta in deltas[1:]:
        mean += delta
    mean /= len(deltas)
    total = (deltas[0] - mean).square_()
    for delta in deltas[1:]:
        total += (delta - mean).square_()
    return total.div_(len(deltas))


class Selection:
    """One tensor's SCE statistics (its ``TwoPass`` state): the selection (step 1) and the weights (step 2).

    Passes: one that counts the non-zero variances (only for ``0 < select_topk < 1``), then the ``RankWindow``'s
    (2 for a large tensor: a strided sample, then brackets), then one that sums each model's ``δ_i²`` over the
    selected entries per row (none with one model, whose weight is 1, or an empty selection, where the weights
    are equal). ``mask`` gives the selection of the blocks in order, once per pass.
    """

    def __init__(self, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        self.numel = math.prod(shape)
        self.rows = shape[0] if shape else 1
        self.fraction = params["select_topk"]
        self.window: RankWindow | None = None  # known after the counting pass
        if self.fraction >= 1.0 or self.fraction <= 0.0 or self.numel == 0:
            self.window = RankWindow(self.numel, 0, self.numel if self.fraction >= 1.0 else 0, descending=True)
        self.nonzero = 0
        self.models = 0
        self.row_sums: torch.Tensor | None = None  # (rows, N): each row's sums of the selected δ_i²
        self.cursor = 0  # rows summed so far
        self.weights: list[float] | None = None

    @property
    def keep(self) -> int:
        """How many entries are selected (``RankWindow`` keeps none after a NaN variance)."""
        return 0 if self.window.nothing else self.window.stop - self.window.first

    @property
    def done(self) -> bool:
        return (self.window is not None and self.window.done
                and (self.window.nothing or self.models == 1 or self.weights is not None))

    def observe(self, call: MethodCall) -> None:
        deltas = [expert - call.base for expert in call.experts]
        self.models = len(deltas)
        if self.window is None:
            self.nonzero += int(torch.count_nonzero(variance(deltas)))
        elif not self.window.done:
            self.window.feed(variance(deltas))
        elif self.models > 1:  # one table for the whole tensor: a list of small ones would fragment the heap
            if self.row_sums is None:
                self.row_sums = torch.empty(self.rows, self.models, dtype=torch.float64, device=call.base.device)
            sums = row_dots(self.selected(deltas), [(i, i) for i in range(self.models)])
            self.row_sums[self.cursor : self.cursor + sums.shape[0]] = sums
            self.cursor += sums.shape[0]

    def end_pass(self) -> None:
        if self.window is None:
            self.window = RankWindow(self.numel, 0, int(self.fraction * self.nonzero), descending=True)
        elif not self.window.done:
            self.window.end_pass()
        else:  # the sums of squares
            self.window.rewind()
            if self.row_sums is not None:
                sums = [math.fsum(column) for column in self.row_sums.T.tolist()]
                total = math.fsum(sums)
                self.weights = [s / total for s in sums] if total > 0 else [1.0 / len(sums)] * len(sums)
                self.row_sums = None

    def mask(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The next block's selection (step 1) as 1.0 and the rest as 0.0, in the task vectors' dtype."""
        return self.window.mask(variance(deltas))

    def selected(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """The next block's task vectors with the entries outside the selection zeroed (consumed)."""
        if self.window.everything:
            return deltas
        mask = self.mask(deltas)
        return [delta.mul_(mask) for delta in deltas]

    def model_weights(self, models: int) -> list[float]:
        """``η`` (step 2): from the selection's sums of squares, or equal where they are all zero (or N = 1)."""
        return self.weights if self.weights is not None else [1.0 / models] * models


def sce_block(call: MethodCall, state: Selection) -> tuple[torch.Tensor, dict[str, float]]:
    """SCE's output on one block (step 3, given the statistics; see the module docstring for the variants)."""
    deltas = [expert - call.base for expert in call.experts]
    merged_from = state.selected(deltas) if call.params["variant"] == "mergekit" else deltas
    weights = state.model_weights(len(deltas))
    update = disjoint_sum(merged_from, weights, elect_sign(merged_from, "sum"), normalize=True)
    stats = {"sce_selected_fraction": state.keep / state.numel if state.numel else 0.0}
    stats.update({f"sce_weight_{i}": w for i, w in enumerate(weights)})
    return update.add_(call.base), stats


SCE = TwoPass(start=Selection, block=sce_block)

SPECS = (
    MethodSpec(
        name="sce",
        fn=SCE.whole,
        params=(
            Param("select_topk", float, default=1.0, low=0.0, high=1.0,
                  help="fraction of entries, by variance across models, that decide the weights"),
            Param("variant", str, default="mergekit", choices=("mergekit", "fusechat"),
                  help="mergekit: selection also masks the task vectors; fusechat: it only sets the weights"),
            INT8_MASK,
        ),
        citation="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging)",
        base="required",
        min_experts=1,
        two_pass=SCE,
    ),
)
