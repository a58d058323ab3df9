"""The contract between the engine and a merge method.

A method is a pure function over the tensors of one parameter name (``MethodCall`` in, tensor out), plus a
declaration of its parameters (``Param``) from which the recipe loader validates names, types and ranges.
The engine resolves per-layer gradients and filters before the call, so a method sees plain values: shared
parameters as scalars, per-model parameters as lists aligned with ``experts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from mergelab.checkpoint.layout import TensorInfo


@dataclass
class MethodCall:
    """Everything a method may look at for one tensor.

    ``base`` and ``experts`` are already on the compute device in the compute dtype (float32 or float64).
    ``params`` are the recipe's parameters resolved for this tensor (the plan's, never changed); ``extras`` what
    the method's ``prepare`` pass computed for this tensor (``ModelPass.extras``), empty without one.
    ``generator`` is seeded from the recipe seed and the tensor name, so random methods are reproducible
    whatever order tensors are computed in.
    """

    base: torch.Tensor | None
    experts: list[torch.Tensor]
    info: TensorInfo
    params: dict[str, Any]
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method: its type, default, range and whether it is set per model.

    ``low``/``high`` bound numeric values; ``low_open``/``high_open`` make a bound exclusive.
    ``default=None`` with ``required=True`` means the recipe must give it.
    """

    name: str
    kind: type
    default: Any = None
    per_model: bool = False
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    def check(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's type and check its range; raise ValueError naming ``where``."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind is str:
            value = str(value)
            if self.choices is not None and value not in self.choices:
                raise ValueError(
                    f"{where}: parameter '{self.name}' must be one of {', '.join(self.choices)}; got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise ValueError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"{where}: parameter '{self.name}' = {value} is out of range {self.range_text()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"{where}: parameter '{self.name}' = {value} is out of range {self.range_text()}")
        return value

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"


MethodResult = "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"
MethodFn = Callable[[MethodCall], MethodResult]


class BlockState(Protocol):
    """One tensor's state under ``TwoPass``: per-tensor statistics gathered in pass 1, then whatever pass 2
    carries from one block to the next (a count of tied entries already taken, a random generator's position).
    """

    @property
    def done(self) -> bool:
        """True once the statistics are complete (possibly from the start: then pass 1 is skipped)."""

    def observe(self, call: MethodCall) -> None:
        """Pass 1: take one row block into the statistics."""

    def end_pass(self) -> None:
        """Pass 1: every block was observed once; ``done`` says whether another pass is needed."""


@dataclass(frozen=True)
class TwoPass:
    """A method whose only whole-tensor need is a per-tensor statistic, so it runs in row blocks.

    ``start(info, params, shape, generator)`` makes a tensor's ``BlockState`` (``shape`` is the whole tensor's,
    ``generator`` the tensor's seeded generator, or None). Pass 1 streams the blocks through ``observe`` once per
    ``end_pass`` until ``done``; pass 2 calls ``block(call, state)`` on each block and returns its output, as a
    method function does. In both passes every block of the tensor comes exactly once, in row order, and a
    block holds whole rows (first-dimension slices) of a tensor of at least 2 dimensions. A call's tensors are
    valid only during the call (the engine reuses their memory), so a state copies what it keeps.
    ``whole(call)`` runs both passes on one block, the whole tensor: a spec's ``fn`` is that, so the two paths
    are one code.
    """

    start: Callable[[TensorInfo, dict[str, Any], tuple[int, ...], torch.Generator | None], BlockState]
    block: Callable[[MethodCall, BlockState], MethodResult]

    def whole(self, call: MethodCall) -> MethodResult:
        reference = call.experts[0] if call.experts else call.base
        state = self.start(call.info, call.params, tuple(reference.shape), call.generator)
        while not state.done:
            state.observe(call)
            state.end_pass()
        return self.block(call, state)


@dataclass
class ModelPass:
    """What a model-level pass gives the engine.

    ``prepare(context)`` runs before streaming, with a ``methods.context.ModelContext``; its ``extras``
    (tensor name -> values) reach each tensor's ``MethodCall.extras``. ``finish(context)`` runs once every tensor
    is written, with ``context.merged`` the complete output folder (not yet renamed into place); its ``scales``
    (tensor name -> factor) are applied to the written tensors by the writer (``rescale_shards``). ``record``
    goes to ``mergelab.json`` under the pass's name.
    """

    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A recipe method: its name, function, parameters and what inputs it takes.

    ``base``: 'required' (task-vector methods), 'optional', or 'ignored' (a base given is only warned about).
    ``min_experts``/``max_experts`` count the non-base models. ``random``: the function draws from
    ``MethodCall.generator``. ``elementwise``: each output element depends only on the same element of the
    inputs (and the parameters), so the engine may compute a large tensor in row blocks to bound memory.
    ``two_pass``: the method is elementwise given per-tensor statistics (``TwoPass``); the engine computes a
    large tensor in row blocks, streaming them once per statistics pass and once more to compute the output.
    ``needs_whole(info, shape, params)``: the tensors (by their ``TensorInfo``, whole shape and resolved
    parameters) on which a method that
    declares ``elementwise`` or ``two_pass`` needs the whole tensor at once all the same (the SVD methods'
    in-layer matrices); the engine takes those whole, in one piece, and runs the others as declared. The
    method's ``fn`` must choose its rule by the same predicate.
    ``prepare``/``finish``: optional model-level passes (``ModelPass``) before and after streaming
    (FIM-Merging's Fisher, residual norm calibration); the per-tensor function stays pure.
    ``fisher_of(params)``: which input's diagonal Fisher the ``prepare`` pass computes (``'base'`` or
    ``'reference'``, None for none) given the shared parameters, so ``mergelab check`` can count that pass.
    ``check_params(params, where)``: the checks that involve several parameters together (DELLA's
    density ± epsilon, SCF's quantile order); the planner runs it once on each distinct set of resolved
    parameters, so a bad combination is refused before anything is written. It raises ``RecipeError`` naming
    ``where`` (a tensor that has these parameters).
    """

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    citation: str
    base: Literal["required", "optional", "ignored"] = "required"
    min_experts: int = 1
    max_experts: int | None = None
    random: bool = False
    elementwise: bool = False
    two_pass: TwoPass | None = None
    needs_whole: Callable[[TensorInfo, tuple[int, ...], dict[str, Any]], bool] | None = None
    prepare: Callable[..., ModelPass] | None = None
    finish: Callable[..., ModelPass] | None = None
    fisher_of: Callable[[dict[str, Any]], str | None] | None = None
    check_params: Callable[[dict[str, Any], str], None] | None = None
    aliases_of: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def call_with(self, base: torch.Tensor | None, experts: list[torch.Tensor], info: TensorInfo,
                  generator: torch.Generator | None = None, **values: Any) -> MethodCall:
        """A ``MethodCall`` with plain values: defaults for what is not given, a scalar given for a per-model
        parameter repeated for every expert, other values (what a ``prepare`` pass would add) as ``extras``;
        for using a method on tensors directly, as the tests do."""
        params = dict(self.fixed)
        for p in self.params:
            value = values.get(p.name, p.default)
            params[p.name] = value if not p.per_model or isinstance(value, list) else [value] * len(experts)
        extras = {k: v for k, v in values.items() if k not in self.param_names}
        return MethodCall(base, experts, info, params, generator, extras)


def weight_param(default: float | None = 1.0, required: bool = False) -> Param:
    """The per-model mixing weight that most methods share."""
    return Param("weight", float, default=default, per_model=True, required=required,
                 help="mixing weight of this model")


def registry(specs: Sequence[MethodSpec]) -> dict[str, MethodSpec]:
    """Build a name -> spec table, refusing duplicate names (no registration by import side effect)."""
    table: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in table:
            raise ValueError(f"merge method {spec.name!r} is declared twice")
        table[spec.name] = spec
    return table
