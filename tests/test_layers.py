"""The inserted layer T(h) = h + U sigma(D h + b) and how it is attached (METHOD.md sections 2 and 4)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_topoadapt import insert_layer
from hf_topoadapt.activations import SiLUTanh
from hf_topoadapt.layers import TopoAdapter, attach, attached, detach
from hf_topoadapt.locate import find_positions
from hf_topoadapt.sensitivity.directions import Directions

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models

DOUBLE = torch.float64
SIGMA = SiLUTanh()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hook_keys(model: nn.Module) -> dict:
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return {name: tuple(tuple(getattr(m, attr, {})) for attr in names) for name, m in model.named_modules()}


def tap_named(model: nn.Module, name: str):
    return next(p for p in find_positions(model) if p.name == name)


def random_directions(width: int, q: int, m: int, seed: int = 0, up: torch.Tensor | None = None) -> Directions:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(m, q, generator=g, dtype=DOUBLE)
    if up is None:
        up = torch.linalg.qr(torch.randn(width, m, generator=g, dtype=DOUBLE)).Q
    return Directions(down, up, torch.ones(m, dtype=DOUBLE), "optimized")


STATES = {
    "vector": (5, 6),
    "tokens": (2, 4, 6),
    "channels": (2, 6, 5, 4),
}


# --- the layer itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("train_up", [False, True])
@pytest.mark.parametrize("layout", list(STATES))
def test_zero_initialised_adapter_is_exactly_the_identity(layout, train_up):
    h = torch.randn(*STATES[layout], dtype=DOUBLE, requires_grad=True)
    adapter = TopoAdapter(6, 3, layout, kernel_size=3, train_up=train_up, dtype=DOUBLE)
    out = adapter(h)
    assert torch.equal(out, h)
    # sigma'(0) = 0 and sigma(0) = 0: every parameter gradient is exactly zero at theta = 0
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(adapter.down.weight.grad, torch.zeros_like(adapter.down.weight))
    assert torch.equal(adapter.down.bias.grad, torch.zeros_like(adapter.down.bias))
    assert torch.equal(h.grad, weights)
    if train_up:
        assert torch.equal(adapter.up.grad, torch.zeros_like(adapter.up))
    else:
        assert not adapter.up.requires_grad


def test_tokens_adapter_matches_a_per_token_computation():
    directions = random_directions(6, 7, 3, seed=1)
    adapter = TopoAdapter.from_directions(directions, "tokens", eps=0.3, dtype=DOUBLE)
    h = torch.randn(2, 4, 6, dtype=DOUBLE)
    D, b, U = 0.3 * directions.down[:, :-1], 0.3 * directions.down[:, -1], directions.up
    expected = torch.empty_like(h)
    for s in range(2):
        for t in range(4):
            expected[s, t] = h[s, t] + U @ SIGMA(D @ h[s, t] + b)
    assert torch.allclose(adapter(h), expected, rtol=0, atol=1e-14)
    # the same weights act on a (batch, d) state
    assert torch.allclose(
        TopoAdapter.from_directions(directions, "vector", eps=0.3, dtype=DOUBLE)(h[0]), expected[0], atol=1e-14
    )


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_conv_adapter_matches_a_manual_same_padded_convolution(kernel_size):
    channels, m, k = 3, 2, kernel_size
    directions = random_directions(channels, channels * k * k + 1, m, seed=2)
    adapter = TopoAdapter.from_directions(directions, "channels", eps=0.2, kernel_size=k, dtype=DOUBLE)
    h = torch.randn(2, channels, 5, 4, dtype=DOUBLE)
    # rows of [D | b] are (channel, dy, dx)-ordered patches plus a bias, like F.unfold
    D = 0.2 * directions.down[:, :-1].reshape(m, channels, k, k)
    b = 0.2 * directions.down[:, -1]
    U = directions.up
    r = k // 2
    padded = F.pad(h, (r, r, r, r))  # zero "same" padding
    expected = h.clone()
    for s in range(2):
        for y in range(5):
            for x in range(4):
                patch = padded[s, :, y : y + k, x : x + k]  # centred on (y, x)
                pre = (D * patch).sum(dim=(1, 2, 3)) + b
                expected[s, :, y, x] += U @ SIGMA(pre)
    out = adapter(h)
    assert out.shape == h.shape
    assert torch.allclose(out, expected, rtol=0, atol=1e-13)


def test_set_directions_rejects_a_wrong_shape():
    adapter = TopoAdapter(6, 2, "vector", dtype=DOUBLE)
    with pytest.raises(ValueError, match="do not fit"):
        adapter.set_directions(random_directions(6, 6, 2))  # q must be d + 1 = 7
    with pytest.raises(ValueError, match="do not fit"):
        adapter.set_directions(random_directions(6, 7, 3))
    with pytest.raises(ValueError, match="layout"):
        TopoAdapter(6, 2, "matrix")


# --- dead rows of the paper's square layer -------------------------------------------------------------

WIDTH, LIVE = 6, [1, 4]


def square_and_rank_m(seed: int = 3):
    """The paper's d x d layer with only rows LIVE non-zero, and the equivalent rank-m adapter."""
    g = torch.Generator().manual_seed(seed)
    live_rows = 0.4 * torch.randn(len(LIVE), WIDTH + 1, generator=g, dtype=DOUBLE)
    square_rows = torch.zeros(WIDTH, WIDTH + 1, dtype=DOUBLE)
    square_rows[LIVE] = live_rows
    eye = torch.eye(WIDTH, dtype=DOUBLE)
    square = TopoAdapter.from_directions(
        Directions(square_rows, eye, torch.ones(WIDTH, dtype=DOUBLE), "coordinate"), "vector", dtype=DOUBLE
    )
    rank_m = TopoAdapter.from_directions(
        Directions(live_rows, eye[:, LIVE], torch.ones(len(LIVE), dtype=DOUBLE), "coordinate"), "vector", dtype=DOUBLE
    )
    return square, rank_m


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.02),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.02, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "sgd_nesterov_decay": lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
}


