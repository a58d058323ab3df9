"""Local training text: Python documentation prose (Debian ``python3.11-doc``) and standard-library code."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from mergelab.errors import MergelabError

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def _read_until(files: list[Path], max_chars: int) -> list[str]:
    docs, total = [], 0
    for file in files:
        if total >= max_chars:
            break
        text = file.read_text(encoding="utf-8", errors="replace")[: max_chars - total]
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
