"""What a study protocol's plan depends on: its own module, so that the protocol modules and the runner
(``protocol.py``, which picks a protocol module) both read it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StudySettings:
    """What a protocol's plan depends on. ``quick``: the minutes-long variant; ``zoo``: the language-model
    family (``tiny-lm``, or ``smollm2``: the protocols of ``mergelab.study.smollm2``); ``zoo_size``: the zoo
    size its members come from (default: ``demo`` when quick, ``full`` otherwise; smollm2 has no ``demo``, so
    its default is ``full``); ``build_zoo``: build missing members instead of stopping with the command that
    builds them."""

    quick: bool = False
    zoo: str = "tiny-lm"
    zoo_size: str | None = None
    build_zoo: bool = False
    device: str = "cpu"
    progress: bool = True

    def size(self) -> str:
        return self.zoo_size or ("demo" if self.quick and self.zoo == "tiny-lm" else "full")