def train(model, batches, loss_fn, optimizer, steps: int, every_step=None):
    for step in range(steps):
        inputs, targets = batches[step % len(batches)]
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
        if every_step is not None:
            every_step()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_rows_that_start_at_zero_stay_exactly_zero(optimizer):
    model, batches, loss_fn, _, _ = models.residual_mlp()
    square, _ = square_and_rank_m()
    attach(tap_named(model, "blocks.1"), square)
    dead = [r for r in range(WIDTH) if r not in LIVE]
    live_start = square.down.weight[LIVE].detach().clone()
    model_start = model.blocks[0].fc.weight.detach().clone()
    opt = OPTIMIZERS[optimizer](list(model.parameters()))

    def check():
        assert (square.down.weight[dead] == 0.0).all()
        assert (square.down.bias[dead] == 0.0).all()

    train(model, batches, loss_fn, opt, steps=8, every_step=check)
    assert (square.down.weight[LIVE] - live_start).abs().min() > 0  # every live entry moved
    assert not torch.equal(model.blocks[0].fc.weight, model_start)  # the rest of the model trained too
    # the dead rows still get an exactly zero gradient at the trained point
    opt.zero_grad()
    inputs, targets = batches[0]
    loss_fn(model(inputs), targets).backward()
    assert (square.down.weight.grad[dead] == 0.0).all() and (square.down.bias.grad[dead] == 0.0).all()
    assert square.down.weight.grad[LIVE].abs().max() > 0


