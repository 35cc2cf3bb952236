"""An ablation of what the eigen-initialised rows of D carry: each inserted layer's D trained as magnitude times
direction (weight normalisation), the direction held at a chosen entry scale so that Adam, whose steps are about
the learning rate per entry whatever the entry's size, turns it slowly.

Why: the inserted rows start at eps times a unit direction, entries of about 1e-3, so one Adam step of lr 0.003-0.01
per entry outweighs them; in the default the rows' mean cosine to their initial direction is 0.46 after 10 steps on
EfficientNet and 0.27 at the end (benchmarks/results/direction_drift.md). With the direction's entries of size `scale`
the same step turns it by about lr / scale per step, and the magnitude g trains freely. If the eigen direction is what
makes a position's layer work, holding it should help."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


def anchor_directions(model: nn.Module, scale: float) -> list[nn.Module]:
    """Weight-normalises every topo layer's down-projection (g and v trained, row by row), v rescaled so its entries
    have root mean square `scale` (the weight itself unchanged). Returns the modules, for `release`."""
    if not scale > 0:
        raise ValueError(f"direction scale must be positive, got {scale!r}")
    downs = [m for name, m in model.named_modules() if ".topo_down." in name and hasattr(m, "weight")]
    if not downs:
        raise ValueError("the model has no topo layers to anchor: build it with get_topo_model first")
    for module in downs:
        weight_norm(module, "weight", dim=0)
        v = module.parametrizations.weight.original1
        with torch.no_grad():
            rows = v.reshape(v.shape[0], -1)
            rms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12) / rows.shape[1] ** 0.5
            v.copy_((rows * (scale / rms)).reshape(v.shape))
    return downs


def release(downs: list[nn.Module]) -> None:
    """Back to a plain weight (the trained one), so the model saves and loads like any TopoModel."""
    for module in downs:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
