"""Exactness of the topological derivative against autograd (float64, METHOD.md section 3).

For every tiny model and every candidate position: the gradient of J with respect to a zero-initialised
square layer is exactly zero, its Hessian is exactly -Q, and the public score is lambda_max(-H).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import BUILDERS, residual_cnn, residual_mlp
from reference import objective
from torch import nn

import hf_topoadapt as hta
from hf_topoadapt.activations import ACTIVATIONS
from hf_topoadapt.locate import find_positions
from hf_topoadapt.scoring import score_with_operators
from hf_topoadapt.sensitivity.features import num_features

HESSIAN_RTOL = 1e-6
EIGEN_RTOL = 1e-6


def hessian(J, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and full Hessian of J at theta = 0, the second derivative vectorised over all rows."""
    theta = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(J(theta), theta, create_graph=True)
    eye = torch.eye(size, dtype=torch.float64)
    (rows,) = torch.autograd.grad(grad, theta, grad_outputs=eye, is_grads_batched=True)
    return grad.detach(), rows.detach()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def built(name: str):
    return BUILDERS[name]()


@functools.cache
def scored(name: str):
    model, batches, loss_fn, _, _ = built(name)
    scores, positions = score_with_operators(model, batches, None, loss_fn)
    return scores, positions


# The classifier input is a pooled vector, except for transformers' ViT, whose classifier reads the [CLS] token of
# the final layernorm's output (the tap is that output, every token).
HEAD_INPUT_LAYOUT = {"hf_bert": "vector", "timm_vit": "vector", "hf_vit": "tokens"}


def position_layout(name: str, position) -> str:
    return HEAD_INPUT_LAYOUT[name] if position.kind == "head_input" else built(name)[4]


@functools.cache
def reference(name: str, index: int):
    """(gradient, Hessian) of J at the index-th position, by autograd."""
    model, batches, loss_fn, _, _ = built(name)
    scores, positions = scored(name)
    layout = position_layout(name, positions[index])
    width = scores[index].width  # the builder's width, or the hidden size inside an MLP head
    size = width * num_features(layout, width, 3)
    return hessian(objective(model, batches, loss_fn, positions[index], width, layout), size)


CASES = [
    pytest.param(name, index, id=f"{name}-{position.name}")
    for name in BUILDERS
    for index, position in enumerate(find_positions(built(name)[0]))
]


def test_every_builder_has_positions():
    # embeddings + every block (+ the MLP head's inner position for residual_mlp)
    # (+ the classifier's input for the single-Linear classifiers of hf_vit, hf_bert and timm_vit)
    expected = {"residual_mlp": 5, "residual_cnn": 3, "hf_vit": 4, "hf_bert": 4, "hf_gpt2": 3, "hf_llama": 3}
    expected["timm_vit"] = 4
    for name, count in expected.items():
        assert len(find_positions(built(name)[0])) == count, name
    assert [p.name for p in find_positions(built("residual_mlp")[0])][-1] == "head.1"


@pytest.mark.parametrize("name,index", CASES)
def test_gradient_zero_and_hessian_is_minus_q(name, index):
    _, _, _, width, _ = built(name)
    scores, positions = scored(name)
    layout = position_layout(name, positions[index])
    score = scores[index]
    assert score.name == positions[index].name
    assert score.index == index
    assert score.layout == layout
    if positions[index].kind == "head":
        assert (name, score.width) == ("residual_mlp", 5)  # the head's hidden size
    else:
        assert score.width == width
    assert score.num_features == num_features(layout, score.width, 3)

    grad, H = reference(name, index)
    assert float(grad.abs().max()) == 0.0
    assert float(H.norm()) > 0.0
    Q = score.operator.dense()
    assert Q.dtype == torch.float64
    assert Q.shape == H.shape
    assert relative(-H, Q) < HESSIAN_RTOL, f"||H + Q|| / ||H|| = {relative(-H, Q):.3e}"


@pytest.mark.parametrize("name,index", CASES)
def test_public_eigenvalue_is_top_of_minus_hessian(name, index):
    model, batches, loss_fn, _, _ = built(name)
    _, H = reference(name, index)
    expected = torch.linalg.eigvalsh(-H).flip(0)  # descending
    scores = hta.score_positions(model, batches, loss_fn=loss_fn)
    score = scores[index]
    assert isinstance(score, hta.PositionScore)
    assert score.eigenvalue == pytest.approx(float(expected[0]), rel=EIGEN_RTOL)
    top = torch.tensor(score.top_eigenvalues, dtype=torch.float64)
    assert len(top) == min(8, len(expected))
    torch.testing.assert_close(top, expected[: len(top)], rtol=EIGEN_RTOL, atol=EIGEN_RTOL * abs(float(expected[0])))
    assert score.solver == "exact"
    assert score.operator is None  # the public call does not keep the captured operator


