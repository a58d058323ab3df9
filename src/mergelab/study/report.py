"""Report pieces shared by the demo and the studies: markdown tables and bar plots, each plot captioned with the
command that made it. Numbers come from the results passed in; nothing is typed by hand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergelab.document import Table, markdown_table


def fmt(value: Any) -> str:
    """A table cell: percentages for fractions, '-' for missing values."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


# how a table column is shown: fractions as percentages, plain numbers, signed percentages, or as they are
KINDS = ("pct", "num", "signed_pct", "text")


def cell(value: Any, kind: str) -> str:
    """One table cell of ``kind`` (see ``KINDS``); None is '-'."""
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "signed_pct":
        return f"{100 * value:+.1f}"
    if kind == "num":
        return f"{value:.4g}"
    return str(value)


def table(title: str, header: Sequence[str], kinds: Sequence[str], rows: Sequence[Sequence[Any]],
          note: str = "") -> dict[str, Any]:
    """A report table as JSON-ready data: the report renders it with ``render_table`` and nothing else."""
    if len(kinds) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"table {title!r}: header, kinds and rows must have the same width")
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"table {title!r}: unknown column kinds {sorted(unknown)}")
    return {"title": title, "header": list(header), "kinds": list(kinds), "rows": [list(r) for r in rows],
            "note": note}


def table_block(data: dict[str, Any], command: str = "") -> Table:
    """A ``table`` dict as a report block, each cell formatted by its column's kind."""
    rows = [[cell(v, k) for v, k in zip(row, data["kinds"], strict=True)] for row in data["rows"]]
    return Table(list(data["header"]), rows, command=command, note=data.get("note", ""))


def render_table(data: dict[str, Any]) -> str:
    """Markdown for a ``table`` dict."""
    return markdown_table(table_block(data))


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]], command: str = "") -> Table:
    """A report block whose cells are formatted by ``fmt`` (fractions as percentages)."""
    return Table(list(header), [[fmt(c) for c in row] for row in rows], command=command)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table in fixed-width text, for the terminal."""
    cells = [list(header)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def bar_plot(path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[float | None]],
             ylabel: str, command: str) -> Path:
    """Grouped bars: one group per x label, one bar per series; the caption names the command."""
    plt, fig, ax = new_figure(max(6, 0.9 * len(groups) * max(1, len(series)) / 2), 4)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [100 * (v or 0.0) for v in values], width=width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path, command)


def new_figure(width: float, height: float):
    """(pyplot, figure, axes) on the non-interactive backend; finish with ``save_figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def label_axes(ax, title: str, xlabel: str, ylabel: str, legend_columns: int = 0) -> None:
    """Title, axis labels and a light grid; a legend in ``legend_columns`` columns when that is not 0."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_columns:
        ax.legend(fontsize=7, ncol=legend_columns)


def save_figure(plt, fig, path: Path, command: str) -> Path:
    """Caption ``fig`` with the command that made it, save it to ``path`` and close it."""
    fig.text(0.01, 0.01, f"made by: {command}", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(path: Path, title: str, x: Sequence[float], series: dict[str, Sequence[float | None]], xlabel: str,
              ylabel: str, command: str, percent: bool = True) -> Path:
    """One line per series over ``x`` (missing points skipped); fractions shown as percentages."""
    plt, fig, ax = new_figure(6.5, 4)
    scale = 100 if percent else 1
    colours = plt.get_cmap("tab20").colors
    for i, (name, values) in enumerate(series.items()):  # tab20 and cycling markers: up to 20 distinct lines
        points = [(xi, scale * v) for xi, v in zip(x, values) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="osD^v<>ph*"[i % 10],
                color=colours[i % len(colours)], label=name)
    label_axes(ax, title, xlabel, ylabel, legend_columns=2)
    return save_figure(plt, fig, path, command)


def heatmap(path: Path, title: str, labels: Sequence[str], matrix: Sequence[Sequence[float]], command: str,
            cbar: str = "") -> Path:
    """A labelled square matrix (pairwise cosines and the like), values written in the cells."""
    plt, fig, ax = new_figure(1.2 + 0.55 * len(labels), 1 + 0.5 * len(labels))
    image = ax.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label=cbar)
    ax.set_title(title)
    return save_figure(plt, fig, path, command)


def scatter_plot(path: Path, title: str, points: dict[str, Sequence[float]], xlabel: str, ylabel: str,
                 command: str) -> Path:
    """Labelled points ``name -> (x, y)``; y is a fraction shown as a percentage."""
    plt, fig, ax = new_figure(6.5, 4.5)
    for name, (x, y) in points.items():
        ax.scatter([x], [100 * y])
        ax.annotate(name, (x, 100 * y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    label_axes(ax, title, xlabel, ylabel)
    return save_figure(plt, fig, path, command)