def test_rank_m_adapter_and_square_layer_train_identically():
    model, batches, loss_fn, _, _ = models.residual_mlp()
    square_model, rank_model = copy.deepcopy(model), copy.deepcopy(model)
    square, rank_m = square_and_rank_m()
    attach(tap_named(square_model, "blocks.1"), square)
    attach(tap_named(rank_model, "blocks.1"), rank_m)
    square_opt = torch.optim.SGD(square_model.parameters(), lr=0.05, momentum=0.9)
    rank_opt = torch.optim.SGD(rank_model.parameters(), lr=0.05, momentum=0.9)
    probe = torch.randn(9, 3, dtype=DOUBLE)

    def compare():
        with torch.no_grad():
            assert torch.allclose(square_model(probe), rank_model(probe), rtol=0, atol=1e-12)
        assert torch.allclose(square.down.weight[LIVE], rank_m.down.weight, rtol=0, atol=1e-12)
        assert torch.allclose(square.down.bias[LIVE], rank_m.down.bias, rtol=0, atol=1e-12)
        rank_params = dict(rank_model.named_parameters())
        for name, a in square_model.named_parameters():
            if "topo_adapter" not in name:
                assert torch.allclose(a, rank_params[name], rtol=0, atol=1e-12), name

    compare()
    start = rank_m.down.weight.detach().clone()
    for step in range(10):
        inputs, targets = batches[step % len(batches)]
        for m, opt in ((square_model, square_opt), (rank_model, rank_opt)):
            opt.zero_grad()
            loss_fn(m(inputs), targets).backward()
            opt.step()
        compare()
    assert (rank_m.down.weight - start).abs().max() > 1e-3  # the trajectories did go somewhere


