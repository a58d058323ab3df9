"""How user-facing text (help, report captions, plot titles) cites the papers: author, year, section.

Docstrings cite by the keys of ``docs/PAPERS.md``; what a user reads names the paper so it can be found.
"""

SCF_RKL = "Lin et al. 2026 (SCF-RKL)"
FISHER_RAO = "Wang, Ye & Yin 2026 (Fisher-Rao merging)"
IN_THE_WILD = "In-the-wild merging study (anonymous, under double-blind review)"
FIM_MERGING = "FIM-Merging (anonymous preprint)"


def cite(paper: str, where: str) -> str:
    """``paper, where``: e.g. ``cite(SCF_RKL, "appendix A.4")``."""
    return f"{paper}, {where}"
