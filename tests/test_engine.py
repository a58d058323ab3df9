"""End-to-end merges of tiny Llama/Qwen2 folders: output format, sharding, determinism, resume, bad input."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import load_folder, make_base, make_expert, make_family, write_recipe

from mergelab.api import merge
from mergelab.cli import main


def recipe_for(base, experts, method="task_arithmetic", **top):
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts], **top}


def tree_digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            sha.update(f.name.encode() + f.read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return make_family(root, 2, layers=3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_folder_loads_and_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base, experts = make_family(tmp_path, 2, arch=arch)
    out = merge(recipe_for(base, experts, "ties", parameters={"density": 0.5}), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    assert (out / "README.md").read_text().count("ties") >= 1
    record = json.loads((out / "mergelab.json").read_text())
    assert set(record["inputs"]) == {str(base), *map(str, experts)}
    assert all("header_sha256" in f for r in record["inputs"].values() for f in r["files"].values())
    assert record["versions"]["torch"] == torch.__version__
    name = "model.layers.0.mlp.up_proj.weight"
    assert 0.4 < record["tensors"][name]["changed_from_base"] <= 1.0


def test_task_arithmetic_values(family, tmp_path):
    base, experts = family
    out = merge(recipe_for(base, experts), tmp_path / "out")
    merged, b = load_folder(out), load_folder(base)
    e = [load_folder(x) for x in experts]
    for name in b:
        expected = b[name] + 0.5 * (e[0][name] - b[name]) + 0.5 * (e[1][name] - b[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_sharded_output_matches_single_file(family, tmp_path):
    base, experts = family
    single = merge(recipe_for(base, experts), tmp_path / "single")
    sharded = merge(recipe_for(base, experts), tmp_path / "sharded", shard_size=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((sharded / f).exists() for f in files)
    a, b = load_folder(single), load_folder(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(sharded)


def test_same_recipe_and_seed_are_bit_identical(family, tmp_path):
    base, experts = family
    recipe = recipe_for(base, experts, "dare_ties", parameters={"density": 0.5}, seed=11)
    a = merge(recipe, tmp_path / "a")
    b = merge(recipe, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = merge(recipe, tmp_path / "c", seed=12)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bfloat16_output_is_one_cast_of_float32_maths(family, tmp_path):
    base, experts = family
    out32 = load_folder(merge(recipe_for(base, experts), tmp_path / "f32"))
    out16 = load_folder(merge(recipe_for(base, experts, out_dtype="bfloat16"), tmp_path / "bf16"))
    for name, t in out16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, out32[name].to(torch.bfloat16))


def test_gradient_and_filter_resolution(family, tmp_path):
    base, experts = family
    recipe = recipe_for(base, experts)
    recipe["parameters"] = {"lambda": [0.0, 1.0]}
    recipe["models"][0]["parameters"] = {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.0}]}
    recipe["models"][1]["parameters"] = {"weight": 0.0}
    merged, b, e0 = load_folder(merge(recipe, tmp_path / "out")), load_folder(base), load_folder(experts[0])
    for layer, lam in ((0, 0.0), (1, 0.5), (2, 1.0)):
        mlp = f"model.layers.{layer}.mlp.up_proj.weight"
        attn = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[mlp], b[mlp] + lam * 2.0 * (e0[mlp] - b[mlp]), rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[attn], b[attn], rtol=0, atol=0)
    # outside the layer stack t = 0, so lambda = 0
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_print_plan_shows_resolved_values(family, tmp_path, capsys):
    base, experts = family
    recipe = recipe_for(base, experts, "ties")
    recipe["parameters"] = {"density": [0.2, 0.8]}
    path = write_recipe(tmp_path / "r.yml", recipe)
    assert main(["merge", str(path), "--print-plan"]) == 0
    shown = capsys.readouterr().out
    assert "density=[0.2, 0.2]" in shown and "density=[0.8, 0.8]" in shown and "density=[0.5, 0.5]" in shown
    assert not (tmp_path / "out").exists()


def test_larger_expert_vocabulary_rows_are_dropped_or_refused(tmp_path):
    base = make_base(tmp_path / "base", vocab=96)
    big = make_base(tmp_path / "big", vocab=100, seed=5)
    out = merge({"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(big)}]},
                tmp_path / "out")
    merged, b = load_folder(out), load_folder(big)
    assert merged["model.embed_tokens.weight"].shape[0] == 96
    torch.testing.assert_close(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"][:96])
    record = json.loads((out / "mergelab.json").read_text())
    assert any("rows beyond" in w for w in record["warnings"])
    path = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                             "models": [{"model": str(big)}]})
    assert main(["merge", str(path), str(tmp_path / "strict"), "--strict"]) == 2
    assert not (tmp_path / "strict").exists()


def test_tied_expert_supplies_lm_head_from_embeddings(tmp_path):
    base = make_base(tmp_path / "base")
    tied = make_base(tmp_path / "tied", tie=True, seed=3)
    out = load_folder(merge({"merge_method": "task_arithmetic", "base_model": str(base),
                             "models": [{"model": str(tied)}]}, tmp_path / "out"))
    torch.testing.assert_close(out["lm_head.weight"], load_folder(tied)["model.embed_tokens.weight"])


class Interrupt(BaseException):
    pass


def test_interrupted_merge_resumes_to_identical_output(family, tmp_path, monkeypatch):
    base, experts = family
    recipe = recipe_for(base, experts, "dare_linear", parameters={"density": 0.5})
    reference = merge(recipe, tmp_path / "reference", shard_size=20_000)
    import mergelab.stream.pipeline as engine

    real_compute, calls = engine.compute_piece, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:
            raise Interrupt
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(engine, "compute_piece", flaky)
    with pytest.raises(Interrupt):
        merge(recipe, tmp_path / "out", shard_size=20_000)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "out.partial"
    done = json.loads((partial / "progress.json").read_text())["shards"]
    assert done and not list(partial.glob("*.tmp"))
    monkeypatch.setattr(engine, "compute_piece", real_compute)
    with pytest.raises(Exception, match="resume=True"):
        merge(recipe, tmp_path / "out", shard_size=20_000)
    damaged = partial / sorted(done)[0]  # a finished shard damaged while the merge was stopped is redone
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    merge(recipe, tmp_path / "out", shard_size=20_000, resume=True)
    assert not partial.exists()
    for f in reference.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes()


def test_killed_process_leaves_old_state_or_resumable_partial(tmp_path):
    base = make_base(tmp_path / "base", hidden=256, layers=4, vocab=4000)
    expert = make_expert(base, tmp_path / "expert", seed=1)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "ties", "base_model": str(base),
                                               "models": [{"model": str(expert)}],
                                               "parameters": {"density": 0.3}})
    out, progress = tmp_path / "out", tmp_path / "out.partial" / "progress.json"
    cmd = [sys.executable, "-m", "mergelab.cli", "merge", str(recipe), str(out), "--shard-size", "300K"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if proc.returncode != 0:  # killed mid-merge: no output folder, a resumable partial one
        assert not out.exists() and progress.exists()
        subprocess.run(cmd + ["--resume"], check=True, capture_output=True)
    assert out.exists() and not (tmp_path / "out.partial").exists()
    subprocess.run([str(tmp_path / "clean") if c == str(out) else c for c in cmd], check=True, capture_output=True)
    for f in (tmp_path / "clean").glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes()


# ---------------------------------------------------------------- bad input: one sentence, exit 2, nothing written


def run_bad(tmp_path, recipe, *flags):
    path = write_recipe(tmp_path / "bad.yml", recipe)
    out = tmp_path / "bad_out"
    code = main(["merge", str(path), str(out), *flags])
    assert code == 2
    assert not out.exists() and not (tmp_path / "bad_out.partial").exists()


@pytest.fixture
def fresh(tmp_path):
    base, experts = make_family(tmp_path / "m", 1)
    return base, experts[0]


def inputs_untouched(*folders):
    return [tree_digest(f) for f in folders]


def test_missing_model_folder(fresh, tmp_path, capsys):
    base, _ = fresh
    run_bad(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                       "models": [{"model": str(tmp_path / "nope")}]})
    assert "does not exist" in capsys.readouterr().err


def test_tensor_missing_from_expert(fresh, tmp_path, capsys):
    base, expert = fresh
    f = expert / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    before = inputs_untouched(base, expert)
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert inputs_untouched(base, expert) == before


def test_shape_mismatch(fresh, tmp_path, capsys):
    base, expert = fresh
    f = expert / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, f)
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "shape" in capsys.readouterr().err


def test_different_architectures_need_allow_mixed(tmp_path, capsys):
    base = make_base(tmp_path / "llama", arch="llama")
    other = make_base(tmp_path / "qwen", arch="qwen2")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(other)}]}
    run_bad(tmp_path, recipe)
    assert "--allow-mixed" in capsys.readouterr().err


def test_nan_in_input(fresh, tmp_path, capsys):
    base, expert = fresh
    f = expert / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, f)
    run_bad(tmp_path, recipe_for(base, [expert]))
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "NaN" in err


def test_truncated_safetensors(fresh, tmp_path, capsys):
    base, expert = fresh
    f = expert / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "truncated" in capsys.readouterr().err


def test_reads_are_private_maps_released_with_their_tensors(fresh):
    """A tensor read from a model is a copy-on-write map of the file: writing to it leaves the file as it was,
    and freeing it unmaps it (the resident set holds only tensors in use)."""
    import gc

    from mergelab.checkpoint.reader import open_model

    _, expert = fresh
    f = expert / "model.safetensors"
    before, expected = f.read_bytes(), load_file(f)
    reader = open_model(expert)
    name = "model.layers.1.mlp.up_proj.weight"
    rows = reader.get(name, (3, 7))
    assert torch.equal(rows, expected[name][3:7])
    rows.add_(1.0)
    assert f.read_bytes() == before and torch.equal(reader.get(name), expected[name])

    def mapped() -> int:
        return Path("/proc/self/maps").read_text().count(str(f.resolve()))

    held = mapped()
    del rows
    gc.collect()
    assert mapped() == held - 1
    reader.close()


def test_file_shrunk_after_opening(fresh):
    from mergelab.checkpoint.reader import open_model
    from mergelab.errors import CheckpointError

    _, expert = fresh
    f = expert / "model.safetensors"
    reader = open_model(expert)
    f.write_bytes(f.read_bytes()[:-64])
    last = max(reader.names, key=lambda n: reader.entries[n].offset)
    with pytest.raises(CheckpointError, match=f"{last}.*re-download"):
        reader.get(last)
    reader.close()


def test_corrupt_safetensors_header(fresh, tmp_path, capsys):
    base, expert = fresh
    f = expert / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:18] = b"\xff" * 10
    f.write_bytes(bytes(data))
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "corrupt" in capsys.readouterr().err


def test_index_pointing_outside_folder(fresh, tmp_path, capsys):
    base, expert = fresh
    tensors = load_file(expert / "model.safetensors")
    (expert / "model.safetensors").unlink()
    save_file(tensors, tmp_path / "elsewhere.safetensors")
    (expert / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../../elsewhere.safetensors" for k in tensors}}))
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "outside the model folder" in capsys.readouterr().err


def test_unknown_method_and_parameter(fresh, tmp_path, capsys):
    base, expert = fresh
    run_bad(tmp_path, recipe_for(base, [expert], "task_arithmetik"))
    assert "did you mean 'task_arithmetic'" in capsys.readouterr().err
    recipe = recipe_for(base, [expert], "ties")
    recipe["parameters"] = {"densit": 0.5}
    run_bad(tmp_path, recipe)
    assert "did you mean 'density'" in capsys.readouterr().err
    recipe["parameters"] = {"density": 1.5}
    run_bad(tmp_path, recipe)
    assert "out of range" in capsys.readouterr().err
    recipe["parameters"] = {}
    recipe["base_modle"] = str(base)
    run_bad(tmp_path, recipe)
    assert "did you mean 'base_model'" in capsys.readouterr().err


def test_shared_parameter_set_per_model_is_refused(fresh, tmp_path, capsys):
    base, expert = fresh
    recipe = recipe_for(base, [expert])
    recipe["models"][0]["parameters"]["lambda"] = 0.3
    run_bad(tmp_path, recipe)
    assert "top-level" in capsys.readouterr().err


def test_unwritable_output_parent(fresh, tmp_path, capsys):
    base, expert = fresh
    path = write_recipe(tmp_path / "r.yml", recipe_for(base, [expert]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["merge", str(path), str(blocker / "out")]) == 2
    assert "not an existing folder" in capsys.readouterr().err


def test_output_inside_input_and_existing_output(fresh, tmp_path, capsys):
    base, expert = fresh
    path = write_recipe(tmp_path / "r.yml", recipe_for(base, [expert]))
    assert main(["merge", str(path), str(base / "merged")]) == 2
    assert "inside input" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    assert main(["merge", str(path), str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"
    assert main(["merge", str(path), str(tmp_path / "exists"), "--overwrite"]) == 2  # not a previous merge
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"


def test_pickles_refused_unless_allowed(fresh, tmp_path, capsys):
    base, expert = fresh
    tensors = load_file(expert / "model.safetensors")
    (expert / "model.safetensors").unlink()
    torch.save(tensors, expert / "pytorch_model.bin")
    run_bad(tmp_path, recipe_for(base, [expert]))
    assert "--allow-pickle" in capsys.readouterr().err
    path = write_recipe(tmp_path / "r.yml", recipe_for(base, [expert]))
    assert main(["merge", str(path), str(tmp_path / "ok"), "--allow-pickle"]) == 0
    shutil.rmtree(tmp_path / "ok")


def test_row_blocks_give_the_same_bytes_as_whole_tensors(family, tmp_path):
    base, experts = family
    for method in ("task_arithmetic", "linear"):
        recipe = recipe_for(base, experts, method)
        whole = merge(recipe, tmp_path / f"{method}-whole")
        blocks = merge(recipe, tmp_path / f"{method}-blocks", chunk_elements=100, shard_size=30_000)
        a, b = load_folder(whole), load_folder(blocks)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        stats_a = json.loads((whole / "mergelab.json").read_text())["tensors"]
        stats_b = json.loads((blocks / "mergelab.json").read_text())["tensors"]
        for name, s in stats_a.items():
            assert s["numel"] == stats_b[name]["numel"]
            for model, frac in s["equal_to"].items():
                assert abs(frac - stats_b[name]["equal_to"][model]) < 1e-12


def test_model_level_passes_reach_the_method_and_the_output(family, tmp_path, monkeypatch):
    from dataclasses import replace

    from mergelab.methods.registry import METHODS
    from mergelab.methods.spec import ModelPass

    base, experts = family
    seen = {}

    def prepare(context):
        return ModelPass(extras={job.name: {"layer_scale": 1.0 + (job.info.layer or 0)} for job in context.tensors},
                         record={"note": "prepared"})

    def fn(call):
        seen[call.info.name] = call.extras["layer_scale"]
        return call.base * call.extras["layer_scale"]

    def finish(context):
        assert (context.merged.folder / "config.json").exists()
        return ModelPass(scales={"model.norm.weight": 3.0}, record={"note": "finished"})

    spec = replace(METHODS["task_arithmetic"], name="scaled", fn=fn, prepare=prepare, finish=finish)
    monkeypatch.setitem(METHODS, "scaled", spec)
    out = merge(recipe_for(base, experts, "scaled"), tmp_path / "out", shard_size=20_000)
    merged, b = load_folder(out), load_folder(base)
    assert seen["model.layers.2.mlp.up_proj.weight"] == 3.0
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], 3.0 * b[name])
    torch.testing.assert_close(merged["model.norm.weight"], 3.0 * b["model.norm.weight"])
    record = json.loads((out / "mergelab.json").read_text())
    assert record["prepare"]["note"] == "prepared" and record["finish"]["rescaled"] == {"model.norm.weight": 3.0}
