"""Merge methods by recipe name: each family's module declares its methods in ``SPECS``; the table is built
here, explicitly, so that what exists is visible in one place. A new method is one module plus one line here."""

from mergelab.methods import (
    fim,
    karcher,
    linear,
    model_stock,
    multislerp,
    nuslerp,
    passthrough,
    sce,
    scf,
    slerp,
    subspace,
    task_arithmetic,
)
from mergelab.methods.spec import MethodSpec, registry

METHODS: dict[str, MethodSpec] = registry([
    *linear.SPECS,
    *passthrough.SPECS,
    *task_arithmetic.SPECS,
    *karcher.SPECS,
    *slerp.SPECS,
    *multislerp.SPECS,
    *model_stock.SPECS,
    *sce.SPECS,
    *subspace.SPECS,
    *scf.SPECS,
    *fim.SPECS,
    *nuslerp.SPECS,
])
