"""Weight-space diagnostics of a merge against its base and experts, streamed one tensor name at a time.

Per layer (``"other"`` gathers embeddings, final norm and head) and in total:

* task-vector norms ``||E_i - B||_F`` of every expert and of the merge's own update ``M - B``;
* pairwise cosine of those task vectors, globally and per layer, and per pair the count of layers whose
  cosine is positive, negative or zero within ``sign_tol`` ([InTheWild] Appendix D, Figs. 19-26);
* parameter provenance ([Lin2026] Fig. 7): the fraction of elements of M exactly equal to the base, else to
  expert 1, else to expert 2, ..., else to neither (the first match wins, so an element where an expert
  left the base unchanged counts as base). Compared in M's own dtype, the parents rounded to it: a bfloat16
  merge of float32 parents can never equal them bit for bit, so a float64 comparison would call nearly
  every element "neither". An update smaller than M's rounding then counts as its parent's;
* update sparsity: the fraction of elements of M (and of each expert) equal to the base, M's again against the
  base rounded to M's dtype (as is M's own task vector ``M - B``, so the base's rounding is not an update);
* for every 2-D matrix inside the layer stack: principal angles between the top-k left singular subspaces of
  M and of each parent ([Lin2026] Figs. 3 and 6; ``cos theta_i`` are the singular values of
  ``U_M[:, :k]^T U_P[:, :k]``), and the normalised spectral shift
  ``NSS = ||sigma(M) - sigma(P)||_2 / ||sigma(P)||_2`` ([Lin2026] Corollary A.1) against each parent;
* the full singular spectra (and principal-angle curves) of the matrices of chosen layers (Fig. 5).

Only one tensor of each model is in memory at a time; sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergelab.checkpoint.layout import layer_index, num_layers
from mergelab.checkpoint.reader import ModelReader, open_model
from mergelab.errors import CompatibilityError

OTHER = "other"
RESERVED_LABELS = ("base", "merged", "neither")


def model_labels(experts: Sequence[str | Path]) -> list[str]:
    """Short unique labels for the experts: their folder names, suffixed with #i when two share a name or
    the name is one of the reserved labels (base, merged, neither)."""
    names = [Path(e).name for e in experts]
    return [f"{n}#{i}" if names.count(n) > 1 or n in RESERVED_LABELS else n for i, n in enumerate(names)]


def check_compatible(merged: ModelReader, parents: Sequence[ModelReader]) -> list[str]:
    """The floating-point tensor names shared by all models; CompatibilityError naming the first mismatch."""
    names = [n for n in merged.names if merged.dtype(n).is_floating_point]
    for parent in parents:
        missing = sorted(set(names) - set(parent.names))
        if missing:
            raise CompatibilityError(
                f"{parent.folder} has no tensor '{missing[0]}' that {merged.folder} has: diagnose needs "
                "parents of the merged model's architecture."
            )
        for name in names:
            if parent.shape(name) != merged.shape(name):
                raise CompatibilityError(
                    f"tensor '{name}' is {list(merged.shape(name))} in {merged.folder} but "
                    f"{list(parent.shape(name))} in {parent.folder}: "
                    "diagnose needs models of one architecture."
                )
    return names


def principal_angles(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees, ascending, between the column spaces of orthonormal ``u_a`` and ``u_b``.

    ``cos theta_i = sigma_i(U_a^T U_b)`` (Björck and Golub 1973); angles below 45 degrees are taken from the
    sines ``sigma(U_b - U_a U_a^T U_b)`` instead, where arccos loses precision.
    """
    projection = u_a.T @ u_b
    cosines = torch.linalg.svdvals(projection).clamp(0.0, 1.0)  # descending: angles ascending
    sines = torch.linalg.svdvals(u_b - u_a @ projection).clamp(0.0, 1.0).flip(0)
    angles = torch.where(cosines**2 <= 0.5, torch.arccos(cosines), torch.arcsin(sines[: cosines.numel()]))
    return torch.rad2deg(angles)


def normalised_spectral_shift(sigma: torch.Tensor, sigma_parent: torch.Tensor) -> float:
    """NSS = ||sigma(W_f) - sigma(W_p)||_2 / ||sigma(W_p)||_2 ([Lin2026] Corollary A.1)."""
    return float(torch.linalg.vector_norm(sigma - sigma_parent) / torch.linalg.vector_norm(sigma_parent))


