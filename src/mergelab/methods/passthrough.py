"""Passthrough: one input tensor copied as it is (optionally scaled), for ``slices:`` layer stacking."""

from __future__ import annotations

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param


def passthrough(call: MethodCall) -> torch.Tensor:
    """The single source's tensor times its ``scale`` (unchanged, bit for bit, without one)."""
    scale = call.params["scale"][0]
    tensor = call.experts[0]
    return tensor if scale is None else tensor * scale


SPECS = (
    MethodSpec(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", float, default=None, per_model=True, help="multiply this source's tensor"),),
        citation="mergekit passthrough (layer stacking)",
        base="ignored",
        elementwise=True,
        max_experts=1,
    ),
)
