"""The ``vision`` family: a small CNN backbone pretrained on Fashion-MNIST and seven task experts.

Mirrors the seven-dataset vision setting of the merging papers on data that ships offline: Fashion-MNIST
(Debian ``dataset-fashion-mnist``) and scikit-learn's ``load_digits``.

- ``base``: the backbone (three 3x3 conv + ReLU + 2x2 max-pool blocks, then a linear projection to
  ``features`` with ReLU) pretrained with a 10-class head on the Fashion-MNIST training set.
- one expert per task of ``TASKS``: as in task arithmetic (Ilharco et al. 2023), each task's classification
  head is fixed before fine-tuning: a linear probe trained on the *base* backbone's features (the stand-in for
  CLIP's zero-shot head), then frozen while the whole backbone is fine-tuned. Base, expert and any merge of
  backbones are therefore scored with the same head; ``zoo.json`` records the base's accuracy (with that
  probe) and the expert's.

Folder layout of a member: ``model.safetensors`` (the backbone, the part that gets merged) and
``config.json`` (``model_type: mergelab_vision``) which ``mergelab merge`` reads like any model folder, plus
``head/head.safetensors`` (``weight``, ``bias``; metadata ``task``), in a sub-folder so that merges, which read
every ``*.safetensors`` at the top of a folder, leave it alone.

Splits: Fashion-MNIST's own train and test files, with any test image whose bytes also occur in the training
file dropped; digits: a seeded 80/20 split of the 1,797 images, again without test images present in train.
Every transform (rotation, inversion, noise, blur) is deterministic; noise is drawn from a generator seeded by
the split, so the same image never carries the same noise in both splits.
"""

from __future__ import annotations

import functools
import gzip
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mergelab.errors import MergelabError
from mergelab.zoo.builder import FamilyPlan, Member

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MODEL_TYPE = "mergelab_vision"
HEAD_FILE = "head/head.safetensors"  # in a sub-folder: merges read every *.safetensors of a member
LICENCES = {
    "Fashion-MNIST (Zalando Research, Debian dataset-fashion-mnist)": "MIT",
    "scikit-learn digits (UCI optical recognition of handwritten digits)": "CC-BY-4.0 (via scikit-learn, BSD-3)",
}

SIZES: dict[str, dict[str, Any]] = {
    "test": dict(
        channels=(8, 16, 16),
        features=32,
        batch=64,
        train_items=3000,
        pretrain_steps=40,
        probe_items=1000,
        probe_steps=50,
        expert_steps=15,
        lr=3e-3,
        eval_n=500,
    ),
    "full": dict(
        channels=(16, 32, 32),
        features=128,
        batch=128,
        train_items=None,
        pretrain_steps=1500,
        probe_items=10_000,
        probe_steps=300,
        expert_steps=500,
        lr=2e-3,
        eval_n=None,
    ),
}


@dataclass(frozen=True)
class VisionTask:
    """A classification task: a source dataset, the source classes it keeps (relabelled 0..k-1), a transform."""

    name: str
    description: str
    source: str  # "fashion" or "digits"
    classes: tuple[int, ...] = tuple(range(10))
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = field(
        default=lambda images, _gen: images, repr=False, compare=False
    )


