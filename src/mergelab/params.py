"""Resolving recipe parameter settings to plain values for one tensor.

A setting is a scalar, a gradient (list of numbers: linear interpolation at ``t`` in [0, 1], where ``t`` is the
layer's position in the stack, ``layer / (num_layers − 1)``, and 0 for tensors outside it, as mergekit does),
or a list of filtered values (first whose ``filter`` is a substring of the tensor name wins). A scope that
yields nothing falls through to the next, lower-precedence scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergelab.config import Conditional, Setting
from mergelab.errors import RecipeError, closest
from mergelab.methods.spec import MethodSpec, Param

Scope = Mapping[str, Setting] | None


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value a setting takes for one tensor, or None if no filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t)
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def as_bool_if_flag(param: Param, value: Any) -> Any:
    """YAML numbers 0 and 1 given for a true/false parameter, as mergekit accepts them (``normalize: 1.0``)."""
    if param.kind is bool and not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return value


def resolve(param: Param, scopes: Sequence[Scope], tensor_name: str, t: float, where: str) -> Any:
    """First value any scope gives for ``param``, else its default (an error if it is required)."""
    for scope in scopes:
        if scope is not None and param.name in scope:
            value = evaluate(scope[param.name], tensor_name, t)
            if value is not None:
                return param.check(as_bool_if_flag(param, value), where)
    if param.required:
        raise RecipeError(f"{where}: parameter '{param.name}' is required by this method; add it to the recipe")
    return param.default


def scalar_values(setting: Setting) -> list[Any]:
    """Every literal value inside a setting (for validating ranges once, up front)."""
    if isinstance(setting, Conditional):
        return scalar_values(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in scalar_values(item)]
    return [setting]


def validate_scope(spec: MethodSpec, scope: Scope, where: str, per_model: bool) -> None:
    """Refuse unknown parameters, parameters set at the wrong level, and out-of-range values."""
    if not scope:
        return
    for name, setting in scope.items():
        if name not in spec.param_names:
            raise RecipeError(f"{where}: method '{spec.name}' has no parameter '{name}'"
                              f"{closest(name, spec.param_names)}")
        param = spec.param(name)
        if per_model and not param.per_model:
            raise RecipeError(f"{where}: parameter '{name}' applies to the whole merge, not to one model; move it "
                              "to the top-level parameters")
        for value in scalar_values(setting):
            try:
                param.check(as_bool_if_flag(param, value), where)
            except ValueError as error:
                raise RecipeError(str(error)) from None
