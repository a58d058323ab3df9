"""The vision zoo: data is read and transformed right, splits are disjoint, members are mergeable folders whose
accuracy an independent forward pass reproduces, builds are deterministic, bad input is a clear error."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.signal import convolve2d

from mergelab import zoo
from mergelab.errors import MergelabError
from mergelab.zoo import vision

pytestmark = pytest.mark.skipif(
    not (vision.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs the Debian package dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    return zoo.build("vision", "test", out=tmp_path_factory.mktemp("zoo") / "vision", progress=False)


def _idx_images(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    assert raw[:4] == b"\x00\x00\x08\x03"  # uint8, three dimensions
    count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols)


def test_fashion_images_match_an_independent_idx_parse_and_splits_are_disjoint():
    train = _idx_images(vision.FASHION_DIR / "train-images-idx3-ubyte.gz")
    raw_test = _idx_images(vision.FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    images, labels = vision.source_split("fashion", "train")
    assert images.shape == (60_000, 1, 28, 28) and labels.shape == (60_000,)
    np.testing.assert_array_equal((images[:, 0].numpy() * 255).round().astype(np.uint8), train)
    assert set(labels.tolist()) == set(range(10))
    test_images, _ = vision.source_split("fashion", "test")
    train_hashes = {hashlib.sha1(img.tobytes()).hexdigest() for img in train}
    kept = (test_images[:, 0].numpy() * 255).round().astype(np.uint8)
    assert not {hashlib.sha1(img.tobytes()).hexdigest() for img in kept} & train_hashes
    dropped = sum(hashlib.sha1(img.tobytes()).hexdigest() in train_hashes for img in raw_test)
    assert len(kept) == len(raw_test) - dropped


def test_digits_are_upscaled_and_split_disjointly():
    train, train_labels = vision.source_split("digits", "train")
    test, _ = vision.source_split("digits", "test")
    assert train.shape[1:] == (1, 28, 28) and 1400 < len(train) < 1450 and len(test) > 300
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    assert not {t.numpy().tobytes() for t in test} & {t.numpy().tobytes() for t in train}
    assert set(train_labels.tolist()) == set(range(10))


def test_task_transforms_and_class_subsets():
    plain, labels = vision.source_split("fashion", "test")
    n = 50
    base = plain[:n, 0].double().numpy()
    rotated, _ = vision.task_data(vision.TASKS["rotated"], "test", n)
    np.testing.assert_allclose(rotated[:, 0].numpy(), np.rot90(base, 1, axes=(1, 2)), atol=1e-7)
    inverted, _ = vision.task_data(vision.TASKS["inverted"], "test", n)
    np.testing.assert_allclose(inverted[:, 0].numpy(), 1.0 - base, atol=1e-7)
    offsets = np.arange(5) - 2.0
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    kernel = np.outer(g, g) / g.sum() ** 2
    blurred, _ = vision.task_data(vision.TASKS["blurred"], "test", n)
    expected = np.stack([convolve2d(img, kernel, mode="same") for img in base])
    np.testing.assert_allclose(blurred[:, 0].numpy(), expected, atol=1e-5)
    noisy_test, _ = vision.task_data(vision.TASKS["noisy"], "test", n)
    assert torch.equal(noisy_test, vision.task_data(vision.TASKS["noisy"], "test", n)[0])  # deterministic
    assert 0.0 <= float(noisy_test.min()) and float(noisy_test.max()) <= 1.0
    assert 0.1 < float((noisy_test[:, 0].double() - torch.from_numpy(base)).abs().mean()) < 0.4  # sigma 0.4, clipped
    upper, upper_labels = vision.task_data(vision.TASKS["fashion_5_9"], "test", n)
    keep = labels >= 5
    assert torch.equal(upper, plain[keep][:n]) and torch.equal(upper_labels, labels[keep][:n] - 5)


def test_zoo_json_describes_base_and_seven_experts(family):
    record = json.loads((family / "zoo.json").read_text())
    assert record["complete"] and list(record["members"]) == ["base", *vision.TASKS]
    assert record["scenarios"]["all_experts"] == list(vision.TASKS) and len(vision.TASKS) == 7
    for name, member in record["members"].items():
        task = "fashion" if name == "base" else name
        assert set(member["scores"]) == {task} and 0.0 <= member["scores"][task]["accuracy"] <= 1.0
        config = json.loads((family / name / "config.json").read_text())
        assert config["model_type"] == vision.MODEL_TYPE
        with safe_open(family / name / vision.HEAD_FILE, "pt") as f:
            assert f.metadata()["task"] == task
            classes = 10 if name in ("base", "rotated", "inverted", "noisy", "blurred", "digits") else 5
            assert f.get_tensor("weight").shape == (classes, config["features"])
    base = load_file(family / "base" / "model.safetensors")
    expert = load_file(family / "digits" / "model.safetensors")
    assert base.keys() == expert.keys() and any(not torch.equal(base[k], expert[k]) for k in base)


def _independent_accuracy(backbone: dict, head: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The documented architecture written out with functional ops in float64."""
    x, w = images.double(), {k: v.double() for k, v in backbone.items()}
    for i in sorted({k.split(".")[1] for k in w if k.startswith("blocks.")}, key=int):
        x = torch.nn.functional.conv2d(x, w[f"blocks.{i}.weight"], w[f"blocks.{i}.bias"], padding=1)
        x = torch.nn.functional.max_pool2d(x.clamp(min=0), 2)
    features = (x.flatten(1) @ w["proj.weight"].T + w["proj.bias"]).clamp(min=0)
    logits = features @ head["weight"].double().T + head["bias"].double()
    return float((logits.argmax(1) == labels).double().mean())


