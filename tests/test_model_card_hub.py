"""Hub-style inputs from the local Hugging Face cache (offline) and the output's model card, read back with
huggingface_hub's own ``ModelCard`` parser."""

from __future__ import annotations

import json
import shutil

import pytest
from tinymodels import make_base, make_expert

from mergelab.api import merge
from mergelab.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub, repo, folder, commit=COMMIT):
    """Lay ``folder`` out as huggingface_hub's cache does: models--org--name/snapshots/<commit>, refs/main."""
    root = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    expert = make_expert(base, tmp_path / "expert", seed=1)
    named = make_expert(base, tmp_path / "named", seed=2)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "acme/from-config"}))
    hub = tmp_path / "hub"
    cache_repo(hub, "acme/tiny-base", base)
    cache_repo(hub, "acme/tiny-expert", expert)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path, named


def test_hub_inputs_resolve_offline_and_the_card_names_them(hub):
    from huggingface_hub import ModelCard

    tmp_path, named = hub
    recipe = {"merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
              "models": [{"model": f"acme/tiny-expert@{COMMIT}", "parameters": {"weight": 0.5}},
                         {"model": str(named), "parameters": {"weight": 0.5}}]}
    out = merge(recipe, tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["acme/tiny-base", "acme/tiny-expert", "acme/from-config"]
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergelab"]
    assert card.data.to_dict()["mergelab_recipe"]["base_model"] == "acme/tiny-base"
    assert "task_arithmetic" in card.text


def test_a_cache_folder_gives_its_hub_id(hub):
    from huggingface_hub import ModelCard

    tmp_path, _ = hub
    snapshot = tmp_path / "hub" / "models--acme--tiny-expert" / "snapshots" / COMMIT
    recipe = {"merge_method": "linear", "models": [{"model": str(snapshot)}, {"model": "acme/tiny-base"}]}
    card = ModelCard.load(merge(recipe, tmp_path / "out") / "README.md")
    assert card.data.base_model == ["acme/tiny-expert", "acme/tiny-base"]


def test_a_hub_model_missing_from_the_cache_names_the_download_command(hub):
    tmp_path, named = hub
    recipe = {"merge_method": "linear", "models": [{"model": "acme/absent@v2"}, {"model": str(named)}]}
    with pytest.raises(CheckpointError, match=r"huggingface-cli download acme/absent --revision v2"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
