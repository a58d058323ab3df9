"""Write diagnostics to a folder: ``diagnostics.json``, PNG plots (matplotlib, Agg), ``summary.md`` and the
self-contained ``report.html`` (both rendered from one ``document.Report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mergelab import document
from mergelab.citations import FIM_MERGING, SCF_RKL, cite
from mergelab.document import Figure, Heading, Paragraph, Report, Table

DEFAULT_COMMAND = "mergelab.diagnostics.cli.diagnose (Python)"


def write_report(results: dict[str, Any], out_dir: str | Path, command: str = DEFAULT_COMMAND) -> list[Path]:
    """Write the JSON, every plot the results allow, the markdown summary and the HTML page; return the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "diagnostics.json"
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable, allow_nan=True))
    plots = _plots(results, out)
    pages = document.write(summary_report(results, plots, command), out, md_name="summary.md")
    return [json_path, *(out / name for name, _ in plots), *pages]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = "osD^v<>p*h"


def series_style(i: int) -> dict[str, Any]:
    """Marker, line style and width of the i-th series: overlapping lines stay distinguishable (a line drawn
    exactly over another still shows its markers and dashes)."""
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "markersize": 7 - 1.5 * (i % 3), "linewidth": 1.5, "alpha": 0.85}


def _layer_axis(ax, ylabel: str) -> None:
    """Integer layer ticks, an x and a y label, a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _plots(results: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Draw every plot the results allow; return (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append((name, caption))

    weights = results.get("weights")
    if weights:
        layers = [int(x) for x in weights["layers"] if x != "other"]
        keys = [str(x) for x in layers]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for i, (label, norm) in enumerate(weights["task_vector_norm"].items()):
            axes[0].plot(layers, [norm["per_layer"][x] for x in keys], label=label, **series_style(i))
        axes[0].set_title("task-vector norm per layer")
        _layer_axis(axes[0], "||delta||_F")
        sources = list(weights["provenance"]["total"])
        bottom = [0.0] * len(layers)
        for source in sources:
            values = [weights["provenance"]["per_layer"][x][source] for x in keys]
            axes[1].bar(layers, values, bottom=bottom, label=source)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        axes[1].set_title(f"parameter provenance ({cite(SCF_RKL, 'Fig. 7')})", fontsize=9)
        _layer_axis(axes[1], f"fraction (compared in {weights['provenance'].get('compared_in', '?')})")
        for i, (label, sparsity) in enumerate(weights["update_sparsity"].items()):
            axes[2].plot(layers, [sparsity["per_layer"][x] for x in keys], label=label, **series_style(i))
        axes[2].set_title("update sparsity")
        _layer_axis(axes[2], "fraction equal to base")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "weights_layers.png", "task-vector norms, parameter provenance and update sparsity per layer")

        labels = weights["cosine"]["labels"]
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
        image = ax.imshow(weights["cosine"]["global"], vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title("task-vector cosine")
        fig.colorbar(image)
        save(fig, "cosine.png", "cosine of every pair of task vectors")

        if weights["matrices"]:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for i, (parent, per_layer) in enumerate(weights["per_layer_max_angle"].items()):
                axes[0].plot(layers, [per_layer.get(x, math.nan) for x in keys], label=parent, **series_style(i))
            axes[0].set_title(f"max principal angle, top-{weights['settings']['k']} ({cite(SCF_RKL, 'Fig. 6')})",
                              fontsize=9)
            _layer_axis(axes[0], "degrees")
            for i, (parent, per_layer) in enumerate(weights["per_layer_nss"].items()):
                axes[1].plot(layers, [per_layer.get(x, math.nan) for x in keys], label=parent, **series_style(i))
            axes[1].set_title(f"normalised spectral shift ({cite(SCF_RKL, 'Cor. A.1')})", fontsize=9)
            axes[1].set_yscale("log")
            _layer_axis(axes[1], "NSS")
            for ax in axes:
                ax.legend(fontsize=7)
            save(fig, "geometry.png", "rotation and spectral shift of the merged matrices against each parent")
        for name, spectrum in weights["spectra"].items():
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for i, (label, values) in enumerate((k, v) for k, v in spectrum.items() if k != "angles_deg"):
                axes[0].plot(values, label=label, **{**series_style(i), "markersize": 3})
            axes[0].set(title=f"singular values: {name}", xlabel="index", ylabel="singular value", yscale="log")
            for i, (label, values) in enumerate(spectrum["angles_deg"].items()):
                axes[1].plot(values, label=f"merged vs {label}", **{**series_style(i), "markersize": 3})
            axes[1].set_title(f"principal angles ({cite(SCF_RKL, 'Fig. 3')})", fontsize=9)
            axes[1].set(xlabel="index", ylabel="degrees")
            for ax in axes:
                ax.legend(fontsize=7)
            save(fig, f"spectrum_{name.replace('.', '_')}.png", f"singular spectra and principal angles of {name}")

    activations = results.get("activations")
    if activations:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        ylabels = {"variance": "mean activation variance", "effective_rank": "effective rank",
                   "numerical_rank": "numerical rank"}
        for i, (label, entry) in enumerate(activations["models"].items()):
            for ax, key in zip(axes, ylabels, strict=True):
                values = entry["per_layer"][key]
                ax.plot(range(len(values)), values, label=label, **series_style(i))
        for ax, (key, ylabel) in zip(axes, ylabels.items(), strict=True):
            ax.set_title(f"activation {key.replace('_', ' ')}")
            _layer_axis(ax, ylabel)
            ax.legend(fontsize=7)
        save(fig, "activations.png", "activation variance, effective and numerical rank per layer")
        if activations["nl_score"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for i, (label, per_layer) in enumerate(activations["nl_score"].items()):
                ax.plot([int(x) for x in per_layer], list(per_layer.values()), label=label, **series_style(i))
            ax.set_title(f"NL score per layer ({cite(FIM_MERGING, 'eq. 19')})", fontsize=8)
            _layer_axis(ax, "NL score")
            ax.legend(fontsize=7)
            save(fig, "nl_score.png", "non-linearity score of each update per layer")

    blocking = results.get("layer_blocking")
    if blocking:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([int(x) for x in blocking["score_change"]], list(blocking["score_change"].values()))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"score change when a layer is restored to base ({blocking['task']})")
        _layer_axis(ax, "score change")
        save(fig, "layer_blocking.png", f"layer blocking ({cite(SCF_RKL, 'appendix A.4')})")
    return written


def summary_report(results: dict[str, Any], plots: list[tuple[str, str]], command: str) -> Report:
    """The human summary (headline figures, tables, plots), rendered to summary.md and report.html."""
    report = Report("Merge diagnostics").add(Paragraph(f"Made by `{command}`; every number is read from "
                                                        "[diagnostics.json](diagnostics.json)."))
    weights = results.get("weights")
    if weights:
        models = weights["models"]
        rows = [["merged", models["merged"]], ["base", models["base"]]]
        rows += [[f"expert `{label}`", path] for label, path in models["experts"].items()]
        report.add(Table(["model", "folder"], rows))
        report.add(Heading("Weight space"), Table(
            ["vector", "task-vector norm", "fraction equal to base"],
            [[label, f"{norm['total']:.4g}", f"{weights['update_sparsity'][label]['total']:.3f}"]
             for label, norm in weights["task_vector_norm"].items()], command))
        provenance = weights["provenance"]
        report.add(Paragraph(
            f"Provenance of the merged parameters ({cite(SCF_RKL, 'Fig. 7')}), compared in "
            f"{provenance['compared_in']}, the merged model's dtype"
            + (" (the parents rounded to it, so an update smaller than the rounding counts as the parent's)"
               if provenance.get("parents_rounded") else "")
            + ": " + ", ".join(f"{s} {v:.1%}" for s, v in provenance["total"].items())))
        labels = weights["cosine"]["labels"]
        report.add(Paragraph("Task-vector cosine (global):"), Table(
            ["", *labels], [[label, *(f"{c:.3f}" for c in row)]
                            for label, row in zip(labels, weights["cosine"]["global"], strict=True)], command))
        report.add(Paragraph(
            "Layers with positive / negative / zero cosine per pair: "
            + "; ".join(f"{k}: {v['positive']}/{v['negative']}/{v['zero']}"
                        for k, v in weights["sign_counts"].items())))
        if weights["matrices"]:
            report.add(Paragraph(f"Largest principal angle (top-{weights['settings']['k']} left singular subspaces) "
                                 "and mean NSS over layers:"), Table(
                ["parent", "max angle (deg)", "mean NSS"],
                [[parent, f"{max(per_layer.values()):.2f}",
                  f"{_mean(list(weights['per_layer_nss'][parent].values())):.3g}"]
                 for parent, per_layer in weights["per_layer_max_angle"].items()], command))
    activations = results.get("activations")
    if activations:
        probes = activations["probes"]
        report.add(Heading("Function space"),
                   Paragraph(f"{probes['n']} {probes['kind']} probes of {probes['length']} tokens."), Table(
            ["model", "next-token entropy", "KL(parent‖merged)", "KL(merged‖parent)", "mean eff. rank"],
            [[label, f"{entry['next_token_entropy']:.4f}", _f(entry.get("kl_parent_to_merged")),
              _f(entry.get("kl_merged_to_parent")), f"{_mean(entry['per_layer']['effective_rank']):.2f}"]
             for label, entry in activations["models"].items()], command))
        for label, per_layer in activations["nl_score"].items():
            values = [v for v in per_layer.values() if not math.isnan(v)]
            if values:
                report.add(Paragraph(f"NL score of `{label}`'s update: mean {_mean(values):.4f} over {len(values)} "
                                     f"layers ({cite(FIM_MERGING, 'eq. 19')})."))
    blocking = results.get("layer_blocking")
    if blocking:
        changes = blocking["score_change"]
        worst = min(changes, key=changes.get)
        report.add(Heading(f"Layer blocking ({cite(SCF_RKL, 'appendix A.4')})"), Paragraph(
            f"Task `{blocking['task']}`: merged score {blocking['merged_score']:.3f}; restoring layer {worst} to "
            f"base changes it most ({changes[worst]:+.3f})."))
    if plots:
        report.add(Heading("Plots"), *(Figure(name, caption, command) for name, caption in plots))
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
