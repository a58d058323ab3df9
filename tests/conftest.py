import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def zoo_root(tmp_path_factory):
    """Zoo builds made by tests go to one session folder (shared between tests), never to ~/.cache."""
    root = tmp_path_factory.mktemp("zoo-cache")
    old = os.environ.get("MERGELAB_ZOO")
    os.environ["MERGELAB_ZOO"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MERGELAB_ZOO", None)
    else:
        os.environ["MERGELAB_ZOO"] = old
