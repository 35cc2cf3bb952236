"""Every misuse gets a clear error, and the model comes back exactly as it was: same parameters and
buffers, no hook left behind, every module's training flag unchanged."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_topoadapt import (
    CalibrationDataError,
    InadmissibleActivationError,
    PositionsNotFoundError,
    ScoringConfig,
    insert_layer,
    score_positions,
)

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models

ENTRY_POINTS = {
    "score_positions": lambda model, data, config=None, loss_fn=None: score_positions(model, data, config, loss_fn),
    "insert_layer": lambda model, data, config=None, loss_fn=None: insert_layer(model, data, config, loss_fn),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(model: nn.Module):
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: tuple(tuple(getattr(m, attr, {})) for attr in hook_dicts) for name, m in model.named_modules()},
        {name: m.training for name, m in model.named_modules()},
        [name for name, _ in model.named_modules()],
        [p.requires_grad for p in model.parameters()],
    )


@contextlib.contextmanager
def unchanged(model: nn.Module):
    """Asserts on exit (error or not) that the model is as it was on entry."""
    state, hooks, training, names, grads = snapshot(model)
    try:
        yield
    finally:
        now_state, now_hooks, now_training, now_names, now_grads = snapshot(model)
        assert list(now_state) == list(state)
        for key, value in state.items():
            assert torch.equal(now_state[key], value), key
        assert now_hooks == hooks
        assert now_training == training
        assert now_names == names
        assert now_grads == grads
        assert all(p.grad is None for p in model.parameters())


def mixed_modes(model: nn.Module) -> nn.Module:
    """Training flags that eval() inside the package would overwrite: root in train, one child in eval."""
    model.train()
    next(iter(model.children())).eval()
    return model


def mlp():
    model, batches, loss_fn, _, _ = models.residual_mlp()
    return mixed_modes(model), batches, loss_fn


def raises(entry: str, model, data, error, match, config=None, loss_fn=None):
    with unchanged(model), pytest.raises(error, match=match) as info:
        ENTRY_POINTS[entry](model, data, config, loss_fn)
    return str(info.value)


# --- positions ---------------------------------------------------------------------------------------------


class Flat(nn.Module):
    """No list of blocks anywhere."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_model_without_a_block_list(entry):
    model = mixed_modes(Flat().double())
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    message = raises(entry, model, data, PositionsNotFoundError, "no block list found", loss_fn=F.mse_loss)
    assert "searched" in message and "block_path" in message
    assert "encoder.layer" in message and "blocks" in message  # what was searched, by name


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_wrong_block_path_suggests_close_names(entry):
    model, batches, loss_fn = mlp()
    config = ScoringConfig(block_path="block")
    message = raises(entry, model, batches, PositionsNotFoundError, "does not exist", config, loss_fn)
    assert "'block'" in message and "Did you mean" in message and "'blocks'" in message


def test_block_path_that_is_not_a_list():
    model, batches, loss_fn = mlp()
    raises(
        "score_positions",
        model,
        batches,
        PositionsNotFoundError,
        "not a non-empty",
        ScoringConfig(block_path="inp"),
        loss_fn,
    )


def test_unknown_position_in_config():
    model, batches, loss_fn = mlp()
    config = ScoringConfig(positions=["blocks.7"])
    message = raises("score_positions", model, batches, PositionsNotFoundError, "does not exist", config, loss_fn)
    assert "blocks.7" in message


def test_unknown_position_argument_of_insert_layer():
    model, batches, loss_fn = mlp()
    with unchanged(model), pytest.raises(ValueError, match="not a candidate") as info:
        insert_layer(model, batches, None, loss_fn, position="blocks.9")
    message = str(info.value)
    assert "'blocks.9'" in message
    for name in ("embeddings", "blocks.0", "blocks.2", "head.1"):
        assert repr(name) in message  # the candidates are listed


# --- calibration data and losses ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("data", [[], (), iter([]), (b for b in [])], ids=["list", "tuple", "iterator", "generator"])
def test_empty_data(entry, data):
    model, _, loss_fn = mlp()
    raises(entry, model, data, CalibrationDataError, "empty", loss_fn=loss_fn)


def test_none_data():
    model, _, loss_fn = mlp()
    raises("insert_layer", model, None, CalibrationDataError, "None", loss_fn=loss_fn)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad, word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_loss_names_the_batch(entry, bad, word):
    model, batches, loss_fn = mlp()
    inputs, targets = batches[1]
    targets = targets.clone()
    targets[0, 0] = bad  # mse: nan or inf
    data = [batches[0], (inputs, targets), batches[0]]
    message = raises(entry, model, data, CalibrationDataError, "batch 1 ", loss_fn=loss_fn)
    assert word in message.lower()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_nan_input_names_the_batch(entry):
    model, batches, loss_fn = mlp()
    inputs = batches[0][0].clone()
    inputs[2, 1] = float("nan")
    raises(
        entry,
        model,
        [batches[1], batches[1], (inputs, batches[0][1])],
        CalibrationDataError,
        "batch 2 ",
        loss_fn=loss_fn,
    )


