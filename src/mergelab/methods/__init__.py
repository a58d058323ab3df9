"""Merge methods by recipe name. Each module declares its methods in ``SPECS``; the table is built here,
explicitly, so that what exists is visible in one place."""

from mergelab.methods import fim, geometry, linear, nuslerp, passthrough, sce, scf, subspace, task_arithmetic
from mergelab.methods.spec import MethodSpec, registry

METHODS: dict[str, MethodSpec] = registry([
    *linear.SPECS,
    *passthrough.SPECS,
    *task_arithmetic.SPECS,
    *geometry.SPECS,
    *sce.SPECS,
    *subspace.SPECS,
    *scf.SPECS,
    *fim.SPECS,
    *nuslerp.SPECS,
])
