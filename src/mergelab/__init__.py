"""mergelab: merge fine-tuned models in weight space and measure whether the merge is any good."""

__version__ = "0.1.0"
