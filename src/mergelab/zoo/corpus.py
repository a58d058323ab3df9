"""Local training text: Python documentation prose (Debian ``python3.11-doc``), standard-library code, Debian
manual pages (``/usr/share/man/man1``, as plain text) and Debian copyright files (``/usr/share/doc/*/copyright``)."""

from __future__ import annotations

import gzip
import re
import sysconfig
from pathlib import Path

from mergelab.errors import MergelabError

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
MAN_PAGES = Path("/usr/share/man/man1")
COPYRIGHT_FILES = Path("/usr/share/doc")
LEGAL_CHARS_PER_FILE = 8_000
ROFF_FONT = re.compile(r"\\f(?:\[[^]]*\]|\(..|.)")  # \fB, \f(CW, \f[I]
ROFF_ESCAPE = re.compile(r"\\[,/&:%]")


def _read_until(files: list[Path], max_chars: int, per_file: int | None = None) -> list[str]:
    docs, total = [], 0
    for file in files:
        if total >= max_chars:
            break
        text = file.read_text(encoding="utf-8", errors="replace")[:per_file][: max_chars - total]
        docs.append(text)
        total += len(text)
    return docs


def prose(max_chars: int, sources: Path = DOC_SOURCES) -> list[str]:
    """reST sources of the Python documentation, file by file in sorted order, up to ``max_chars`` in all."""
    files = sorted(sources.rglob("*.rst.txt")) if sources.is_dir() else []
    if not files:
        raise MergelabError(
            f"No Python documentation sources under {sources}; install the Debian package "
            "python3.11-doc (apt-get install python3.11-doc)."
        )
    return _read_until(files, max_chars)


def code(max_chars: int) -> list[str]:
    """Top-level standard-library modules of the running Python, sorted by name, up to ``max_chars``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise MergelabError(
            f"No standard-library sources under {stdlib}; install the Python standard library "
            "sources (Debian package libpython3.11-stdlib)."
        )
    return _read_until(files, max_chars)


def roff_text(source: str) -> str:
    """A manual page's roff source as plain text: comment lines dropped, the arguments of macro lines kept
    (``.SH NAME`` -> ``NAME``), font and zero-width escapes removed, ``\\-`` and ``\\(em`` as dashes."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            line = line.split(" ", 1)[1] if " " in line else ""
        line = ROFF_ESCAPE.sub("", ROFF_FONT.sub("", line)).replace("\\-", "-").replace("\\(em", "--")
        if line.strip():
            lines.append(line.strip('"'))
    return "\n".join(lines)


def manpages(max_chars: int, sources: Path = MAN_PAGES) -> list[str]:
    """Section-1 manual pages installed on this Debian system (each under its package's DFSG-free licence),
    sorted by file name, as plain text (``roff_text``), up to ``max_chars`` in all; ``.so`` aliases skipped."""
    files = sorted(sources.glob("*.gz")) if sources.is_dir() else []
    texts, total = [], 0
    for file in files:
        if total >= max_chars:
            break
        try:
            source = gzip.decompress(file.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        if not source.startswith(".so "):
            texts.append(roff_text(source)[: max_chars - total])
            total += len(texts[-1])
    if not texts:
        raise MergelabError(f"No manual pages under {sources}; install the Debian package man-db (and its pages).")
    return texts


def legal(max_chars: int, sources: Path = COPYRIGHT_FILES, per_file: int = LEGAL_CHARS_PER_FILE) -> list[str]:
    """Debian copyright files (``/usr/share/doc/PACKAGE/copyright``: copyright statements, licence grants and
    licence texts), sorted by package, the first ``per_file`` characters of each (so that a few files quoting
    whole licences do not fill the corpus), up to ``max_chars`` in all."""
    files = sorted(p for p in sources.glob("*/copyright") if p.is_file())
    if not files:
        raise MergelabError(f"No Debian copyright files under {sources}/*/copyright; this corpus needs Debian.")
    return _read_until(files, max_chars, per_file)

