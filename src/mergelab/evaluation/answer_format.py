"""Answer-format adherence: does a generation give its answer in the format a task's fine-tunes are trained to
write? Where every 135M model's accuracy is near zero (GSM8K), whether a merge keeps or loses a parent's answer
format is the behaviour the parents differ on.

``FORMATS`` maps a task name to the pattern of its format; a task without one has no format figure. GSM8K's is
the dataset's ``#### N`` (a number after the marker), the format of the smollm2 zoo's GSM8K members.
"""

from __future__ import annotations

import re

FORMATS = {"gsm8k": re.compile(r"####[ \t]*\$?-?\d")}


def formatted(task_name: str, completion: str) -> bool:
    """Whether ``completion`` holds an answer in the format of task ``task_name`` (which must have one)."""
    return FORMATS[task_name].search(completion) is not None
