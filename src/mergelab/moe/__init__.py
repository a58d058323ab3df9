"""``mergelab moe``: a Mixtral-style sparse model assembled from one dense base and dense expert fine-tunes."""