def layer_key(name: str) -> str:
    index = layer_index(name)
    return OTHER if index is None else str(index)


def weight_diagnostics(
    merged: str | Path,
    base: str | Path,
    experts: Sequence[str | Path],
    *,
    k: int = 16,
    spectra_layers: Sequence[int] | None = None,
    svd: bool = True,
    sign_tol: float = 1e-6,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """All weight-space diagnostics of ``merged`` against ``base`` and ``experts`` (see the module doc).

    ``k``: dimension of the singular subspaces compared; ``spectra_layers``: layers whose full singular
    spectra are kept (default: the middle layer); ``svd=False`` skips angles, NSS and spectra (the costly
    part).
    """
    readers = [open_model(merged), open_model(base), *(open_model(e) for e in experts)]
    names = check_compatible(readers[0], readers[1:])
    labels = model_labels(experts)
    vectors = [*labels, "merged"]  # task vectors: each expert's and the merge's own update
    parents = ["base", *labels]
    depth = num_layers(readers[0].config)
    keep_layers = {str(x) for x in (spectra_layers if spectra_layers is not None else [depth // 2])}

    sq = defaultdict(lambda: defaultdict(float))  # vector -> layer -> sum of squares
    dot = defaultdict(lambda: defaultdict(float))  # (a, b) -> layer -> dot product
    elements: dict[str, int] = defaultdict(int)
    provenance = defaultdict(lambda: defaultdict(int))  # source -> layer -> count
    unchanged = defaultdict(lambda: defaultdict(int))  # vector -> layer -> elements equal to base
    matrices: list[dict[str, Any]] = []
    spectra: dict[str, dict[str, Any]] = {}

    compared_in: set[torch.dtype] = set()
    parents_rounded = False
    for name in tqdm(names, desc="weights", disable=not progress):
        layer = layer_key(name)
        stored = [r.get(name) for r in readers]
        m, b, *es = (t.to(device=device, dtype=torch.float64) for t in stored)
        # provenance and the merge's own update in the merged model's dtype: the parents rounded to it
        out_dtype = stored[0].dtype
        compared_in.add(out_dtype)
        parents_rounded |= any(t.dtype != out_dtype and _narrower(out_dtype, t.dtype) for t in stored[1:])
        b_out, *es_out = (t.to(out_dtype).to(device=device, dtype=torch.float64) for t in stored[1:])
        deltas = [e - b for e in es] + [m - b_out]
        flat = [d.reshape(-1) for d in deltas]
        for i, a in enumerate(vectors):
            sq[a][layer] += float(flat[i] @ flat[i])
            for j in range(i + 1, len(vectors)):
                dot[(a, vectors[j])][layer] += float(flat[i] @ flat[j])
            unchanged[a][layer] += int((deltas[i] == 0).sum())
        elements[layer] += m.numel()
        claimed = m == b_out
        provenance["base"][layer] += int(claimed.sum())
        for label, e in zip(labels, es_out, strict=True):
            hit = (m == e) & ~claimed
            provenance[label][layer] += int(hit.sum())
            claimed |= hit
        provenance["neither"][layer] += int((~claimed).sum())
        if svd and m.ndim == 2 and layer != OTHER:
            matrices.append(_matrix_geometry(name, layer, m, [b, *es], parents, k, layer in keep_layers, spectra))

    layers = sorted((x for x in elements if x != OTHER), key=int) + ([OTHER] if OTHER in elements else [])
    norms = {
        a: {"total": math.sqrt(sum(sq[a].values())), "per_layer": {x: math.sqrt(sq[a][x]) for x in layers}}
        for a in vectors
    }
    cosine = {
        "labels": vectors,
        "global": _cosine_matrix(vectors, sq, dot, None),
        "per_layer": {x: _cosine_matrix(vectors, sq, dot, x) for x in layers},
    }
    sign_counts = {}
    for i, a in enumerate(vectors):
        for j in range(i + 1, len(vectors)):
            per = [cosine["per_layer"][x][i][j] for x in layers if x != OTHER]
            sign_counts[f"{a}|{vectors[j]}"] = {
                "positive": sum(c > sign_tol for c in per),
                "negative": sum(c < -sign_tol for c in per),
                "zero": sum(abs(c) <= sign_tol for c in per),
            }
    total = sum(elements.values())
    sources = ["base", *labels, "neither"]
    return {
        "models": {
            "merged": str(merged),
            "base": str(base),
            "experts": dict(zip(labels, map(str, experts), strict=True)),
        },
        "layers": layers,
        "elements": {"total": total, "per_layer": dict(elements)},
        "task_vector_norm": norms,
        "cosine": cosine,
        "sign_counts": sign_counts,
        "provenance": {
            "compared_in": ", ".join(sorted(str(d).removeprefix("torch.") for d in compared_in)),
            "parents_rounded": parents_rounded,
            "total": {s: sum(provenance[s].values()) / total for s in sources},
            "per_layer": {x: {s: provenance[s][x] / elements[x] for s in sources} for x in layers},
        },
        "update_sparsity": {
            a: {
                "total": sum(unchanged[a].values()) / total,
                "per_layer": {x: unchanged[a][x] / elements[x] for x in layers},
            }
            for a in vectors
        },
        "matrices": matrices,
        "per_layer_max_angle": _per_layer(matrices, parents, "max_angle_deg", max),
        "per_layer_nss": _per_layer(matrices, parents, "nss", lambda v: sum(v) / len(v)),
        "spectra": spectra,
        "settings": {"k": k, "svd": svd, "spectra_layers": sorted(keep_layers), "sign_tol": sign_tol},
    }


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether casting ``than`` to ``dtype`` can round (fewer mantissa or exponent bits)."""
    a, b = torch.finfo(dtype), torch.finfo(than)
    return a.eps > b.eps or a.max < b.max


def _matrix_geometry(
    name: str,
    layer: str,
    merged: torch.Tensor,
    parent_tensors: Sequence[torch.Tensor],
    parents: Sequence[str],
    k: int,
    keep: bool,
    spectra: dict[str, Any],
) -> dict[str, Any]:
    """Principal angles (top-k left singular subspaces) and NSS of one matrix against each parent."""
    u_m, s_m, _ = torch.linalg.svd(merged, full_matrices=False)
    rank = min(k, s_m.numel())
    row: dict[str, Any] = {"name": name, "layer": layer, "max_angle_deg": {}, "mean_angle_deg": {}, "nss": {}}
    kept: dict[str, Any] = {"merged": s_m.tolist(), "angles_deg": {}}
    for label, tensor in zip(parents, parent_tensors, strict=True):
        u_p, s_p, _ = torch.linalg.svd(tensor, full_matrices=False)
        angles = principal_angles(u_m[:, :rank], u_p[:, :rank])
        row["max_angle_deg"][label] = float(angles.max())
        row["mean_angle_deg"][label] = float(angles.mean())
        row["nss"][label] = normalised_spectral_shift(s_m, s_p)
        kept[label] = s_p.tolist()
        kept["angles_deg"][label] = angles.tolist()
    if keep:
        spectra[name] = kept
    return row


def _cosine_matrix(vectors: list[str], sq, dot, layer: str | None) -> list[list[float]]:
    """Cosine of every pair of task vectors over one layer (or all tensors); NaN where a vector is zero."""

    def total(table) -> float:
        return sum(table.values()) if layer is None else table[layer]

    out = [[1.0] * len(vectors) for _ in vectors]
    for i, a in enumerate(vectors):
        for j in range(i + 1, len(vectors)):
            denom = math.sqrt(total(sq[a]) * total(sq[vectors[j]]))
            out[i][j] = out[j][i] = total(dot[(a, vectors[j])]) / denom if denom > 0 else math.nan
    return out


def _per_layer(matrices: list[dict[str, Any]], parents: Sequence[str], key: str, reduce) -> dict[str, Any]:
    """Reduce one per-matrix figure over the matrices of each layer, per parent."""
    out: dict[str, dict[str, float]] = {p: {} for p in parents}
    for parent in parents:
        by_layer: dict[str, list[float]] = defaultdict(list)
        for row in matrices:
            by_layer[row["layer"]].append(row[key][parent])
        out[parent] = {x: reduce(v) for x, v in by_layer.items()}
    return out
