"""``mergelab check``: compatibility, vocabulary notes, task-vector similarity; writes nothing."""

import numpy as np
from tinymodels import load_folder, make_base, make_family, write_recipe

from mergelab.cli import main


def test_check_reports_plan_and_similarity(tmp_path, capsys):
    base, experts = make_family(tmp_path, 2, layers=2)
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": [0.2, 0.6]},
              "models": [{"model": str(e)} for e in experts]}
    path = write_recipe(tmp_path / "r.yml", recipe)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "would run" in out and "density=[0.2, 0.2]" in out and "expected output size" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # the reported global cosine equals one computed here from the folders
    b, e0, e1 = (load_folder(p) for p in (base, *experts))
    d0 = np.concatenate([(e0[k] - b[k]).double().numpy().ravel() for k in sorted(b)])
    d1 = np.concatenate([(e1[k] - b[k]).double().numpy().ravel() for k in sorted(b)])
    expected = d0 @ d1 / np.linalg.norm(d0) / np.linalg.norm(d1)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("all:"))
    assert abs(float(line.split("cosines")[1]) - expected) < 5e-4


def test_check_lists_problems_with_non_zero_exit(tmp_path, capsys):
    base = make_base(tmp_path / "base", vocab=96)
    small = make_base(tmp_path / "small", vocab=90, seed=2)
    path = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                             "models": [{"model": str(small)}]})
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "would NOT run" in out and "problem:" in out and "shape" in out


def test_check_notes_vocabulary_rows_dropped(tmp_path, capsys):
    base = make_base(tmp_path / "base", vocab=96)
    big = make_base(tmp_path / "big", vocab=100, seed=2)
    path = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                             "models": [{"model": str(big)}]})
    assert main(["check", str(path), "--no-similarity"]) == 0
    assert "vocab_size 100 vs 96" in capsys.readouterr().out


def test_peak_memory_follows_the_pieces_the_engine_streams(tmp_path):
    # Task arithmetic streams every tensor in row blocks of chunk_elements, so a ten times larger vocabulary
    # (embedding and head) leaves its estimate unchanged; Model Stock takes each tensor whole, so its grows.
    from mergelab.check import peak_memory_bytes
    from mergelab.config import parse_recipe
    from mergelab.plan.build import build_plan
    from mergelab.plan.sources import open_inputs
    from mergelab.stream.options import MergeOptions

    def estimate(vocab: int, method: str) -> int:
        base, experts = make_family(tmp_path / f"{method}-{vocab}", 2, layers=1, vocab=vocab)
        recipe = parse_recipe({"merge_method": method, "base_model": str(base),
                               "models": [{"model": str(e)} for e in experts]})
        plan = build_plan(recipe, open_inputs(recipe, None, False))
        return peak_memory_bytes(plan, MergeOptions(chunk_elements=512, compute_threads=2))

    small = estimate(96, "task_arithmetic")
    assert small == estimate(960, "task_arithmetic")
    assert estimate(960, "model_stock") > 5 * estimate(96, "model_stock")
    # one row block of three float32 inputs: read (3 pieces), computed (2 lanes); tiles and outputs on top
    assert small >= 512 * 4 * 3 * (3 + 2)


def test_check_counts_the_fisher_pass_of_methods_that_take_one(tmp_path, capsys):
    """FIM-Merging (the base's Fisher) and Karcher with the Fisher metric (the reference's) get a note with the
    Fisher pass's memory: three float32 copies of the largest decoder layer or other tensor, counted here from the
    checkpoint; methods without a Fisher get none."""
    for vocab in (96, 400):  # a decoder layer outweighs the embedding, then the other way round
        base, experts = make_family(tmp_path / str(vocab), 2, layers=2, vocab=vocab)
        check_fisher_notes(tmp_path / str(vocab), base, experts, capsys)


def check_fisher_notes(tmp_path, base, experts, capsys):
    import re

    from safetensors import safe_open

    from mergelab.check import fisher_pass_bytes
    from mergelab.config import parse_recipe
    from mergelab.plan.build import build_plan
    from mergelab.plan.sources import open_inputs

    units: dict[str, int] = {}
    with safe_open(base / "model.safetensors", "pt") as handle:
        for name in handle.keys():
            layer = re.search(r"\.layers\.(\d+)\.", name)
            key = f"layer {layer.group(1)}" if layer else name
            units[key] = units.get(key, 0) + handle.get_tensor(name).numel() * 4
    recipes = {
        "fim_ta": ({"merge_method": "fim_ta", "base_model": str(base)}, str(base)),
        "karcher_fisher": ({"merge_method": "karcher", "parameters": {"fisher_precondition": "diagonal"}},
                           str(experts[0])),
        "karcher": ({"merge_method": "karcher"}, None),
        "ties": ({"merge_method": "ties", "base_model": str(base)}, None),
    }
    for case, (recipe, fisher_model) in recipes.items():
        recipe = {**recipe, "models": [{"model": str(e)} for e in experts]}
        assert main(["check", str(write_recipe(tmp_path / f"{case}.yml", recipe)), "--no-similarity"]) == 0
        notes = [line for line in capsys.readouterr().out.splitlines() if "diagonal Fisher of" in line]
        if fisher_model is None:
            assert notes == [], case
            continue
        assert len(notes) == 1 and f"Fisher of {fisher_model} runs first" in notes[0], case
        parsed = parse_recipe(recipe)
        assert fisher_pass_bytes(build_plan(parsed, open_inputs(parsed, None, False))) == 3 * max(units.values())
