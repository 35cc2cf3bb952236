"""Calibration data for the three tasks, read from the user's files or datasets and cut into dict batches
`model(**batch)` with the labels inside (the Hugging Face convention the scoring uses).

- labelled text: a TSV or JSONL file, tokenised by the model's tokenizer;
- images: a local image folder (`imagefolder` layout, one subfolder per class) or a Hub dataset, through
  `datasets`, preprocessed by the model's own image processor;
- plain text for a causal language model: one document per line, or the whole file cut into blocks of
  --max-length tokens (as transformers' run_clm example does); the labels are the inputs.
"""

from __future__ import annotations

import inspect
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import CLIError, first_line, hub_offline_note, looks_like_path

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IGNORE_INDEX = -100  # positions the transformers losses skip (padding)


def subsample(count: int, max_examples: int | None, seed: int) -> list[int] | None:
    """Indices of a seeded random subset of `max_examples` (None: keep all, in order). Random rather than the
    first N: image folders and many datasets are sorted by class."""
    if max_examples is None or max_examples >= count:
        return None
    return random.Random(seed).sample(range(count), max_examples)


# ----------------------------------------------------------------------------------------------------
# Labelled text


def _parse_label(value, where: str):
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise CLIError(f"{where}: missing or invalid label {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _readable_file(path: Path, what: str) -> str:
    if not path.exists():
        raise CLIError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CLIError(f"{what} {str(path)!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read {what} {str(path)!r}: {error}") from None


def read_text_file(path: Path) -> tuple[list[str], list]:
    """Texts and raw labels (ints or names) from a TSV ('label<TAB>text') or a JSONL file."""
    lines = _readable_file(path, "text file").splitlines()
    texts, labels = [], []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CLIError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
                raise CLIError(f'{where}: expected an object with "text" (a string) and "label"')
            text, label = row["text"], row["label"]
        else:
            if "\t" not in line:
                raise CLIError(f"{where}: expected 'label<TAB>text' (or use a .jsonl file)")
            label, text = line.split("\t", 1)
        label = _parse_label(label, where)
        if not text.strip():
            raise CLIError(f"{where}: empty text")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise CLIError(f"text file {str(path)!r} holds no examples")
    return texts, labels


def check_num_labels(num_labels: int | None, needed: int) -> int:
    """The head's classes: --num-labels when given (at least the data's classes), else the data's (>= 2)."""
    if num_labels is None:
        return max(needed, 2)
    if num_labels < 2:
        raise CLIError(f"--num-labels must be at least 2 for classification, got {num_labels}")
    if num_labels < needed:
        raise CLIError(f"--num-labels {num_labels} is too small: the data has {needed} classes")
    return num_labels


def encode_labels(labels: list, num_labels: int | None) -> tuple[list[int], list[str], int]:
    """Integer labels, label names and the number of classes."""
    if all(isinstance(label, int) for label in labels):
        if min(labels) < 0:
            raise CLIError(f"integer labels must be >= 0, got {min(labels)}")
        needed = max(labels) + 1
        names = [str(i) for i in range(needed)]
        ids = list(labels)
    else:
        names = list(dict.fromkeys(str(label) for label in labels))
        ids = [names.index(str(label)) for label in labels]
        needed = len(names)
    return ids, names, check_num_labels(num_labels, needed)


def load_examples(
    text_file: Path | None, num_labels: int | None, max_examples: int | None = None, seed: int = 0
) -> tuple[list[str], list[int], list[str], int, str]:
    """Texts, integer labels, label names, classes and a description: the file's, or the embedded demo set."""
    if text_file is None:
        from .._demo_data import demo_examples

        texts, ids, names = demo_examples()
        num_labels = check_num_labels(num_labels, len(names))
        data_name = "embedded demo set (4 topics x 16 sentences)"
    else:
        texts, labels = read_text_file(text_file)
        ids, names, num_labels = encode_labels(labels, num_labels)
        data_name = str(text_file)
    indices = subsample(len(texts), max_examples, seed)
    if indices is not None:
        texts, ids = [texts[i] for i in indices], [ids[i] for i in indices]
    return texts, ids, names, num_labels, data_name


def make_batches(model, tokenizer, texts: list[str], labels: list[int], max_length: int, batch_size: int) -> list:
    """Dict batches `model(**batch)` with the labels inside, each padded to its longest text."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {key: value for key, value in encoded.items() if key in accepted and key in TEXT_KEYS}
        batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------------------------------
# Plain text for a causal language model


def read_plain_text(path: Path | None) -> tuple[str, str]:
    """The text and a description: the file's, or the embedded demo sentences one per line."""
    if path is None:
        from .._demo_data import demo_examples

        return "\n".join(demo_examples()[0]) + "\n", "embedded demo set (64 English sentences, one per line)"
    text = _readable_file(path, "text file")
    if not text.strip():
        raise CLIError(f"text file {str(path)!r} holds no text")
    return text, str(path)


def lm_sequences(tokenizer, text: str, max_length: int, line_by_line: bool) -> tuple[list[list[int]], str]:
    """Token id sequences of at most `max_length` and a note on what was left out.

    Line by line, each non-blank line is one document (truncated). Otherwise the whole text is tokenised once
    and cut into blocks of exactly `max_length`; the short remainder is dropped, as in run_clm, unless it is
    all there is. A sequence needs two tokens: the loss predicts each token from those before it.
    """
    from .models import quiet_loading

    with quiet_loading():  # tokenising a long text warns that it exceeds the model's length; blocks follow
        if line_by_line:
            documents = [line for line in text.splitlines() if line.strip()]
            ids = tokenizer(documents, truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = [tokenizer(text)["input_ids"]]
    if line_by_line:
        sequences = [sequence for sequence in ids if len(sequence) >= 2]
        dropped = len(ids) - len(sequences)
        note = f"{dropped} one-token lines skipped" if dropped else ""
    else:
        tokens = ids[0]
        sequences = [tokens[start : start + max_length] for start in range(0, len(tokens) - max_length + 1, max_length)]
        left = len(tokens) - max_length * len(sequences)
        note = f"the last {left} of {len(tokens)} tokens dropped: fewer than --max-length" if left else ""
        if not sequences and len(tokens) >= 2:
            sequences, note = [tokens], ""
    if not sequences:
        raise CLIError("the text holds no sequence of two tokens or more: nothing for a language model to predict")
    return sequences, note


def lm_batches(model, tokenizer, sequences: list[list[int]], batch_size: int) -> list:
    """Dict batches with `labels = input_ids`; padding on the right (the training convention) with its labels set
    to -100 so the loss skips it."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        longest = max(len(sequence) for sequence in chunk)
        if tokenizer.pad_token_id is None and any(len(sequence) < longest for sequence in chunk):
            raise CLIError(
                "the tokenizer has neither a pad nor an eos token to pad documents of different lengths with: "
                "leave out --line-by-line (the text is then cut into equal blocks)"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([sequence + [pad] * (longest - len(sequence)) for sequence in chunk])
        attention_mask = torch.tensor([[1] * len(sequence) + [0] * (longest - len(sequence)) for sequence in chunk])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
        }
        batches.append({key: value for key, value in batch.items() if key in accepted})
    return batches


# ----------------------------------------------------------------------------------------------------
# Image classification


@dataclass
class ImageData:
    dataset: object  # a datasets.Dataset with the image column decoded to PIL images
    image_column: str
    labels: list[int]
    names: list[str]
    num_labels: int
    description: str


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


def _pick_column(features: dict, given: str | None, guesses: tuple[str, ...], feature_type, option: str, source: str):
    """The given column, else the first of `guesses` present, else the only column of `feature_type`."""
    if given is not None:
        if given not in features:
            raise CLIError(f"{option} {given!r}: dataset {source!r} has no such column (columns: {list(features)})")
        return given
    for name in guesses:
        if name in features:
            return name
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    return typed[0] if len(typed) == 1 else None


def _load_dataset(source: str, split: str, config_name: str | None, cache_dir: str | None):
    """`datasets.load_dataset` on a local image folder or a Hub id, every loading failure as one line."""
    try:
        import datasets
    except ImportError:
        raise CLIError("--image-dataset needs the datasets package: pip install datasets") from None
    from .models import quiet_loading

    path = os.path.expanduser(source)
    local = os.path.isdir(path)
    if os.path.exists(path) and not local:
        raise CLIError(
            f"image dataset {source!r} is a file: pass a folder of images (one subfolder per class) or a Hub dataset id"
        )
    if not local and looks_like_path(source):
        raise CLIError(f"image folder {source!r} does not exist")
    if local and not _has_images(path):
        raise CLIError(
            f"image folder {source!r} holds no images (expected one subfolder per class: {source}/<class>/<image>)"
        )
    # datasets raises many types here (hub, network, split, config, builder errors): all are the user's input.
    errors = (OSError, ValueError, ImportError, getattr(datasets.exceptions, "DatasetsError", OSError))
    with quiet_loading(datasets=True):
        try:
            if local:
                return datasets.load_dataset("imagefolder", data_dir=path, split=split, cache_dir=cache_dir), local
            return datasets.load_dataset(source, config_name, split=split, cache_dir=cache_dir), local
        except errors as error:
            where = "" if local else f" (not a local folder, and not found on the Hugging Face Hub{hub_offline_note()})"
            raise CLIError(f"cannot load image dataset {source!r}{where}: {first_line(error)}") from None


def load_image_dataset(
    source: str,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    num_labels: int | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> ImageData:
    """A labelled image dataset: the columns guessed (image/img, label/labels) or given, the labels encoded."""
    import datasets

    dataset, local = _load_dataset(source, split, config_name, cache_dir)
    if len(dataset) == 0:
        raise CLIError(f"image dataset {source!r} has no rows in split {split!r}")
    features = dataset.features
    image_column = _pick_column(features, image_column, IMAGE_COLUMNS, datasets.Image, "--image-column", source)
    if image_column is None:
        raise CLIError(
            f"dataset {source!r} has no image column (columns: {list(features)}): name it with --image-column"
        )
    if not isinstance(features[image_column], datasets.Image):
        raise CLIError(f"column {image_column!r} of {source!r} holds {features[image_column]}, not images")
    label_column = _pick_column(features, label_column, LABEL_COLUMNS, datasets.ClassLabel, "--label-column", source)
    if label_column is None:
        if local:  # imagefolder gives labels only when the images sit in two or more class subfolders
            raise CLIError(
                f"image folder {source!r} has images of one class only: put each class's images in its own subfolder "
                f"({source}/<class>/<image>), at least 2 classes"
            )
        raise CLIError(
            f"dataset {source!r} has no label column (columns: {list(features)}): name it with --label-column"
        )

    values = list(dataset[label_column])
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if len(names) < 2:
            raise CLIError(f"dataset {source!r} has {len(names)} class ({names}): classification needs at least 2")
        if any(value is None or value < 0 for value in values):
            raise CLIError(f"split {split!r} of {source!r} has unlabelled images (label -1): choose another --split")
        labels, num_labels = [int(value) for value in values], check_num_labels(num_labels, len(names))
    else:
        parsed = [_parse_label(value, f"{source}, row {row} of {label_column!r}") for row, value in enumerate(values)]
        labels, names, num_labels = encode_labels(parsed, num_labels)

    indices = subsample(len(dataset), max_examples, seed)
    if indices is not None:
        dataset, labels = dataset.select(indices), [labels[i] for i in indices]
    description = f"{source} ({split} split)"
    return ImageData(dataset.select_columns([image_column]), image_column, labels, names, num_labels, description)


def image_batches(model, processor, data: ImageData, batch_size: int) -> list:
    """Dict batches of `pixel_values` from the model's own image processor, with `labels`."""
    import torch
    from tqdm.auto import tqdm

    # A grey-scale dataset (MNIST) for an RGB model, or the reverse, as transformers' image examples do.
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
    batches = []
    starts = range(0, len(data.dataset), batch_size)
    for start in tqdm(starts, desc="preprocessing images", unit="batch"):
        end = min(start + batch_size, len(data.dataset))
        try:
            images = [image.convert(mode) for image in data.dataset[start:end][data.image_column]]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        except (OSError, ValueError, TypeError, AttributeError) as error:
            where = f"images {start}-{end - 1} of {data.description}"
            raise CLIError(f"cannot preprocess {where}: {first_line(error)}") from None
        labels = torch.tensor(data.labels[start:end], dtype=torch.long)
        batches.append({"pixel_values": pixel_values, "labels": labels})
    return batches
