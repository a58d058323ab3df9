"""Where a recipe's output will differ from mergekit 0.1.5's when run without ``--compat mergekit``, and why:
one line per place, printed by ``mergelab merge`` and ``mergelab check``. The sizes quoted are the ones measured
on the tiny test models (README, "Coming from mergekit")."""

from __future__ import annotations

from mergelab.config import Recipe
from mergelab.mergekit_compat import MERGEKIT_PARAMS
from mergelab.mergekit_task_vectors import ELECTING

RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")


def _parameter_names(recipe: Recipe) -> set[str]:
    scopes = [recipe.parameters, *[e.parameters for e in recipe.models or []]]
    for out_slice in recipe.slices or []:
        scopes += [out_slice.parameters, *[s.parameters for s in out_slice.sources]]
    return {name for scope in scopes if scope for name in scope}


def _weights(recipe: Recipe) -> list[object]:
    entries = list(recipe.models or []) + [s for sl in recipe.slices or [] for s in sl.sources]
    return [(e.parameters or {}).get("weight", (recipe.parameters or {}).get("weight", 1.0)) for e in entries]


def differences(recipe: Recipe) -> list[str]:
    """One sentence per difference from mergekit 0.1.5 this recipe's output will show (none under compat)."""
    method = recipe.merge_method
    if recipe.compat == "mergekit":
        return []
    if method not in MERGEKIT_PARAMS and method != "passthrough":
        return [f"mergekit 0.1.5 has no '{method}' method; there is nothing to compare with"]
    lines = []
    if recipe.dtype in ("bfloat16", "float16") and method != "passthrough":
        lines.append(f"dtype {recipe.dtype}: mergekit computes in {recipe.dtype}, mergelab in float32, so elements "
                     "differ by one or more steps of the output dtype (--compat mergekit computes as mergekit)")
    if method in ELECTING and len({str(w) for w in _weights(recipe)}) > 1:
        lines.append("unequal weights: mergekit elects signs on weighted task vectors, mergelab on raw ones (TIES "
                     "paper); set vote: weighted or use --compat mergekit")
    if method == "karcher" and recipe.base_model:
        lines.append("karcher with base_model: mergekit puts the base into the mean, mergelab leaves it out")
    if method == "arcee_fusion":
        lines.append("arcee_fusion: mergekit reads quantiles at sorted indices (sampling 10^6 elements of larger "
                     "tensors at random) and writes float32 without out_dtype; mergelab's quantiles are exact")
    if method in RANDOM:
        lines.append(f"{method}: random drops; the two tools draw different masks")
    if method == "sce":
        lines.append("sce: mergekit falls back to equal weights below a 1e-6 total task-vector energy, mergelab "
                     "only at exactly zero")
    unknown = sorted(_parameter_names(recipe) - set(MERGEKIT_PARAMS.get(method, ("scale",))))
    if unknown:
        lines.append(f"parameters {', '.join(unknown)}: mergekit ignores them, mergelab applies them")
    if recipe.chat_template in ("llama3", "alpaca"):
        lines.append(f"chat_template {recipe.chat_template}: mergelab follows the published format; mergekit's file "
                     "renders extra newlines")
    tokenizer = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    if tokenizer == "union":
        lines.append("tokenizer union: added tokens get ids in recipe order here, in Python set order in mergekit "
                     "(rows per token agree)")
    return lines
