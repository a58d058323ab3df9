"""What a model reference names, and where a relative one is looked up.

The rule for relative paths in a recipe file: a relative model path is looked up beside the recipe file (in
its folder) and in the working directory. It is used where it exists; if it exists in both places as two
different folders, the recipe is refused, since either could be meant (write an absolute path). A recipe given
as a dict or YAML text (the Python API) has no folder: its relative paths are taken from the working directory.

Inputs that are not Hugging Face model folders (a PEFT adapter, a GGUF file, a Hub id, a single weights file)
are named for what they are, with what to do instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mergelab.errors import CheckpointError, RecipeError
from mergelab.hub_cache import cached_snapshot, split_reference

log = logging.getLogger("mergelab")


def resolve_model_ref(ref: str, recipe_dir: Path | None, adapters: bool = False) -> Path:
    """The folder a recipe's ``ref`` names under the rule of the module doc; errors name the reference.
    ``adapters``: a PEFT adapter folder is accepted (merge inputs), not refused with advice."""
    found = locate_model_ref(ref, recipe_dir)
    if found is None:
        looked_in = _candidates(ref, recipe_dir)
        if split_reference(ref) is None or any(path.parent.is_dir() for path in looked_in):  # a local 'org/'
            raise CheckpointError(missing_model_message(ref, looked_in))
        found = cached_snapshot(ref)  # org/name[@revision] from the local Hugging Face cache, or its download
    check_model_folder(found, adapters)
    if found != Path(ref).expanduser():
        log.info("model '%s' found beside the recipe: %s", ref, found)
    return found


def locate_model_ref(ref: str, recipe_dir: Path | None) -> Path | None:
    """Where ``ref`` exists under the rule of the module doc, None where it exists nowhere; a reference that
    exists in both places as different folders is refused."""
    existing = [c for c in _candidates(ref, recipe_dir) if c.exists()]
    if len(existing) == 2 and existing[0].resolve() != existing[1].resolve():
        raise RecipeError(f"model '{ref}' could mean {existing[0].resolve()} (beside the recipe) or "
                          f"{existing[1].resolve()} (in the working directory); write the absolute path of the "
                          "one you mean")
    return existing[0] if existing else None


def _candidates(ref: str, recipe_dir: Path | None) -> list[Path]:
    path = Path(ref).expanduser()
    if path.is_absolute() or recipe_dir is None:
        return [path]
    return list(dict.fromkeys([recipe_dir / path, path]))  # the same path when the recipe is in cwd


def check_model_folder(path: Path, adapters: bool = False) -> None:
    """Refuse an existing ``path`` that is not a Hugging Face model folder (nor, with ``adapters``, a PEFT
    adapter folder), saying what it is instead."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            raise CheckpointError(gguf_advice(path))
        raise CheckpointError(f"{path} is a file; name the model folder that holds it ({path.parent}) instead")
    adapter = peft_adapter_type(path)
    if adapter is not None and not adapters:
        raise CheckpointError(adapter_advice(path, adapter))


def missing_model_message(ref: str, looked_in: list[Path]) -> str:
    """The sentence for a model reference that names nothing on disk (Hub ids: ``hub_cache.cached_snapshot``)."""
    places = f" (looked for {' and '.join(str(p) for p in looked_in)})" if len(looked_in) > 1 else ""
    return f"model folder '{ref}' does not exist{places}; check the path"



def peft_adapter_type(folder: Path) -> str | None:
    """The PEFT type ("LORA", ...) when ``folder`` holds an adapter (``adapter_config.json``), else None."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text()).get("peft_type") or "unknown PEFT")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown PEFT"


def adapter_advice(folder: Path, peft_type: str) -> str:
    """An adapter is not a full model: say so, and how to get one to merge."""
    kind = "LoRA" if peft_type.upper() == "LORA" else peft_type
    return (f"{folder} is a PEFT {kind} adapter (adapter_config.json), not a full model; name it in a merge "
            "recipe (alone or as BASE+ADAPTER), or merge it into its base with peft (merge_and_unload, then "
            "save_pretrained) and name that folder")


def gguf_advice(file: Path) -> str:
    """A GGUF file is a llama.cpp export: convert it to a safetensors folder first."""
    return (f"{file} is a GGUF file (llama.cpp), not a Hugging Face model folder; convert it as `mergelab zoo` "
            f"does for SmolLM2: transformers' from_pretrained(folder, gguf_file='{file.name}'), then "
            "save_pretrained(new_folder), and name that folder")