@pytest.mark.parametrize("task", ["fashion_5_9", "digits"])
def test_evaluate_matches_an_independent_forward_pass_and_the_recorded_score(family, task):
    accuracy = vision.evaluate(family / task, task, n=300, heads=family)
    images, labels = vision.task_data(vision.TASKS[task], "test", 300)
    expected = _independent_accuracy(load_file(family / task / "model.safetensors"),
                                     load_file(family / task / vision.HEAD_FILE), images, labels)
    assert accuracy == pytest.approx(expected, abs=1 / 300)  # float32 vs float64 may flip one borderline item
    record = json.loads((family / "zoo.json").read_text())["members"][task]["scores"][task]
    n = record["test_items"]
    assert vision.evaluate(family / task, task, n=n, heads=family) == pytest.approx(record["accuracy"], abs=1e-4)
    assert vision.evaluate(family / "base", task, n=n, heads=family) == pytest.approx(record["base_accuracy"], abs=1e-4)


def test_mergelab_merges_backbones_and_the_merge_evaluates(family, tmp_path):
    from mergelab.api import merge

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(family / name), "parameters": {"weight": 0.5}} for name in ("rotated", "digits")],
    }
    merged = merge(recipe, tmp_path / "merged")
    weights = load_file(Path(merged) / "model.safetensors")
    rotated, digits = (load_file(family / name / "model.safetensors") for name in ("rotated", "digits"))
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, (rotated[name] + digits[name]) / 2)
    assert 0.0 <= vision.evaluate(merged, "digits", heads=family) <= 1.0


def test_experts_rebuilt_in_two_worker_processes_are_bitwise_identical(family):
    names = ("noisy", "blurred", "fashion_0_4")
    original = {name: load_file(family / name / "model.safetensors") for name in names}
    for name in names:
        shutil.rmtree(family / name)
    zoo.build("vision", "test", out=family, progress=False, workers=2)
    for name in names:
        rebuilt = load_file(family / name / "model.safetensors")
        assert all(torch.equal(original[name][k], rebuilt[k]) for k in original[name])
    assert json.loads((family / "zoo.json").read_text())["complete"]


def test_bad_input_is_a_clear_error(family, tmp_path):
    with pytest.raises(MergelabError, match="workers must be at least 1"):
        zoo.build("vision", "test", out=family, workers=0)
    with pytest.raises(MergelabError, match="dataset-fashion-mnist"):
        vision._fashion("train", folder=tmp_path)
    with pytest.raises(MergelabError, match="valid tasks are: fashion_0_4"):
        vision.evaluate(family / "base", "mnist", heads=family)
    with pytest.raises(MergelabError, match="head.safetensors"):
        vision.load_head(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MergelabError, match="model_type 'llama'"):
        vision.load_backbone(tmp_path)
    with pytest.raises(MergelabError, match="classifies 'rotated', not 'digits'"):
        shutil.copytree(family / "rotated", tmp_path / "heads" / "digits")
        vision.evaluate(family / "base", "digits", heads=tmp_path / "heads")


def test_eval_command_scores_a_merged_backbone_with_each_task_head(family, tmp_path):
    from mergelab.api import merge
    from mergelab.cli import main

    experts = [{"model": str(family / t), "parameters": {"weight": 0.5}} for t in ("rotated", "inverted")]
    merged = merge({"merge_method": "task_arithmetic", "base_model": str(family / "base"), "models": experts},
                   tmp_path / "merged")
    out = tmp_path / "vision.json"
    assert main(["eval", str(merged), "--vision-tasks", "rotated", "inverted", "--items", "200",
                 "--heads", str(family), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["vision"]
    for task in ("rotated", "inverted"):
        assert scores[task]["accuracy"] == vision.evaluate(merged, task, n=200, heads=family)
