"""Admissible activations: sigma(0) = 0, sigma'(0) = 0, sigma''(0) != 0 (METHOD.md section 2).

With sigma'(0) = 0 a zero-initialised layer has exactly zero gradient, and the loss change of a small
insertion is governed by the second-order term c = sigma''(0). ReLU, GELU and tanh break this.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class SiLUTanh(nn.Module):
    """The reference activation sigma(x) = 2 * SiLU(x) - tanh(x): sigma''(0) = 1, sigma'''(0) = 2."""

    second_derivative_at_zero = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * F.silu(x) - torch.tanh(x)


class HalfSquare(nn.Module):
    """sigma(x) = x^2 / 2, the pure second-order activation (sigma''(0) = 1); useful in tests."""

    second_derivative_at_zero = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * x


class XTanh(nn.Module):
    """sigma(x) = x * tanh(x / 2) = 2 * SiLU(x) - x: SiLU with its linear part at 0 removed (sigma''(0) = 1). Even and
    about |x| away from 0, where silu_tanh is about 2x - 1 on one side and +1 on the other: a symmetric rectifier for
    the inserted layer's training."""

    second_derivative_at_zero = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(0.5 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"silu_tanh": SiLUTanh, "half_square": HalfSquare, "x_tanh": XTanh}


class InadmissibleActivationError(ValueError):
    """The activation breaks sigma(0) = sigma'(0) = 0 != sigma''(0)."""


@torch.enable_grad()  # scoring may run under torch.no_grad()
def derivatives_at_zero(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, float]:
    """Returns (sigma(0), sigma'(0), sigma''(0)) by float64 autograd."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    y = fn(x)
    (d1,) = torch.autograd.grad(y, x, create_graph=True)
    if not d1.requires_grad:  # constant first derivative: the second one is zero
        return float(y.detach()), float(d1), 0.0
    (d2,) = torch.autograd.grad(d1, x)
    return float(y.detach()), float(d1.detach()), float(d2)


def check_activation(fn: Callable[[torch.Tensor], torch.Tensor], tol: float = 1e-10) -> float:
    """Checks admissibility and returns c = sigma''(0).

    Raises:
        InadmissibleActivationError: naming the broken condition and the admissible choices.
    """
    value, slope, curvature = derivatives_at_zero(fn)
    name = getattr(fn, "__name__", type(fn).__name__)
    problems = []
    if not all(math.isfinite(x) for x in (value, slope, curvature)):
        problems.append(
            f"its value and derivatives at 0 are not all finite (sigma(0) = {value}, sigma'(0) = {slope}, "
            f"sigma''(0) = {curvature})"
        )
    elif abs(value) > tol:
        problems.append(f"sigma(0) = {value:.3g} (must be 0: the new layer must start as the identity)")
    if math.isfinite(slope) and abs(slope) > tol:
        problems.append(
            f"sigma'(0) = {slope:.3g} (must be 0: otherwise the first-order term does not vanish "
            "and the topological derivative is not the eigenvalue problem of METHOD.md)"
        )
    if math.isfinite(curvature) and abs(curvature) <= tol:
        problems.append("sigma''(0) = 0 (must be non-zero: it scales the whole second-order term)")
    if problems:
        raise InadmissibleActivationError(
            f"activation {name} is not admissible: "
            + "; ".join(problems)
            + f". Use one of {sorted(ACTIVATIONS)} (the reference is 'silu_tanh' = 2*SiLU(x) - tanh(x)); "
            "ReLU, GELU and tanh are not admissible."
        )
    return curvature


def resolve_activation(activation: str | nn.Module | Callable) -> tuple[nn.Module, float]:
    """Turns a name, module or callable into (module, c = sigma''(0)), checking admissibility."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise InadmissibleActivationError(
                f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} or pass a module"
            )
        module = ACTIVATIONS[activation]()
    elif isinstance(activation, nn.Module):
        module = activation
    elif callable(activation):
        module = _CallableActivation(activation)
    else:
        raise InadmissibleActivationError(f"activation must be a name, a module or a callable, got {activation!r}")
    return module, check_activation(module)


class _CallableActivation(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "callable")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
