"""[FIMMerging] eq. 7's per-sequence squared gradients, unit by unit on a ``StreamedLM``: the diagonal Fisher of
a model that need not fit in memory (one unit's weights and gradients at a time).

Forward: each sequence runs through the streamed model (every unit read from the checkpoint as it runs) and the
call of every unit is kept. The units must form a chain, checked on every sequence: the first takes the token
ids, each next one takes the previous one's output as its hidden states, the last one's output is the logits;
otherwise ``StreamingUnsupported`` (the caller runs the whole model). Sequences are kept in chunks of at most
``CAPTURE_BYTES`` of unit inputs.

Backward, from the head to the embedding: a unit is read once with gradients on; for each sequence its call is
recomputed from the kept input and backpropagated from the gradient its successor handed down (the head's from
the sequence NLL), giving the sequence's parameter gradients, squared and added with weight ``1/N`` (eq. 7),
and the gradient handed to its predecessor. Nothing is summed over sequences before it is squared.

A weight tied between the embedding and the head (``tie_word_embeddings``) has one gradient per sequence, the sum
of both uses, and that sum is squared: the head's part is squared at once except on the rows of the sequence's
own tokens, which wait for the embedding's part (nonzero only on those rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from mergelab.streamed_lm import StreamedLM, StreamingUnsupported, first_output, hidden_input, with_hidden_input

CAPTURE_BYTES = 256 << 20


def sequence_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``−log p(x)`` of each sequence of ``tokens`` (B, T) from its logits: next-token NLL summed over positions."""
    nll = torch.nn.functional.cross_entropy(logits.float()[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return nll.sum(dim=1)


@dataclass
class Sequence:
    """One sequence (1, T), every unit's call on it in chain order as (unit, args, kwargs), and the gradient
    the unit being processed hands down."""

    tokens: torch.Tensor
    calls: list[tuple[int, tuple, dict[str, Any]]]
    grad: torch.Tensor | None = None
    head_rows: torch.Tensor | None = None  # the tied weight's head gradient on this sequence's token rows

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, args, kwargs in self.calls for t in (*args, *kwargs.values())
                   if isinstance(t, torch.Tensor))


def capture(lm: StreamedLM, tokens: torch.Tensor) -> Sequence:
    """Run one sequence (1, T) and keep every unit's call; check that the units form a chain."""
    calls: list[tuple[int, tuple, dict[str, Any]]] = []
    outputs: list[torch.Tensor] = []
    with torch.no_grad(), lm.streaming():
        handles = []
        for index, unit in enumerate(lm.units):
            handles.append(unit.register_forward_pre_hook(
                lambda module, args, kwargs, i=index: calls.append((i, args, kwargs)), with_kwargs=True))
            handles.append(unit.register_forward_hook(
                lambda module, args, output: outputs.append(first_output(output))))
        try:
            logits = lm.model(input_ids=tokens, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
    if sorted(i for i, _, _ in calls) != list(range(len(lm.units))):
        raise StreamingUnsupported("its units do not each run once per forward pass")
    links = [tokens, *outputs[:-1]]
    for (unit, args, kwargs), previous in zip(calls, links):
        given = hidden_input(args, kwargs)
        if not (isinstance(given, torch.Tensor) and given.shape == previous.shape and torch.equal(given, previous)):
            raise StreamingUnsupported(f"unit {type(lm.units[unit]).__name__} does not take its predecessor's output")
    if not torch.equal(outputs[-1], logits):
        raise StreamingUnsupported("its logits are not the last unit's output")
    return Sequence(tokens, calls)


def tied_name(lm: StreamedLM, order: list[int]) -> str | None:
    """The weight shared by the first unit (an embedding) and the last (the head), or None; any other weight
    shared between units raises ``StreamingUnsupported``."""
    seen: dict[str, int] = {}
    shared = set()
    for unit in order:
        for slot in lm.slots[unit]:
            if slot.name in seen and seen[slot.name] != unit:
                shared.add(slot.name)
            seen[slot.name] = unit
    if not shared:
        return None
    first_names = {slot.name for slot in lm.slots[order[0]]}
    last_names = {slot.name for slot in lm.slots[order[-1]]}
    name = next(iter(shared))
    if len(shared) > 1 or not isinstance(lm.units[order[0]], torch.nn.Embedding) or \
            name not in first_names & last_names:
        raise StreamingUnsupported("it shares weights between units other than the embedding and the head")
    return name


def backward_chunk(lm: StreamedLM, chunk: list[Sequence], samples: int, add: Callable[[str, torch.Tensor], None],
                   bar: tqdm) -> None:
    """Add ``(1/N) Σ_i (∇L_i)²`` of the chunk's sequences to ``add``, unit by unit from the head."""
    order = [unit for unit, _, _ in chunk[0].calls]
    tied = tied_name(lm, order)
    for position in reversed(range(len(order))):
        unit = order[position]
        params = lm.materialize(unit, requires_grad=True)
        names = [slot.name for slot in lm.slots[unit]]
        sums = [torch.zeros_like(p, requires_grad=False) for p in params]
        for sequence in chunk:
            _, args, kwargs = sequence.calls[position]
            inputs: list[torch.Tensor] = []
            if position:
                hidden = hidden_input(args, kwargs).detach().requires_grad_(True)
                args, kwargs = with_hidden_input(args, kwargs, hidden)
                inputs.append(hidden)
            output = first_output(lm.units[unit](*args, **kwargs))
            if position == len(order) - 1:
                target, upstream = sequence_nll(output, sequence.tokens).sum(), None
            else:
                target, upstream = output, sequence.grad
            grads = torch.autograd.grad(target, inputs + params, upstream, allow_unused=True)
            sequence.grad = grads[0] if inputs else None
            for name, total, grad in zip(names, sums, grads[len(inputs):]):
                if grad is None:
                    continue
                if name == tied:
                    rows = sequence.tokens.unique().to(grad.device)
                    if position:  # the head: its part on the sequence's token rows waits for the embedding's
                        sequence.head_rows = grad[rows].clone()
                        grad[rows] = 0
                    else:
                        rows_sum = sequence.head_rows + grad[rows]
                        total[rows] += rows_sum * rows_sum / samples
                        continue
                total.addcmul_(grad, grad, value=1.0 / samples)
            grads = grad = output = target = None  # dropped before the next sequence's are made: one at a time
            bar.update(1)
        lm.release(unit)
        for name, total in zip(names, sums):
            add(name, total)


def unit_fisher(lm: StreamedLM, tokens: torch.Tensor, add: Callable[[str, torch.Tensor], None]) -> None:
    """The diagonal Fisher of eq. 7 over the sequences ``tokens`` (N, T), handed tensor by tensor to ``add``
    (called once per tensor and chunk, twice for a tied weight: the caller sums)."""
    samples = len(tokens)
    chunk: list[Sequence] = []
    held = 0
    order: list[int] | None = None
    with tqdm(total=2 * samples * len(lm.units), desc="Fisher", unit="unit", disable=None, leave=False) as bar:
        for row in tokens:
            sequence = capture(lm, row[None].to(lm.device))
            if order is None:
                order = [unit for unit, _, _ in sequence.calls]
            elif [unit for unit, _, _ in sequence.calls] != order:
                raise StreamingUnsupported("its units run in a different order from one sequence to the next")
            chunk.append(sequence)
            held += sequence.nbytes
            bar.update(len(lm.units))
            if held >= CAPTURE_BYTES:
                backward_chunk(lm, chunk, samples, add, bar)
                chunk, held = [], 0
        if chunk:
            backward_chunk(lm, chunk, samples, add, bar)
