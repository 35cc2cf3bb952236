"""What the baselines need beyond the topological derivative: other ways to choose the position
(random, last, SensLI's first-order score) and to initialise the new layer (small random rows, or
Net2DeeperNet's function-preserving start). All new layers are the same `TopoAdapter` residual form.
"""

from __future__ import annotations

import contextlib
import math
import random

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import TopoAdapter
from ..locate import Position
from ..scoring import scoring_mode
from ..sensitivity.capture import transform_stream
from ..sensitivity.features import layout_of
from ..sensitivity.objective import LossFn, batch_loss


class GradientProbe(nn.Module):
    """h + tanh(W h + b) with W = 0, b = 0: the identity, but with a non-zero first-order gradient
    (tanh'(0) = 1), which is SensLI's score. Its parameters are created at the first call, once the state's
    shape is known; a 4-d state is a feature map and gets a "same" conv."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.layout, self.width = "", 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            self.layout = layout_of(h)
            self.width = h.shape[1] if self.layout == "channels" else h.shape[-1]
            shape = (self.width, self.width, self.kernel_size, self.kernel_size)
            if self.layout != "channels":
                shape = (self.width, self.width)
            self.weight = torch.zeros(shape, dtype=h.dtype, device=h.device, requires_grad=True)
            self.bias = torch.zeros(self.width, dtype=h.dtype, device=h.device, requires_grad=True)
        if self.layout == "channels":
            return h + torch.tanh(F.conv2d(h, self.weight, self.bias, padding=self.kernel_size // 2))
        return h + torch.tanh(F.linear(h, self.weight, self.bias))


def probe_positions(
    model: nn.Module, batches: list, positions: list[Position], loss_fn: LossFn | None, kernel_size: int = 3
) -> list[GradientProbe]:
    """Attaches a zero probe at every position at once and runs one forward and backward pass per batch.

    At zero every probe is the identity, so each one's gradient is the one it would have alone: the
    SensLI score of every position from a single pass. The model's own .grad fields are not touched.
    """
    probes = [GradientProbe(kernel_size) for _ in positions]
    with contextlib.ExitStack() as stack, scoring_mode(model, True), torch.enable_grad():
        for position, probe in zip(positions, probes, strict=True):
            stack.enter_context(transform_stream(position, probe))
        totals: list[torch.Tensor] | None = None  # d J / d (W, b) of every probe, summed over the batches
        for index, batch in enumerate(batches):
            loss = batch_loss(model, batch, loss_fn, index) / len(batches)  # J is the mean of the batch losses
            parameters = [t for probe in probes for t in (probe.weight, probe.bias)]
            grads = torch.autograd.grad(loss, parameters)
            totals = list(grads) if totals is None else [t + g for t, g in zip(totals, grads, strict=True)]
    for i, probe in enumerate(probes):
        probe.score = math.sqrt(float(totals[2 * i].double().pow(2).sum() + totals[2 * i + 1].double().pow(2).sum()))
    return probes


def pick_position(
    where: str,
    positions: list[Position],
    probes: list[GradientProbe],
    rng: random.Random,
) -> int:
    """Index of the chosen position for the non-topological rules."""
    if where == "random":
        return rng.randrange(len(positions))
    if where == "last":
        body = [i for i, p in enumerate(positions) if p.kind in ("embeddings", "block", "custom")]
        return body[-1] if body else len(positions) - 1
    if where == "sensli":
        return max(range(len(probes)), key=lambda i: probes[i].score)
    raise ValueError(f"unknown position rule {where!r}")


@torch.no_grad()
def initialised_layer(
    init: str,
    width: int,
    neurons: int,
    layout: str,
    kernel_size: int,
    activation,
    scale: float,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> TopoAdapter:
    """A new trainable layer h + U sigma(D h + b) with a baseline initialisation.

    'random': the paper's random insertion: m output axes chosen at random, rows of [D | b] ~ N(0, scale^2).
    'identity': Net2DeeperNet's function-preserving start: U = 0 (the output is exactly h) and D with the
    usual 1/sqrt(fan_in) std, so sigma(D h) != 0 and the gradient flows into U from the first step.
    """
    adapter = TopoAdapter(width, neurons, layout, kernel_size, activation, train_up=True, dtype=dtype, device=device)
    weight, bias = adapter.down.weight, adapter.down.bias

    def normal(shape, std):
        return (std * torch.randn(shape, generator=generator, dtype=torch.float64)).to(weight.dtype)

    if init == "random":
        weight.copy_(normal(weight.shape, scale))
        bias.copy_(normal(bias.shape, scale))
        axes = torch.randperm(width, generator=generator)[:neurons]
        up = torch.zeros(width, neurons, dtype=adapter.up.dtype)
        up[axes, torch.arange(len(axes))] = 1.0
        adapter.up.copy_(up)
    elif init == "identity":
        weight.copy_(normal(weight.shape, weight[0].numel() ** -0.5))
        adapter.up.zero_()
    else:
        raise ValueError(f"unknown baseline initialisation {init!r}")
    return adapter