@pytest.fixture(scope="module")
def vit():
    return models.hf_vit()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_dict_batch_without_labels(vit, entry):
    model, batches, _, _, _ = vit
    mixed_modes(model)
    data = [{"pixel_values": b["pixel_values"]} for b in batches]
    message = raises(entry, model, data, CalibrationDataError, "no loss")
    assert "labels" in message and "loss_fn" in message
    model.eval()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_tuple_batch_without_loss_fn(entry):
    model, batches, _ = mlp()
    message = raises(entry, model, batches, CalibrationDataError, "loss_fn")
    assert "tuple" in message


@pytest.mark.parametrize(
    "data, match",
    [
        ([torch.randn(4, 3, dtype=torch.float64)], "unsupported batch of type Tensor"),
        ([(torch.randn(4, 3, dtype=torch.float64),)], "unsupported batch of type tuple"),
        ([(torch.randn(4, 3), torch.randn(4, 2), torch.randn(4))], "unsupported batch of type tuple"),
        ([42], "unsupported batch of type int"),
        ([None], "unsupported batch of type NoneType"),
        ({"x": torch.randn(4, 3)}, "single batch"),
        (torch.randn(2, 4, 3), "single batch"),
    ],
    ids=["tensor", "one-tuple", "three-tuple", "int", "none", "bare-dict", "bare-tensor"],
)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unsupported_batches(entry, data, match):
    model, _, loss_fn = mlp()
    message = raises(entry, model, data, CalibrationDataError, match, loss_fn=loss_fn)
    assert "dict" in message or "[batch]" in message


def test_non_scalar_loss():
    model, batches, _ = mlp()
    raises("insert_layer", model, batches, CalibrationDataError, "scalar", loss_fn=lambda out, y: (out - y) ** 2)


# --- activations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation, condition",
    [
        (nn.ReLU(), "sigma''(0) = 0"),  # autograd's ReLU'(0) is 0: the curvature test catches it
        (nn.GELU(), "sigma'(0) = 0.5"),
        (nn.Tanh(), "sigma'(0) = 1"),
        (torch.tanh, "sigma'(0) = 1"),
        (nn.Identity(), "sigma'(0) = 1"),
        (nn.Sigmoid(), "sigma(0) = 0.5"),
        ("relu", "unknown activation"),
    ],
    ids=["ReLU", "GELU", "Tanh", "torch.tanh", "identity", "sigmoid", "name"],
)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_inadmissible_activation(entry, activation, condition):
    model, batches, loss_fn = mlp()
    config = ScoringConfig(activation=activation)
    message = raises(entry, model, batches, InadmissibleActivationError, re.escape(condition), config, loss_fn)
    assert "silu_tanh" in message


# --- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"solver": "dense"}, "solver"),
        ({"directions": "random"}, "directions"),
        ({"eps_s": 1.0}, "eps_s"),
        ({"eps_s": -0.1}, "eps_s"),
        ({"max_neurons": 0}, "max_neurons"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"line_search_growth": 1.0}, "line_search_growth"),
        ({"line_search_steps": 0}, "line_search_steps"),
        ({"line_search_start": 0.0}, "line_search_start"),
        ({"compute_dtype": "float_64"}, "compute_dtype"),
        ({"compute_dtype": "bfloat16"}, "compute_dtype 'bfloat16' is not supported: use 'float32', 'float64'"),
        ({"compute_dtype": torch.float16}, "compute_dtype torch.float16 is not supported"),
        ({"exact_max_features": -1}, "exact_max_features must be >= 0"),
        ({"lanczos_screen_iterations": 0}, "lanczos_screen_iterations must be >= 1"),
        ({"lanczos_refine_iterations": -3}, "lanczos_refine_iterations must be >= 1"),
        ({"lanczos_refine_iterations": 0, "lanczos_refine_rows": 0}, "lanczos_refine_iterations must be >= 1"),
        ({"lanczos_refine_rows": 0}, "lanczos_refine_rows must be >= 1"),
        ({"optimize_iterations": -1}, "optimize_iterations must be >= 0"),
        ({"threshold": -1.0}, "threshold must be >= 0.0"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"eps_s": float("nan")}, "eps_s must be a finite number"),
        ({"line_search_start": float("inf")}, "line_search_start must be a finite number"),
        ({"neurons": 0}, r"neurons must be >= 1 or None \(None: the eps_s rule\)"),
        ({"max_tokens": 2.5}, r"max_tokens must be a whole number >= 1.*got 2\.5"),
        ({"seed": "0"}, "seed must be a whole number"),
    ],
    ids=lambda v: str(v),
)
def test_invalid_scoring_config(settings, match):
    with pytest.raises(ValueError, match=match):
        ScoringConfig(**settings)


def test_unknown_setting_in_a_dict_config():
    model, batches, loss_fn = mlp()
    with unchanged(model), pytest.raises(ValueError, match="unknown scoring settings") as info:
        insert_layer(model, batches, {"eps_s": 0.5, "epss": 0.3}, loss_fn)
    assert "epss" in str(info.value)


def test_valid_dict_config_is_used():
    model, batches, loss_fn = mlp()
    record = insert_layer(model, batches, {"threshold": 1e9}, loss_fn)
    assert not record.accepted and "threshold" in record.reason
