"""Ground truth by autograd (float64): the gradient and Hessian of J with respect to a zero-initialised
square layer T(h) = h + sigma(W h + b) (a "same" conv for feature maps) inserted at one position."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hf_topoadapt.activations import SiLUTanh
from hf_topoadapt.sensitivity.capture import Tap, transform_stream
from hf_topoadapt.sensitivity.objective import batch_loss


def square_layer(theta: torch.Tensor, width: int, layout: str, kernel_size: int, activation):
    """h -> h + sigma(W h + b) with theta = [W | b] flattened row-major, one row per output neuron."""
    rows = theta.reshape(width, -1)

    def layer(h: torch.Tensor) -> torch.Tensor:
        if layout == "channels":
            weight = rows[:, :-1].reshape(width, width, kernel_size, kernel_size)
            return h + activation(F.conv2d(h, weight, rows[:, -1], padding=kernel_size // 2))
        return h + activation(F.linear(h, rows[:, :-1], rows[:, -1]))

    return layer


def objective(model, batches, loss_fn, tap: Tap, width: int, layout: str, kernel_size: int = 3, activation=None):
    """J(theta): the mean batch loss with the square layer at the tap."""
    activation = activation or SiLUTanh()

    def J(theta: torch.Tensor) -> torch.Tensor:
        with transform_stream(tap, square_layer(theta, width, layout, kernel_size, activation)):
            return sum(batch_loss(model, b, loss_fn) for b in batches) / len(batches)

    return J


def gradient_and_hessian(J, size: int, dtype=torch.float64):
    theta = torch.zeros(size, dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(J(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(size)]
    return grad.detach(), torch.stack(rows)
