"""Planning: recipe + opened models -> ``MergePlan`` (one ``TensorJob`` per output tensor).

``data`` holds what a plan is (``Source``, ``TensorJob``, ``MergePlan``); ``sources`` the rules both recipe shapes
share (opening and resolving models, counts, tied embeddings, vocabulary rows, parameters and their checks);
``models`` and ``slices`` are the two front-ends; ``build`` chooses between them; ``describe`` prints a plan.
The front-ends are imported from their modules (``mergelab.plan.build.build_plan``), not from here, so that
the method contract can use the plan's data without importing the method registry back.
"""

from mergelab.plan.data import MergePlan, Source, TensorJob

__all__ = ["MergePlan", "Source", "TensorJob"]
