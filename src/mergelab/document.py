"""One report, two renderings: ``report.md`` beside its PNG files, and a self-contained ``report.html``.

A report is a title and a list of blocks (headings, paragraphs, tables, figures) built once from the results;
``markdown`` and ``html`` only lay the same blocks out, so the two files cannot disagree. The HTML page embeds
every figure as a base64 PNG (it can be mailed or attached on its own) and says under each table and figure
which command made it. Paragraphs may hold inline ```code``` and ``[label](target)`` links; everything else is
escaped.
"""

from __future__ import annotations

import base64
import html as html_lib
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    """Cells already formatted as text; ``command``: what made the numbers (shown under the table)."""

    header: list[str]
    rows: list[list[str]]
    command: str = ""
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG in the report's folder."""

    file: str
    caption: str
    command: str = ""


@dataclass
class Report:
    title: str
    blocks: list[Heading | Paragraph | Bullets | Table | Figure] = field(default_factory=list)

    def add(self, *blocks: Heading | Paragraph | Bullets | Table | Figure) -> Report:
        self.blocks.extend(blocks)
        return self


def markdown_table(table: Table) -> str:
    """A pipe table: header, ``|---|`` rule, one line per row."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """The report as GitHub markdown (figures linked by file name)."""
    lines = [f"# {report.title}", ""]
    for block in report.blocks:
        if isinstance(block, Heading):
            lines += ([f'<a id="{block.anchor}"></a>', ""] if block.anchor else []) + [f"## {block.text}", ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += [markdown_table(block), ""]
            lines += [block.note, ""] if block.note else []
            lines += [f"Made by `{block.command}`.", ""] if block.command else []
        else:
            lines += [f"![{block.caption}]({block.file})", ""]
            lines += [f"Made by `{block.command}`.", ""] if block.command else []
    return "\n".join(lines)


STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.made{color:#666;font-size:.85em}code{background:#f4f4f4;padding:0 .2em}figure{margin:1em 0}"""


def inline_html(text: str) -> str:
    """Escaped text with ```code``` and ``[label](target)`` turned into elements."""
    out = []
    for i, part in enumerate(text.split("`")):
        if i % 2:
            out.append(f"<code>{html_lib.escape(part)}</code>")
        else:
            escaped = html_lib.escape(part)
            out.append(re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped))
    return "".join(out)


def _made_by(command: str) -> str:
    return f'<p class="made">Made by <code>{html_lib.escape(command)}</code>.</p>' if command else ""


def html(report: Report, folder: Path) -> str:
    """The report as one HTML page; figures are read from ``folder`` and embedded as base64 PNG."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html_lib.escape(report.title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html_lib.escape(report.title)}</h1>"]
    for block in report.blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html_lib.escape(block.anchor)}"' if block.anchor else ""
            parts.append(f"<h2{anchor}>{inline_html(block.text)}</h2>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{inline_html(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            parts.append(f"<p>{inline_html(block.note)}</p>" if block.note else "")
            parts.append(_made_by(block.command))
        else:
            data = base64.b64encode((folder / block.file).read_bytes()).decode()
            caption = html_lib.escape(block.caption)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>{_made_by(block.command)}")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write(report: Report, folder: Path, md_name: str = "report.md",
          html_name: str = "report.html") -> tuple[Path, Path]:
    """Write the markdown and the HTML page into ``folder`` (which holds the figures); return both paths."""
    md_path, html_path = folder / md_name, folder / html_name
    md_path.write_text(markdown(report))
    html_path.write_text(html(report, folder))
    return md_path, html_path
