"""One tensor's SCF merge over row blocks ([Lin2026], Algorithm 1 as a ``TwoPass`` method): the per-row
divergences and streamed exact quantiles of the statistics passes, then each block's mask, the ``multi_expert``
combination and the running statistics of the output pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergelab.errors import CheckpointError, CompatibilityError
from mergelab.methods.scf_saliency import Thresholding, passes, row_divergence, scores
from mergelab.methods.spec import MethodCall, TensorInfo
from mergelab.ops.select import bit_mask, keep_, select


class _Expert:
    """One expert's part of a tensor's state: its row divergences, its streamed quantiles and then threshold,
    and the running sums of the output pass."""

    def __init__(self, rows: int, settings: Thresholding, numel: int, device: torch.device):
        self.kl = torch.empty(rows, dtype=torch.float64, device=device)
        self.quantiles = settings.quantiles(numel)
        self.threshold = math.nan
        self.selected = 0
        self.taken = 0
        self.full = 0.0  # ‖θ_i − θ_b‖² so far
        self.applied = 0.0  # ‖M ⊙ (θ_i − θ_b)‖² so far


class Fusion:
    """One tensor's SCF state (``TwoPass``): per-row divergences and exact quantiles in the statistics passes,
    then the running counts of the output pass.

    Blocks come in row order, so a cursor (in elements, back to 0 at each pass's end) says which rows a block
    holds. The first statistics pass computes each block's row divergences and feeds its saliency; later
    passes (while a selection narrows its ranks) feed the saliency again from the kept divergences. The one
    row of a 1-D tensor may come in several pieces (the engine's tiles): the first pass copies them and
    computes the row's divergence at its end, and the saliency is fed from the next pass on.
    """

    def __init__(self, reverse: bool, info: TensorInfo, params: dict[str, Any], shape: tuple[int, ...],
                 generator: torch.Generator | None):
        self.reverse, self.epsilon, self.name = reverse, params["epsilon"], info.name
        self.settings = Thresholding.from_params(info.name, params)
        self.averaging = params["multi_expert"] == "mean"
        self.numel = math.prod(shape)
        self.width = shape[-1] if shape else 1
        self.experts: list[_Expert] = []
        self.passes = 0
        self.cursor = 0
        self.pieces: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None  # a 1-D row in pieces
        self.averaged = 0

    @property
    def done(self) -> bool:
        return self.numel == 0 or (self.passes > 0 and all(e.quantiles.done for e in self.experts))

    def _rows(self, call: MethodCall) -> slice:
        """The rows of the whole tensor that ``call``'s tensors hold (the one row of a 1-D tensor)."""
        first = self.cursor // self.width
        return slice(first, first + max(call.base.numel() // self.width, 1))

    def _row_kl(self, expert: _Expert, call: MethodCall) -> torch.Tensor:
        return expert.kl[self._rows(call)].reshape(call.base.shape[:-1] if call.base.dim() > 1 else ())

    def observe(self, call: MethodCall) -> None:
        if self.passes == 0 and self.cursor == 0:
            for i, expert in enumerate(call.experts):
                _check_shape(self.name, i, call.base, expert)
            self.experts = [_Expert(self.numel // self.width, self.settings, self.numel, call.base.device)
                            for _ in call.experts]
            if call.base.dim() <= 1 and call.base.numel() < self.numel:
                self.pieces = []
        if self.pieces is not None:
            self.pieces.append((call.base.clone(), [e.clone() for e in call.experts]))
        else:
            for expert, tensor in zip(self.experts, call.experts):
                if self.passes == 0:
                    expert.kl[self._rows(call)] = row_divergence(call.base, tensor, self.epsilon,
                                                                 self.reverse).reshape(-1)
                if not expert.quantiles.done:
                    expert.quantiles.feed(scores(call.base, tensor, self._row_kl(expert, call)))
        self.cursor += call.base.numel()

    def end_pass(self) -> None:
        self.cursor, self.passes = 0, self.passes + 1
        if self.pieces is not None:
            base = torch.cat([b for b, _ in self.pieces])
            for i, expert in enumerate(self.experts):
                tensor = torch.cat([experts[i] for _, experts in self.pieces])
                expert.kl[:] = row_divergence(base, tensor, self.epsilon, self.reverse)
            self.pieces = None
            return
        for i, expert in enumerate(self.experts):
            if not expert.quantiles.done:
                expert.quantiles.end_pass()
                if expert.quantiles.done:
                    expert.threshold = self.settings.threshold(*expert.quantiles.values)
                    if not math.isfinite(expert.threshold):
                        raise CheckpointError(f"{self.name}: the SCF threshold of expert {i} is not finite (NaN "
                                              "or infinite weights, or an extreme alpha); check the checkpoints "
                                              "and alpha")

    def fuse(self, call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
        """The output pass on one block: Algorithm 1's mask per expert, combined by the ``multi_expert`` rule."""
        base, experts = call.base, call.experts
        if self.numel == 0:
            return base, {}
        several = len(experts) > 1
        choice = torch.zeros(base.shape, dtype=torch.uint8, device=base.device) if several else None  # 0: base
        best = torch.full_like(base, -math.inf) if several else None  # highest passing saliency so far
        averaging = self.averaging and several
        passing = torch.zeros_like(choice) if averaging else None  # how many experts pass, per element
        delta_sum = torch.zeros_like(base) if averaging else None
        merged = base
        for i, (state, expert) in enumerate(zip(self.experts, experts)):
            delta = expert - base
            salient = scores(base, expert, self._row_kl(state, call), delta)
            mask = passes(salient, state.threshold)
            bits = bit_mask(mask, base.dtype)
            selected = int(torch.count_nonzero(mask))
            state.selected += selected
            state.full += float(torch.linalg.vecdot(delta.reshape(-1), delta.reshape(-1)))
            kept = keep_(delta, bits)
            state.applied += float(torch.linalg.vecdot(kept.reshape(-1), kept.reshape(-1)))
            if choice is None:  # one expert: the element is the expert's where it passes
                state.taken += selected
                merged = select(bits, expert, base)
                continue
            candidate = salient.masked_fill_(~mask, -math.inf)
            choice.masked_fill_(candidate > best, i + 1)  # strict: the earlier expert keeps a tie
            torch.maximum(best, candidate, out=best)
            if passing is not None and delta_sum is not None:
                passing += mask
                delta_sum += kept
        for i, (state, expert) in enumerate(zip(self.experts, experts) if choice is not None else ()):
            taken = choice == i + 1
            if passing is not None:
                taken &= passing == 1
            state.taken += int(torch.count_nonzero(taken))
            merged = select(bit_mask(taken, base.dtype), expert, merged)
        if passing is not None and delta_sum is not None:
            averaged = passing >= 2
            self.averaged += int(averaged.sum())
            merged = torch.where(averaged, base + delta_sum / passing.clamp(min=1), merged)
        self.cursor += base.numel()
        return merged, self._stats()

    def _stats(self) -> dict[str, float]:
        """The tensor's statistics over the blocks fused so far (complete after the last block)."""
        stats: dict[str, float] = {}
        n = self.numel
        for i, state in enumerate(self.experts):
            stats[f"threshold_{i}"] = state.threshold
            stats[f"selected_{i}"] = state.selected / n
            stats[f"update_norm_ratio_{i}"] = math.sqrt(state.applied / state.full) if state.full > 0 else 0.0
            stats[f"taken_{i}"] = state.taken / n
        if self.averaging and len(self.experts) > 1:
            stats["averaged"] = self.averaged / n
        stats["from_base"] = (n - sum(s.taken for s in self.experts) - self.averaged) / n
        return stats


def _check_shape(method: str, i: int, base: torch.Tensor, expert: torch.Tensor) -> None:
    if expert.shape != base.shape:
        raise CompatibilityError(f"{method}: expert {i} has shape {tuple(expert.shape)} but the base has "
                                 f"{tuple(base.shape)}; merge only models of the same architecture")
