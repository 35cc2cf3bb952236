"""An optimizer with its own learning rate for the topo layers, in the style of peft's `create_loraplus_optimizer`.

An eigenvector-initialised layer starts where the loss is steep (its first gradients are several times LoRA's), while
the new head starts from random weights: one learning rate for both is a compromise. Pass the result to the
transformers Trainer as `optimizers=(optimizer, None)`; the Trainer builds its LR schedule on it, every group scaled
alike.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from .config import check_real

# Growth appends new adapters' parameters to this group (GrowthConfig.param_group's default), so a grown layer trains
# at the adapters' rate.
ADAPTER_GROUP = 0
ADAPTER_PARAMETER_NAMES = ("topo_down", "topo_up")


def is_adapter_parameter(name: str) -> bool:
    return any(part in ADAPTER_PARAMETER_NAMES for part in name.split("."))


def create_topo_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    adapter_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the trainable parameters of `model` (a TopoModel), the topo layers at
    `lr * adapter_lr_ratio` and everything else (the head in `modules_to_save`, ...) at `lr`.

    Weight decay follows the Trainer's rule: not on biases and normalisation weights. Groups: adapters with decay
    (index `ADAPTER_GROUP`), adapters without, the rest with decay, the rest without; a group may be empty (a model
    grown from the head alone starts with no adapters).
    """
    lr = check_real("lr", lr, 0.0, strict=True)
    adapter_lr_ratio = check_real(
        "adapter_lr_ratio", adapter_lr_ratio, 0.0, strict=True, why=" (the adapters' lr is lr * adapter_lr_ratio)"
    )
    weight_decay = check_real("weight_decay", weight_decay, 0.0)
    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    groups: list[list[nn.Parameter]] = [[], [], [], []]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[(0 if is_adapter_parameter(name) else 2) + (0 if name in decay else 1)].append(parameter)
    if not any(groups):
        raise ValueError("the model has no trainable parameters: build it with get_topo_model first")
    rates = (lr * adapter_lr_ratio, lr * adapter_lr_ratio, lr, lr)
    decays = (weight_decay, 0.0, weight_decay, 0.0)
    return optimizer_cls(
        [{"params": p, "lr": rate, "weight_decay": wd} for p, rate, wd in zip(groups, rates, decays, strict=True)],
        lr=lr,
        **kwargs,
    )
