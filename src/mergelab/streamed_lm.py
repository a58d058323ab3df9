"""A causal LM whose weights stay in the checkpoint until a unit runs: the model-level passes (FIM-Merging's
Fisher and residual norm calibration, Karcher's Fisher metric) in bounded memory.

The model is built from its ``config.json`` with every parameter on PyTorch's ``meta`` device (buffers such as
rotary frequencies are real, computed by the model's constructor). A *unit* is a decoder layer or a module
outside the layers that holds parameters of its own (embedding, final norm, head). ``materialize(unit)`` reads
its tensors from the checkpoint in float32 onto the device, ``release(unit)`` puts them back on ``meta``; inside
``streaming()`` every unit is materialized just before it runs and released just after, so a forward pass holds
one unit's weights at a time whatever the model's size (about 12 bytes per parameter for a whole float32 model
with its Fisher accumulator; the largest unit's here).

A model whose parameter names are not the checkpoint's (transformers' load-time key conversions), or that has no
``layers`` list of decoder layers, raises ``StreamingUnsupported`` and the callers load it whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import ModelReader
from mergelab.errors import CheckpointError


def unloadable(folder: Path, error: Exception) -> CheckpointError:
    """The error for a model transformers cannot build: a Fisher or a calibration needs to run it."""
    return CheckpointError(f"{folder}: transformers cannot load this model as a causal LM ({type(error).__name__}: "
                           f"{str(error)[:200]}); the Fisher and the calibration of FIM-Merging and Karcher's Fisher "
                           "metric need to run it, use task_arithmetic or ties instead")


READ_BYTES = 64 << 20


class StreamingUnsupported(Exception):
    """This model cannot run unit by unit from its checkpoint (the reason is the message)."""


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules constructed inside get their parameters on ``meta`` (no memory) and keep real buffers."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def hidden_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The hidden states a unit is called with: its first positional argument, or ``hidden_states``."""
    return args[0] if args else kwargs.get("hidden_states")


def with_hidden_input(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """The same call with other hidden states."""
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def first_output(output: Any) -> torch.Tensor:
    """A unit's output tensor (decoder layers of some versions return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class Slot:
    """One parameter of a unit: where it lives in the model, its tensor in the checkpoint, its name in
    ``named_parameters()`` (a tied weight under its first name, as the Fisher is keyed) and its shape."""

    module: torch.nn.Module
    attribute: str
    checkpoint_name: str
    name: str
    shape: tuple[int, ...]


class StreamedLM:
    """``model``: the causal LM with parameters on ``meta``; ``units``: the modules materialized together, in
    module order; ``slots[i]``: the parameters of ``units[i]``."""

    def __init__(self, reader: ModelReader, device: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader, self.device = reader, device
        try:
            config = AutoConfig.from_pretrained(reader.folder)
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as error:  # noqa: BLE001 - any failure to build the model means the same to the user
            raise unloadable(reader.folder, error) from None
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self.model = model.eval()
        layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
            raise StreamingUnsupported("no list of decoder layers (model.layers)")
        inside = {id(m) for layer in layers for m in layer.modules()}
        outside = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(False))]
        self.units: list[torch.nn.Module] = [*layers, *outside]
        located = self._located()
        self.slots = [[Slot(module, attribute, *located[id(param)], tuple(param.shape))
                       for module in unit.modules() for attribute, param in module._parameters.items()
                       if param is not None] for unit in self.units]

    def _located(self) -> dict[int, tuple[str, str]]:
        """(checkpoint tensor, first name) of each parameter: the tensor is its own name, that name without the
        base-model prefix, or the name of a parameter it is tied to."""
        aliases: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        located = {}
        for key, candidates in aliases.items():
            found = [c for name in candidates for c in (name, name.removeprefix(prefix)) if self.reader.has(c)]
            if not found:
                raise StreamingUnsupported(f"parameter {candidates[0]} is not a tensor of the checkpoint")
            located[key] = (found[0], candidates[0])
        return located

    def materialize(self, unit: int, requires_grad: bool = False) -> list[torch.nn.Parameter]:
        """Read ``units[unit]``'s parameters from the checkpoint (float32, on the device), in ``slots`` order."""
        loaded = []
        for slot in self.slots[unit]:
            value = self.read_float32(slot)
            slot.module._parameters[slot.attribute] = param = torch.nn.Parameter(value, requires_grad=requires_grad)
            loaded.append(param)
        return loaded

    def read_float32(self, slot: Slot) -> torch.Tensor:
        """A slot's tensor in float32 on the device, converted ``READ_BYTES`` of the checkpoint at a time (a float32
        tensor on the CPU is used in place: a copy-on-write mapping of the file)."""
        name = slot.checkpoint_name
        entry = self.reader.entries[name]
        shape = entry.shape
        if shape != slot.shape:
            raise CheckpointError(f"{self.reader.folder}: tensor {name} has shape {shape} where config.json implies "
                                  f"{slot.shape}; fix the checkpoint or its config")
        if not shape or (entry.dtype == torch.float32 and torch.device(self.device).type == "cpu"):
            return self.reader.get(name).to(self.device, torch.float32)
        value = torch.empty(shape, dtype=torch.float32, device=self.device)
        step = max(1, READ_BYTES // max(1, entry.row_bytes))
        for start in range(0, shape[0], step):
            value[start: start + step].copy_(self.reader.get(name, rows=(start, min(start + step, shape[0]))))
        return value

    def release(self, unit: int) -> None:
        """Put ``units[unit]``'s parameters back on ``meta``."""
        for slot in self.slots[unit]:
            slot.module._parameters[slot.attribute] = torch.nn.Parameter(torch.empty(slot.shape, device="meta"),
                                                                         requires_grad=False)

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Forward passes inside materialize each unit just before it runs and release it just after."""
        handles = []
        for index, unit in enumerate(self.units):
            handles.append(unit.register_forward_pre_hook(lambda module, args, i=index: self.materialize(i) and None))
            handles.append(unit.register_forward_hook(lambda module, args, output, i=index: self.release(i)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for index in range(len(self.units)):
                self.release(index)
