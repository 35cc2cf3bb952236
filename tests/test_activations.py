"""Admissible activations: sigma(0) = 0, sigma'(0) = 0, sigma''(0) = c != 0 (METHOD.md section 2), and
that c is what scales the topological derivative."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_topoadapt import InadmissibleActivationError, ScoringConfig, SiLUTanh, check_activation, score_positions
from hf_topoadapt.activations import resolve_activation
from hf_topoadapt.locate import find_positions

try:
    from . import models, reference
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models
    import reference


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def derivatives(fn, order: int) -> list[float]:
    """sigma(0), sigma'(0), ... by repeated autograd in float64."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    values, y = [], fn(x)
    for _ in range(order):
        values.append(float(y.detach()))
        (y,) = torch.autograd.grad(y, x, create_graph=True)
    values.append(float(y.detach()))
    return values


def test_silu_tanh_derivatives_at_zero():
    assert derivatives(SiLUTanh(), 3) == pytest.approx([0.0, 0.0, 1.0, 2.0], abs=1e-15)
    assert SiLUTanh.second_derivative_at_zero == 1.0


def test_silu_tanh_formula():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(SiLUTanh()(x), 2 * x * torch.sigmoid(x) - torch.tanh(x), rtol=0, atol=1e-14)
    # the Taylor series x^2/2 + x^3/3 near 0
    small = torch.tensor([1e-3, -1e-3], dtype=torch.float64)
    assert torch.allclose(SiLUTanh()(small), small**2 / 2 + small**3 / 3, rtol=1e-6, atol=0)


def test_x_tanh_is_admissible_even_and_centred_silu():
    from hf_topoadapt.activations import ACTIVATIONS, XTanh, check_activation

    assert derivatives(XTanh(), 3) == pytest.approx([0.0, 0.0, 1.0, 0.0], abs=1e-15)
    assert check_activation(XTanh()) == pytest.approx(XTanh.second_derivative_at_zero, abs=1e-9)
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(XTanh()(x), 2 * x * torch.sigmoid(x) - x, rtol=0, atol=1e-13)
    assert torch.equal(XTanh()(x), XTanh()(-x))
    assert ACTIVATIONS["x_tanh"] is XTanh


@pytest.mark.parametrize(
    "fn, condition",
    [
        (nn.ReLU(), "sigma''(0) = 0"),
        (F.relu, "sigma''(0) = 0"),
        (nn.GELU(), "sigma'(0) = 0.5"),
        (torch.tanh, "sigma'(0) = 1"),
        (nn.Tanh(), "sigma'(0) = 1"),
        (nn.Identity(), "sigma'(0) = 1"),
        (lambda x: x, "sigma'(0) = 1"),
        (torch.sigmoid, "sigma(0) = 0.5"),
        (torch.cos, "sigma(0) = 1"),
        (lambda x: x**3, "sigma''(0) = 0"),
        (lambda x: 0 * x, "sigma''(0) = 0"),
    ],
    ids=["ReLU", "relu", "GELU", "tanh", "Tanh", "Identity", "identity", "sigmoid", "cos", "cube", "zero"],
)
def test_check_activation_rejects(fn, condition):
    with pytest.raises(InadmissibleActivationError, match="not admissible") as info:
        check_activation(fn)
    message = str(info.value)
    assert condition in message
    assert "silu_tanh" in message


def test_tanh_message_names_both_broken_conditions():
    with pytest.raises(InadmissibleActivationError) as info:
        check_activation(torch.tanh)
    assert "sigma'(0) = 1" in str(info.value) and "sigma''(0) = 0" in str(info.value)
    assert "tanh" in str(info.value)


class Scaled(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return 0.5 * self.c * x * x * torch.cos(x)


@pytest.mark.parametrize(
    "fn, c",
    [
        (lambda x: 0.5 * x * x, 1.0),
        (SiLUTanh(), 1.0),
        (lambda x: 3.0 * x**2 + x**3, 6.0),
        (lambda x: -0.25 * x**2, -0.5),
        (Scaled(2.5), 2.5),
        (lambda x: x * torch.sin(x), 2.0),
    ],
    ids=["half_square", "silu_tanh", "3x^2+x^3", "negative", "module", "x_sin_x"],
)
def test_check_activation_accepts_and_returns_c(fn, c):
    assert check_activation(fn) == pytest.approx(c, rel=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: 0.5 * x * x * (torch.sin(x) / x),  # x sin(x) / 2 written with a 0 / 0 at 0
        lambda x: x.abs() ** 1.5,  # no second derivative at 0
        lambda x: x * x * torch.log(x.abs()),
    ],
    ids=["nan-at-zero", "abs-power", "x2-log"],
)
def test_check_activation_rejects_non_finite_derivatives(fn):
    """NaN compares False with every tolerance: a NaN sigma(0) or c must not pass as admissible."""
    with pytest.raises(InadmissibleActivationError):
        check_activation(fn)


def test_resolve_activation_names_modules_and_callables():
    module, c = resolve_activation("silu_tanh")
    assert isinstance(module, SiLUTanh) and c == 1.0
    module, c = resolve_activation("half_square")
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert torch.equal(module(x), 0.5 * x * x) and c == 1.0
    module, c = resolve_activation(lambda t: 2.0 * t * t)
    assert isinstance(module, nn.Module) and c == pytest.approx(4.0)
    assert torch.equal(module(x), 2.0 * x * x)
    with pytest.raises(InadmissibleActivationError, match="unknown activation 'swish'"):
        resolve_activation("swish")
    with pytest.raises(InadmissibleActivationError, match="must be a name"):
        resolve_activation(3.0)


# --- c scales the topological derivative ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_scores():
    model, batches, loss_fn, width, layout = models.residual_mlp()
    base = score_positions(model, batches, None, loss_fn)
    return model, batches, loss_fn, width, layout, base


@pytest.mark.parametrize("c", [3.0, 0.5])
def test_positive_c_scales_every_eigenvalue(mlp_scores, c):
    model, batches, loss_fn, _, _, base = mlp_scores
    scaled = score_positions(model, batches, ScoringConfig(activation=lambda x: 0.5 * c * x * x), loss_fn)
    for a, b in zip(base, scaled, strict=True):
        assert b.eigenvalue == pytest.approx(c * a.eigenvalue, rel=1e-10)


def test_negative_c_flips_the_spectrum_against_the_reference_hessian(mlp_scores):
    """With c < 0, Q = c sum p z z^T: Lambda is -c times the smallest eigenvalue of the c = 1 operator.
    Checked against the autograd Hessian of a square layer with the same activation."""
    model, batches, loss_fn, width, layout, _ = mlp_scores

    def activation(x):
        return -0.5 * x * x + x**3

    scores = score_positions(model, batches, ScoringConfig(activation=activation), loss_fn)
    tap = next(p for p in find_positions(model) if p.name == "blocks.1")
    J = reference.objective(model, batches, loss_fn, tap, width, layout, activation=activation)
    gradient, hessian = reference.gradient_and_hessian(J, width * (width + 1))
    assert gradient.abs().max() < 1e-14
    expected = torch.linalg.eigvalsh(-hessian).max().item()
    got = next(s for s in scores if s.name == "blocks.1").eigenvalue
    assert got == pytest.approx(expected, rel=1e-9)
