"""The recipe's ``chat_template``: ``auto``, a named template, a Jinja string or a template file.

Named templates are written here from each format's public definition:

- ``chatml``: OpenAI's ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message;
- ``llama3``: Meta's Llama 3 prompt format, ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  after the BOS token (contents trimmed, as Meta's own template does);
- ``alpaca``: Stanford Alpaca's prompt, an optional system text then ``### Instruction:`` / ``### Input:`` /
  ``### Response:`` sections, each part separated by a blank line (also before the generation prompt);
- ``mistral``: Mistral's instruct format, BOS then ``[INST] {user} [/INST]`` and `` {assistant}</s>``, an
  optional system message placed before the first user turn.

``auto`` takes the template most of the input models carry (the first in recipe order on a tie), and none when
no input has one. A value with ``{`` is a Jinja string; one ending in ``.jinja``/``.j2``/``.jinja2`` or naming an
existing file is read from that file; any other word must be a named template.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergelab.errors import RecipeError, closest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% if systems %}{{ systems[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
    "{% set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
    "{% for message in messages if message['role'] != 'system' %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ headers[message['role']] + '\\n' + message['content'] | trim }}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first and system is defined %}"
    "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles follow the system message') }}{% endif %}"
    "{% endfor %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "mistral": MISTRAL}
FILE_SUFFIXES = (".jinja", ".j2", ".jinja2")


def check_value(value: str) -> str:
    """Refuse a plain word that is no named template (so ``chatmll`` never becomes a literal template)."""
    if value == "auto" or value in NAMED or "{" in value or value.endswith(FILE_SUFFIXES) or "/" in value:
        return value
    raise ValueError(f"unknown chat_template '{value}'{closest(value, ['auto', *NAMED])}; give 'auto', one of "
                     f"{', '.join(NAMED)}, a Jinja string or a .jinja file")


def folder_template(folder: Path) -> str | None:
    """A model folder's own chat template (``chat_template.jinja`` or ``tokenizer_config.json``), stripped."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text().strip() or None
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str | None, folders: list[Path], recipe_dir: Path | None = None) -> str | None:
    """The template text a recipe's ``chat_template`` asks for, or None to keep the tokenizer's own."""
    if not value:
        return None
    if value == "auto":
        found = [t for t in (folder_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED:
        return NAMED[value]
    if "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file() and recipe_dir is not None and (recipe_dir / path).is_file():
        path = recipe_dir / path
    if not path.is_file():
        raise RecipeError(f"chat_template file {value} does not exist; give an existing .jinja file, 'auto' or "
                          f"one of {', '.join(NAMED)}")
    return path.read_text()
