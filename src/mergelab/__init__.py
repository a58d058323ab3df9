"""mergelab: merge fine-tuned models in weight space and measure whether the merge is any good.

``mergelab.merge(recipe, out_dir, **options)`` is the Python entry point (``mergelab.api.merge``); it is
imported on first use, so ``import mergelab`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "merge":
        from mergelab.api import merge

        return merge
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")