def _blur(images: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
    offsets = torch.arange(5, dtype=torch.float32) - 2
    kernel = torch.exp(-(offsets**2) / (2 * 1.5**2))
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    return F.conv2d(images, kernel[None, None], padding=2)


def _rotate(images: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
    return images.rot90(1, (2, 3))


def _invert(images: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
    return 1.0 - images


def _noise(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (images + 0.4 * torch.randn(images.shape, generator=gen)).clamp(0.0, 1.0)


TASKS: dict[str, VisionTask] = {
    task.name: task
    for task in (
        VisionTask("fashion_0_4", "Fashion-MNIST classes 0-4", "fashion", classes=(0, 1, 2, 3, 4)),
        VisionTask("fashion_5_9", "Fashion-MNIST classes 5-9", "fashion", classes=(5, 6, 7, 8, 9)),
        VisionTask("rotated", "Fashion-MNIST rotated by 90 degrees", "fashion", transform=_rotate),
        VisionTask("inverted", "Fashion-MNIST with inverted intensities", "fashion", transform=_invert),
        VisionTask("noisy", "Fashion-MNIST plus Gaussian noise (sigma 0.4), clipped", "fashion", transform=_noise),
        VisionTask("blurred", "Fashion-MNIST blurred by a 5x5 Gaussian (sigma 1.5)", "fashion", transform=_blur),
        VisionTask("digits", "scikit-learn digits (8x8) upscaled to 28x28", "digits"),
    )
}
PRETRAIN_TASK = VisionTask("fashion", "Fashion-MNIST, all ten classes", "fashion")


# ---------------------------------------------------------------------------------------------- data


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian magic (type 0x08 = uint8, number of dimensions), sizes, then data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(split: str, folder: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    files = [folder / f"{prefix}-{kind}-idx{dims}-ubyte.gz" for kind, dims in (("images", 3), ("labels", 1))]
    if not all(f.is_file() for f in files):
        raise MergelabError(
            f"Fashion-MNIST files are missing under {folder}; install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)."
        )
    images, labels = (_read_idx(f) for f in files)
    return images, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MergelabError("The vision family's digits task needs scikit-learn (pip install scikit-learn).") from None
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target


def _drop_seen(images: np.ndarray, labels: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Test items whose image bytes do not occur in the training images (so the splits are disjoint)."""
    seen = {row.tobytes() for row in train}
    keep = np.array([row.tobytes() not in seen for row in images], dtype=bool)
    return images[keep], labels[keep]


@functools.lru_cache(maxsize=4)
def source_split(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N x 1 x 28 x 28, float32 in [0, 1]) and labels of ``source`` in ``split``. Cached per
    process (reading and de-duplicating Fashion-MNIST dominated every evaluation): callers must not modify them."""
    if split not in ("train", "test"):
        raise MergelabError(f"Vision split must be 'train' or 'test', not {split!r}.")
    if source == "fashion":
        train_images, train_labels = _fashion("train")
        if split == "train":
            images, labels = train_images, train_labels
        else:
            images, labels = _drop_seen(*_fashion("test"), train_images)
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    else:
        all_images, all_labels = _digits()
        order = np.random.default_rng(0).permutation(len(all_images))
        cut = len(order) * 4 // 5
        train_images = all_images[order[:cut]]
        if split == "train":
            images, labels = train_images, all_labels[order[:cut]]
        else:
            images, labels = _drop_seen(all_images[order[cut:]], all_labels[order[cut:]], train_images)
        pixels = F.interpolate(torch.from_numpy(images)[:, None], size=(28, 28), mode="bilinear", align_corners=False)
    return pixels, torch.from_numpy(labels.astype(np.int64))


def task_data(task: VisionTask, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (all if None) items of ``task`` in ``split``: transformed images, labels 0..k-1."""
    images, labels = source_split(task.source, split)
    keep = torch.isin(labels, torch.tensor(task.classes))
    images, labels = images[keep][:n], labels[keep][:n]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[list(task.classes)] = torch.arange(len(task.classes))
    gen = torch.Generator().manual_seed({"train": 1, "test": 2}[split])
    return task.transform(images, gen).contiguous(), relabel[labels]


# ---------------------------------------------------------------------------------------------- model


class Backbone(nn.Module):
    """Conv(3x3) + ReLU + MaxPool(2) blocks (28 -> 14 -> 7 -> 3), then Linear + ReLU to ``features``."""

    def __init__(self, channels: tuple[int, ...], features: int) -> None:
        super().__init__()
        widths = (1, *channels)
        self.blocks = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:], strict=False))
        side = 28
        for _ in channels:
            side //= 2
        self.proj = nn.Linear(channels[-1] * side * side, features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for conv in self.blocks:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.proj(x.flatten(1)))


def save_backbone(backbone: Backbone, folder: Path, channels: tuple[int, ...], features: int) -> None:
    """``model.safetensors`` + ``config.json`` (``model_type: mergelab_vision``)."""
    from safetensors.torch import save_file

    save_file({k: v.cpu().contiguous() for k, v in backbone.state_dict().items()}, folder / "model.safetensors")
    config = {
        "model_type": MODEL_TYPE,
        "architectures": ["MergelabVisionBackbone"],
        "channels": list(channels),
        "features": features,
        "num_hidden_layers": len(channels),
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_backbone(folder: Path) -> Backbone:
    """The backbone of a member folder or of a merge of backbones (any folder with that config and weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergelabError(f"{folder} has no readable config.json; is it a vision zoo member or merge?") from exc
    if config.get("model_type") != MODEL_TYPE:
        raise MergelabError(f"{folder}/config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}.")
    backbone = Backbone(tuple(config["channels"]), config["features"])
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    backbone.load_state_dict(state)
    return backbone.eval()


def save_head(head: nn.Linear, folder: Path, task: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    (folder / HEAD_FILE).parent.mkdir(exist_ok=True)
    save_file(state, folder / HEAD_FILE, metadata={"task": task})


def load_head(member_folder: Path) -> tuple[nn.Linear, str]:
    """The classification head of a member and the task it classifies."""
    from safetensors import safe_open

    path = Path(member_folder) / HEAD_FILE
    if not path.is_file():
        raise MergelabError(f"{member_folder} has no {HEAD_FILE}; pass the folder of a vision zoo member.")
    with safe_open(path, "pt") as f:
        task = (f.metadata() or {}).get("task", "")
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval(), task


@torch.no_grad()
def accuracy(backbone: Backbone, head: nn.Linear, images: torch.Tensor, labels: torch.Tensor) -> float:
    backbone.eval()
    correct = sum(
        int((head(backbone(images[i : i + 1000])).argmax(1) == labels[i : i + 1000]).sum())
        for i in range(0, len(images), 1000)
    )
    return correct / len(images)


def evaluate(
    backbone_folder: Path, task: str, n: int | None = None, heads: Path | None = None, device: str = "cpu"
) -> float:
    """Held-out accuracy of the backbone in ``backbone_folder`` on ``task`` with that task's expert head.

    The head is read from ``heads/<task>/head/head.safetensors``; ``heads`` defaults to the full-size vision
    family in the zoo root. ``n`` limits the test items (first ``n``; all if None).
    """
    if task not in TASKS:
        raise MergelabError(f"Unknown vision task {task!r}; valid tasks are: {', '.join(TASKS)}.")
    if heads is None:
        from mergelab.zoo import family_dir

        heads = family_dir("vision", "full")
    head, head_task = load_head(Path(heads) / task)
    if head_task != task:
        raise MergelabError(f"{Path(heads) / task / HEAD_FILE} classifies {head_task!r}, not {task!r}.")
    backbone = load_backbone(backbone_folder).to(device)
    return accuracy(backbone, head.to(device), *_on(device, *task_data(TASKS[task], "test", n)))


# ---------------------------------------------------------------------------------------------- training


def _fit(params: list[nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], steps: int, lr: float,
         batch: int, n_items: int, seed: int) -> float:
    """Adam over ``steps`` random mini-batches (indices into ``n_items``), cosine decay to 10 %; returns the
    mean loss over the last tenth of the steps."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.55 + 0.45 * np.cos(np.pi * i / steps))
    gen = torch.Generator().manual_seed(seed)
    tail = []
    for step in range(steps):
        loss = loss_of(torch.randint(0, n_items, (batch,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    return float(np.mean(tail))


def _on(device: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def _make_base(out: Path, s: dict[str, Any], device: str) -> dict[str, Any]:
    images, labels = _on(device, *task_data(PRETRAIN_TASK, "train", s["train_items"]))
    torch.manual_seed(0)
    backbone = Backbone(s["channels"], s["features"]).to(device)
    head = nn.Linear(s["features"], 10).to(device)
    backbone.train()
    loss = _fit(
        [*backbone.parameters(), *head.parameters()],
        lambda idx: F.cross_entropy(head(backbone(images[idx])), labels[idx]),
        s["pretrain_steps"],
        s["lr"],
        s["batch"],
        len(images),
        seed=0,
    )
    save_backbone(backbone, out, s["channels"], s["features"])
    save_head(head, out, PRETRAIN_TASK.name)
    test = _on(device, *task_data(PRETRAIN_TASK, "test", s["eval_n"]))
    score = {"accuracy": round(accuracy(backbone, head, *test), 4), "test_items": len(test[1])}
    return {
        "data": {"fashion_mnist_train_images": len(images)},
        "steps": s["pretrain_steps"],
        "hyper": {"lr": s["lr"], "batch": s["batch"], "optimizer": "Adam"},
        "final_loss": round(loss, 4),
        "scores": {PRETRAIN_TASK.name: score},
    }


def _make_expert(out: Path, base: Path, task: VisionTask, seed: int, s: dict[str, Any], device: str) -> dict[str, Any]:
    images, labels = _on(device, *task_data(task, "train", s["train_items"]))
    backbone = load_backbone(base).to(device)
    torch.manual_seed(seed)
    head = nn.Linear(s["features"], len(task.classes)).to(device)
    probe = slice(0, s["probe_items"])
    with torch.no_grad():
        features = backbone(images[probe])
    probe_loss = _fit(
        list(head.parameters()),
        lambda idx: F.cross_entropy(head(features[idx]), labels[probe][idx]),
        s["probe_steps"],
        1e-2,
        s["batch"] * 4,
        len(features),
        seed=seed,
    )
    head.requires_grad_(False)
    test = _on(device, *task_data(task, "test", s["eval_n"]))
    before = accuracy(backbone, head, *test)
    backbone.train()
    loss = _fit(
        list(backbone.parameters()),
        lambda idx: F.cross_entropy(head(backbone(images[idx])), labels[idx]),
        s["expert_steps"],
        s["lr"] * 0.5,
        s["batch"],
        len(images),
        seed=seed + 1,
    )
    save_backbone(backbone, out, s["channels"], s["features"])
    save_head(head, out, task.name)
    return {
        "data": {"task": task.description, "train_items": len(images), "probe_items": len(features)},
        "steps": s["expert_steps"],
        "hyper": {"lr": s["lr"] * 0.5, "batch": s["batch"], "probe_steps": s["probe_steps"], "probe_lr": 1e-2},
        "probe_final_loss": round(probe_loss, 4),
        "final_loss": round(loss, 4),
        "scores": {
            task.name: {
                "accuracy": round(accuracy(backbone, head, *test), 4),
                "base_accuracy": round(before, 4),
                "test_items": len(test[1]),
            }
        },
    }


def plan(size: str) -> FamilyPlan:
    """The base, then one expert per task (parent: base)."""
    s = SIZES[size]
    members = [
        Member("base", None, {"kind": "pretrain", "seed": 0}, lambda out, _built, device: _make_base(out, s, device))
    ]
    for seed, task in enumerate(TASKS.values(), start=10):
        settings = {"kind": "finetune", "task": task.name, "seed": seed}
        members.append(
            Member(
                task.name,
                "base",
                settings,
                lambda out, built, device, t=task, sd=seed: _make_expert(out, built["base"], t, sd, s, device),
            )
        )
    family_settings = {**s, "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    scenarios = {"all_experts": list(TASKS)}
    return FamilyPlan("vision", size, family_settings, members, scenarios, LICENCES, (Path(__file__),))
