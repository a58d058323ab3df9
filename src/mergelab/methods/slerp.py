"""SLERP between the base and one other model [Shoemake1985], one whole tensor as one vector."""

from __future__ import annotations

import math

import torch

from mergelab.methods.spec import MethodCall, MethodSpec, Param

# SLERP falls back to linear interpolation when the two directions are this close to (anti)parallel, where
# sin θ → 0 makes the spherical coefficients ill-conditioned (the threshold mergekit uses).
SLERP_DOT_THRESHOLD = 0.9995


def slerp(call: MethodCall) -> tuple[torch.Tensor, dict[str, float]]:
    """Spherical linear interpolation from the base (t = 0) to the one other model (t = 1) ([Shoemake1985]):
    ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with θ the angle between the two whole tensors.

    Falls back to ``(1 − t) a + t b`` when ``|cos θ| > 0.9995`` (as mergekit does) and, unlike mergekit, also
    when either tensor is all zeros, where the angle is undefined.
    """
    t = call.params["t"]
    a, b = call.base, call.experts[0]
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * a + t * b, {"slerp_linear": 1.0}
    cos_theta = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1.0, 1.0))
    if abs(cos_theta) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b, {"slerp_angle": math.acos(cos_theta), "slerp_linear": 1.0}
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    merged = (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b
    return merged, {"slerp_angle": theta, "slerp_linear": 0.0}


SPECS = (
    MethodSpec(
        name="slerp",
        fn=slerp,
        params=(Param("t", float, required=True, low=0.0, high=1.0,
                      help="interpolation position: 0 gives the base, 1 the other model"),),
        citation="Shoemake 1985, Animating rotation with quaternion curves",
        base="required",
        min_experts=1,
        max_experts=1,
    ),
)