# --- attach, detach, attached ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position, owner, attribute",
    [("blocks.1", "blocks.1", "topo_adapter"), ("embeddings", "blocks.0", "topo_adapter_input")],
)
def test_attach_adds_only_adapter_keys_and_detach_restores_the_model(position, owner, attribute):
    model, batches, _, _, _ = models.residual_mlp()
    tap = tap_named(model, position)
    inputs = batches[0][0]
    with torch.no_grad():
        original = model(inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    block_keys = list(model.get_submodule(owner).state_dict())
    hooks = hook_keys(model)

    adapter = TopoAdapter.from_directions(random_directions(6, 7, 2), "vector", eps=0.5, dtype=DOUBLE)
    attach(tap, adapter)
    after = model.state_dict()
    prefix = f"{owner}.{attribute}."
    assert [k for k in after if not k.startswith(prefix)] == list(state)
    assert sorted(k for k in after if k.startswith(prefix)) == sorted(
        prefix + k for k in ("down.weight", "down.bias", "up")
    )
    for key, value in state.items():
        assert torch.equal(after[key], value)
    assert list(model.get_submodule(owner).state_dict())[: len(block_keys)] == block_keys
    with torch.no_grad():
        changed = model(inputs)
    assert not torch.allclose(changed, original)
    # A second adapter at the same tap stacks under the next child name and comes off first.
    second = TopoAdapter(6, 1, "vector", dtype=DOUBLE)
    assert attach(tap, second) == f"{attribute}_1"
    assert detach(tap) is second
    with torch.no_grad():
        assert torch.equal(model(inputs), changed)

    assert detach(tap) is adapter
    assert list(model.state_dict()) == list(state)
    assert hook_keys(model) == hooks
    assert not hasattr(model.get_submodule(owner), attribute)
    with torch.no_grad():
        assert torch.equal(model(inputs), original)
    with pytest.raises(ValueError, match="carries no"):
        detach(tap)


def test_attached_context_changes_outputs_only_inside():
    model, batches, _, _, _ = models.residual_mlp()
    tap = tap_named(model, "blocks.0")
    inputs = batches[0][0]
    keys, hooks = list(model.state_dict()), hook_keys(model)
    adapter = TopoAdapter.from_directions(random_directions(6, 7, 2), "vector", eps=0.5, dtype=DOUBLE)
    with torch.no_grad():
        original = model(inputs)
        with attached(tap, adapter):
            inside = model(inputs)
            assert list(model.state_dict()) == keys  # nothing registered, only a transient hook
        after = model(inputs)
    assert not torch.allclose(inside, original)
    assert torch.equal(after, original)
    assert hook_keys(model) == hooks
    # the same as the adapter attached for good
    attach(tap, adapter)
    with torch.no_grad():
        assert torch.equal(model(inputs), inside)


def test_attached_adapter_survives_deepcopy_and_pickle():
    model, batches, _, _, _ = models.residual_mlp()
    attach(
        tap_named(model, "blocks.2"),
        TopoAdapter.from_directions(random_directions(6, 7, 2), "vector", eps=0.5, dtype=DOUBLE),
    )
    inputs = batches[0][0]
    with torch.no_grad():
        expected = model(inputs)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(twin(inputs), expected)
            twin.blocks[2].topo_adapter.down.bias.add_(1.0)  # the copy's hook uses the copy's adapter
            assert torch.equal(model(inputs), expected)
            assert not torch.equal(twin(inputs), expected)


# --- blocks that return tuples or take keyword arguments --------------------------------------------------


class TupleBlock(nn.Module):
    """A block that takes hidden_states= and returns (hidden_states, attention) like older HF layers."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.score = nn.Linear(width, 1)

    def forward(self, hidden_states, scale: float = 1.0):
        attention = torch.softmax(self.score(hidden_states).squeeze(-1), dim=-1)
        mixed = attention[..., None] * hidden_states.sum(dim=1, keepdim=True)
        return hidden_states + scale * torch.tanh(self.fc(hidden_states + mixed)), attention


class TupleNet(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(TupleBlock(width) for _ in range(2))
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        h, attentions = self.embed(x), []
        for block in self.blocks:
            h, attention = block(hidden_states=h, scale=0.5)
            attentions.append(attention)
        return self.out(h.mean(dim=1)), attentions


def tuple_net():
    torch.manual_seed(0)
    model = TupleNet().double().eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 5, 3, generator=g, dtype=DOUBLE), torch.randn(4, 2, generator=g, dtype=DOUBLE))
        for _ in range(2)
    ]
    return model, batches, lambda outputs, targets: F.mse_loss(outputs[0], targets)


def test_tuple_returning_block_gets_its_hidden_state_transformed():
    model, batches, _ = tuple_net()
    x = batches[0][0]
    block = model.blocks[0]
    with torch.no_grad():
        h = model.embed(x)
        plain, plain_attention = block(hidden_states=h, scale=0.5)
    adapter = TopoAdapter.from_directions(random_directions(6, 7, 2), "tokens", eps=0.5, dtype=DOUBLE)
    attach(tap_named(model, "blocks.0"), adapter)
    with torch.no_grad():
        out, attention = block(hidden_states=h, scale=0.5)
        assert isinstance(block(hidden_states=h), tuple)
        assert torch.equal(out, adapter(plain))
        assert torch.equal(attention, plain_attention)  # the rest of the tuple passes through untouched


def test_keyword_input_of_a_block_gets_transformed():
    model, batches, _ = tuple_net()
    x = batches[0][0]
    block = model.blocks[0]
    with torch.no_grad():
        h = model.embed(x)
    adapter = TopoAdapter.from_directions(random_directions(6, 7, 2), "tokens", eps=0.5, dtype=DOUBLE)
    attach(tap_named(model, "embeddings"), adapter)  # the first input of blocks.0, passed as hidden_states=
    assert hasattr(block, "topo_adapter_input")
    with torch.no_grad():
        out, attention = block(hidden_states=h, scale=0.5)
        detach(tap_named(model, "embeddings"))
        expected, expected_attention = block(hidden_states=adapter(h), scale=0.5)  # scale= still passed
    assert torch.equal(out, expected) and torch.equal(attention, expected_attention)


def test_insert_layer_on_a_tuple_returning_model():
    model, batches, loss_fn = tuple_net()
    record = insert_layer(model, batches, None, loss_fn)
    assert record.accepted, record.reason
    assert record.position in {"embeddings", "blocks.0", "blocks.1"}
    with torch.no_grad():
        recomputed = sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)
    assert recomputed == pytest.approx(record.loss_after, rel=1e-12)
    assert record.loss_after < record.loss_before


def test_hidden_states_output_sees_the_adapter():
    """transformers 5 records hidden states with hooks; the adapter must be inside what they record."""
    model, batches, _, _, _ = models.hf_vit()
    pixels = batches[0]["pixel_values"]
    with torch.no_grad():
        before = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    adapter = TopoAdapter.from_directions(random_directions(8, 9, 2), "tokens", eps=0.5, dtype=DOUBLE)
    attach(tap_named(model, "vit.layers.0"), adapter)
    with torch.no_grad():
        after = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert torch.equal(after[0], before[0])
    assert torch.allclose(after[1], adapter(before[1]), rtol=0, atol=1e-13)
    assert not torch.allclose(after[2], before[2])