def test_positions_in_depth_order():
    for name in ("residual_mlp", "hf_bert"):
        scores, positions = scored(name)
        assert [s.index for s in scores] == list(range(len(scores)))
        assert scores[0].name == "embeddings"


# ---------------------------------------------------------------------------------------------------------
# J is the mean of the batch losses, every batch with equal weight


def _q(model, batches, loss_fn, config=None):
    scores, _ = score_with_operators(model, batches, config, loss_fn)
    return [s.operator.dense() for s in scores]


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_two_batches_give_the_mean_of_single_batch_operators(solver):
    model, _, loss_fn, width, layout = residual_mlp()
    g = torch.Generator().manual_seed(3)
    # unequal batch sizes: the mean of batch losses is not the mean over samples
    batches = [
        (torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)),
        (torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)),
    ]
    config = hta.ScoringConfig(solver=solver)
    both = _q(model, batches, loss_fn, config)
    first = _q(model, batches[:1], loss_fn, config)
    second = _q(model, batches[1:], loss_fn, config)
    for q2, q0, q1 in zip(both, first, second, strict=True):
        torch.testing.assert_close(q2, 0.5 * (q0 + q1), rtol=1e-12, atol=1e-14 * float(q2.abs().max()))
        # and it is not the sample-weighted mean
        assert relative((9 * q0 + 2 * q1) / 11, q2) > 1e-3

    # the reference objective with the same two batches agrees
    both_scores, positions = score_with_operators(model, batches, config, loss_fn)
    for index in (0, len(positions) - 1):
        w = both_scores[index].width
        _, H = hessian(objective(model, batches, loss_fn, positions[index], w, layout), w * (w + 1))
        assert relative(-H, both[index]) < HESSIAN_RTOL


def test_repeated_batch_leaves_q_unchanged():
    """J over [b, b] is J over [b]: Q must not double."""
    model, batches, loss_fn, _, _ = residual_cnn()
    once = _q(model, batches[:1], loss_fn)
    twice = _q(model, [batches[0], batches[0]], loss_fn)
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# the conv kernel size and the activation's curvature enter Q exactly


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_cnn_kernel_size(kernel_size):
    model, batches, loss_fn, width, layout = residual_cnn()
    config = hta.ScoringConfig(kernel_size=kernel_size)
    scores, positions = score_with_operators(model, batches, config, loss_fn)
    index = 1
    assert scores[index].num_features == width * kernel_size**2 + 1
    J = objective(model, batches, loss_fn, positions[index], width, layout, kernel_size=kernel_size)
    grad, H = hessian(J, width * (width * kernel_size**2 + 1))
    assert float(grad.abs().max()) == 0.0
    assert relative(-H, scores[index].operator.dense()) < HESSIAN_RTOL
    assert scores[index].eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(-H)[-1]), rel=EIGEN_RTOL)


class Cubic(nn.Module):
    """sigma(x) = x^2 + x^3: admissible with sigma''(0) = 2."""

    def forward(self, x):
        return x * x + x**3


@pytest.mark.parametrize("activation", ["half_square", Cubic()], ids=["half_square", "curvature2"])
def test_activation_curvature(activation):
    model, batches, loss_fn, width, layout = residual_mlp()
    config = hta.ScoringConfig(activation=activation)
    scores, positions = score_with_operators(model, batches, config, loss_fn)
    module = ACTIVATIONS[activation]() if isinstance(activation, str) else activation
    default = _q(model, batches, loss_fn)
    for index in range(len(positions)):
        w = scores[index].width
        J = objective(model, batches, loss_fn, positions[index], w, layout, activation=module)
        grad, H = hessian(J, w * (w + 1))
        assert float(grad.abs().max()) == 0.0
        assert relative(-H, scores[index].operator.dense()) < HESSIAN_RTOL
    factor = 2.0 if isinstance(activation, Cubic) else 1.0
    for s, q in zip(scores, default, strict=True):
        torch.testing.assert_close(s.operator.dense(), factor * q, rtol=1e-12, atol=0)
