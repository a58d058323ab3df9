"""Write diagnostics to a folder: ``diagnostics.json``, PNG plots (matplotlib, Agg) and ``summary.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_report(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the JSON, every plot the results allow, and the markdown summary; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "diagnostics.json"
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable, allow_nan=True))
    plots = _plots(results, out)
    summary = out / "summary.md"
    summary.write_text(markdown_summary(results, [p.name for p in plots]))
    return [json_path, *plots, summary]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    weights = results.get("weights")
    if weights:
        layers = [x for x in weights["layers"] if x != "other"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for label, norm in weights["task_vector_norm"].items():
            axes[0].plot(layers, [norm["per_layer"][x] for x in layers], marker="o", label=label)
        axes[0].set(title="task-vector norm per layer", xlabel="layer", ylabel="||delta||_F")
        sources = list(weights["provenance"]["total"])
        bottom = [0.0] * len(layers)
        for source in sources:
            values = [weights["provenance"]["per_layer"][x][source] for x in layers]
            axes[1].bar(layers, values, bottom=bottom, label=source)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        axes[1].set(title="parameter provenance (paper 000, Fig. 7)", xlabel="layer", ylabel="fraction")
        for label, sparsity in weights["update_sparsity"].items():
            axes[2].plot(layers, [sparsity["per_layer"][x] for x in layers], marker="o", label=label)
        axes[2].set(title="update sparsity (fraction equal to base)", xlabel="layer")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "weights_layers.png")

        labels = weights["cosine"]["labels"]
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
        image = ax.imshow(weights["cosine"]["global"], vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title("task-vector cosine")
        fig.colorbar(image)
        save(fig, "cosine.png")

        if weights["matrices"]:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for parent, per_layer in weights["per_layer_max_angle"].items():
                axes[0].plot(layers, [per_layer.get(x, math.nan) for x in layers], marker="o", label=parent)
            axes[0].set(
                title=f"max principal angle, top-{weights['settings']['k']} (Fig. 6)",
                xlabel="layer",
                ylabel="degrees",
            )
            for parent, per_layer in weights["per_layer_nss"].items():
                axes[1].plot(layers, [per_layer.get(x, math.nan) for x in layers], marker="o", label=parent)
            axes[1].set(title="normalised spectral shift (Cor. A.1)", xlabel="layer", yscale="log")
            for ax in axes:
                ax.legend(fontsize=7)
            save(fig, "geometry.png")
        for name, spectrum in weights["spectra"].items():
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for label, values in spectrum.items():
                if label != "angles_deg":
                    axes[0].plot(values, label=label)
            axes[0].set(title=f"singular values: {name}", xlabel="index", yscale="log")
            for label, values in spectrum["angles_deg"].items():
                axes[1].plot(values, marker=".", label=f"merged vs {label}")
            axes[1].set(title="principal angles (Fig. 3)", xlabel="index", ylabel="degrees")
            for ax in axes:
                ax.legend(fontsize=7)
            save(fig, f"spectrum_{name.replace('.', '_')}.png")

    activations = results.get("activations")
    if activations:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for label, entry in activations["models"].items():
            for ax, key in zip(axes, ("variance", "effective_rank", "numerical_rank"), strict=True):
                ax.plot(entry["per_layer"][key], marker="o", label=label)
                ax.set(title=f"activation {key.replace('_', ' ')}", xlabel="layer")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "activations.png")
        if activations["nl_score"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, per_layer in activations["nl_score"].items():
                ax.plot([int(x) for x in per_layer], list(per_layer.values()), marker="o", label=label)
            ax.set(title="NL score per layer (paper 004, eq. 19)", xlabel="layer")
            ax.legend(fontsize=7)
            save(fig, "nl_score.png")

    blocking = results.get("layer_blocking")
    if blocking:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([int(x) for x in blocking["score_change"]], list(blocking["score_change"].values()))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"score change when a layer is restored to base ({blocking['task']})", xlabel="layer")
        save(fig, "layer_blocking.png")
    return written


def markdown_summary(results: dict[str, Any], plots: list[str]) -> str:
    """A short human summary: headline figures and links to the plots."""
    lines = ["# Merge diagnostics", ""]
    weights = results.get("weights")
    if weights:
        models = weights["models"]
        lines += [f"- merged: `{models['merged']}`", f"- base: `{models['base']}`"]
        lines += [f"- expert `{label}`: `{path}`" for label, path in models["experts"].items()]
        lines += [
            "",
            "## Weight space",
            "",
            "| vector | task-vector norm | fraction equal to base |",
            "|---|---|---|",
        ]
        for label, norm in weights["task_vector_norm"].items():
            lines.append(f"| {label} | {norm['total']:.4g} | {weights['update_sparsity'][label]['total']:.3f} |")
        lines += [
            "",
            "Provenance of the merged parameters (paper 000, Fig. 7): "
            + ", ".join(f"{s} {v:.1%}" for s, v in weights["provenance"]["total"].items()),
            "",
        ]
        labels = weights["cosine"]["labels"]
        lines += [
            "Task-vector cosine (global):",
            "",
            "| | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for label, row in zip(labels, weights["cosine"]["global"], strict=True):
            lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in row) + " |")
        lines += [
            "",
            "Layers with positive / negative / zero cosine per pair: "
            + "; ".join(f"{k}: {v['positive']}/{v['negative']}/{v['zero']}" for k, v in weights["sign_counts"].items()),
            "",
        ]
        if weights["matrices"]:
            lines.append(
                f"Largest principal angle (top-{weights['settings']['k']} left singular subspaces) and "
                "mean NSS over layers:"
            )
            lines.append("")
            for parent, per_layer in weights["per_layer_max_angle"].items():
                nss = list(weights["per_layer_nss"][parent].values())
                lines.append(
                    f"- vs {parent}: max angle {max(per_layer.values()):.2f} deg, mean NSS {sum(nss) / len(nss):.3g}"
                )
            lines.append("")
    activations = results.get("activations")
    if activations:
        probes = activations["probes"]
        lines += [
            "## Function space",
            "",
            f"{probes['n']} {probes['kind']} probes of {probes['length']} tokens.",
            "",
            "| model | next-token entropy | KL(parent‖merged) | KL(merged‖parent) | mean eff. rank |",
            "|---|---|---|---|---|",
        ]
        for label, entry in activations["models"].items():
            ranks = entry["per_layer"]["effective_rank"]
            lines.append(
                f"| {label} | {entry['next_token_entropy']:.4f} | {_f(entry.get('kl_parent_to_merged'))} | "
                f"{_f(entry.get('kl_merged_to_parent'))} | {sum(ranks) / len(ranks):.2f} |"
            )
        for label, per_layer in activations["nl_score"].items():
            values = [v for v in per_layer.values() if not math.isnan(v)]
            if values:
                lines.append(
                    f"\nNL score of `{label}`'s update: mean {sum(values) / len(values):.4f} over "
                    f"{len(values)} layers (paper 004, eq. 19)."
                )
        lines.append("")
    blocking = results.get("layer_blocking")
    if blocking:
        changes = blocking["score_change"]
        worst = min(changes, key=changes.get)
        lines += [
            "## Layer blocking (paper 000, A.4)",
            "",
            f"Task `{blocking['task']}`: merged score {blocking['merged_score']:.3f}; "
            f"restoring layer {worst} to base changes it most ({changes[worst]:+.3f}).",
            "",
        ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
