"""SLERP between the base and one other model [Shoemake1985], one whole tensor as one vector, streamed in row
blocks: the angle comes from the Gram matrix of the two tensors (``methods.gram``), the output is elementwise."""

from __future__ import annotations

import math

from mergelab.methods.gram import GramPass, gram_two_pass, linear_combination
from mergelab.methods.spec import MethodCall, MethodSpec, Param
from mergelab.ops.row_gram import RowGram

# SLERP falls back to linear interpolation when the two directions are this close to (anti)parallel, where
# sin θ → 0 makes the spherical coefficients ill-conditioned (the threshold mergekit uses).
SLERP_DOT_THRESHOLD = 0.9995


class _Slerp(GramPass):
    """Spherical linear interpolation from the base (t = 0) to the one other model (t = 1) ([Shoemake1985]):
    ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with ``cos θ = ⟨a, b⟩ / (‖a‖ ‖b‖)`` over the whole tensors
    (the statistics pass's Gram matrix, float64).

    Falls back to ``(1 − t) a + t b`` when ``|cos θ| > 0.9995`` (as mergekit does) and, unlike mergekit, also
    when either tensor is all zeros, where the angle is undefined.
    """

    def vectors(self, call: MethodCall) -> list:
        return [call.base, call.experts[0]]

    def solve(self, gram: RowGram) -> None:
        t = self.params["t"]
        g = gram.total().tolist()
        norm_a, norm_b = math.sqrt(g[0][0]), math.sqrt(g[1][1])
        self.coefficients, self.stats = [1 - t, t], {"slerp_linear": 1.0}
        if norm_a == 0 or norm_b == 0:
            return
        cos_theta = min(1.0, max(-1.0, g[0][1] / (norm_a * norm_b)))
        theta = math.acos(cos_theta)
        self.stats = {"slerp_angle": theta, "slerp_linear": 1.0}
        if abs(cos_theta) > SLERP_DOT_THRESHOLD:
            return
        sin_theta = math.sin(theta)
        self.coefficients = [math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta]
        self.stats["slerp_linear"] = 0.0

    def merge(self, call: MethodCall):
        return linear_combination(self.vectors(call), self.coefficients), self.stats


SLERP = gram_two_pass(_Slerp)

SPECS = (
    MethodSpec(
        name="slerp",
        fn=SLERP.whole,
        params=(Param("t", float, required=True, low=0.0, high=1.0,
                      help="interpolation position: 0 gives the base, 1 the other model"),),
        citation="Shoemake 1985, Animating rotation with quaternion curves",
        base="required",
        min_experts=1,
        max_experts=1,
        two_pass=SLERP,
    ),
)
