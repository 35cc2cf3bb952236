"""The inserted layer and how it is attached to a model.

`TopoAdapter` is the rank-m residual layer of METHOD.md section 4:

    T(h) = h + U sigma(D h + b)

acting on every token (a Linear) or every pixel (a "same" conv). With U's columns on coordinate axes
and frozen it is exactly the paper's square layer with its m live rows; letting U train is a superset.

The layer is attached by a hook on the block it follows and registered as a child of that block, so
the block keeps its module path and every existing checkpoint key stays the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .activations import resolve_activation
from .sensitivity.capture import Tap, first_tensor, input_state, replace_first_tensor, transform_stream
from .sensitivity.directions import Directions

ADAPTER_ATTRIBUTE = {"output": "topo_adapter", "input": "topo_adapter_input"}


def factory_kwargs(model: nn.Module) -> dict:
    """dtype and device of the model's parameters, for building a layer that fits it."""
    for parameter in model.parameters():
        return {"dtype": parameter.dtype, "device": parameter.device}
    return {}


class TopoAdapter(nn.Module):
    def __init__(
        self,
        width: int,
        num_neurons: int,
        layout: str = "tokens",
        kernel_size: int = 3,
        activation="silu_tanh",
        train_up: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if layout not in ("vector", "tokens", "channels"):
            raise ValueError(f"layout must be 'vector', 'tokens' or 'channels', got {layout!r}")
        self.layout, self.width, self.kernel_size = layout, width, kernel_size
        self.activation, _ = resolve_activation(activation)
        # on D's input only (peft's lora_dropout): the stream h itself always passes through. A probability, not an
        # nn.Dropout child, so no module name of ours can match a user's modules_to_save by suffix.
        self.dropout_p = float(dropout)
        factory = {"dtype": dtype, "device": device}
        if layout == "channels":
            self.down = nn.Conv2d(width, num_neurons, kernel_size, padding=kernel_size // 2, **factory)
        else:
            self.down = nn.Linear(width, num_neurons, **factory)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up = nn.Parameter(torch.zeros(width, num_neurons, **factory), requires_grad=train_up)

    @property
    def num_neurons(self) -> int:
        return self.up.shape[1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Computes in the layer's dtype and returns the stream's (a float32 layer baked into a bf16 model)."""
        x = h.to(self.down.weight.dtype)
        hidden = self.activation(self.down(F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x))
        up = self.up.to(hidden.dtype)
        delta = F.conv2d(hidden, up[:, :, None, None]) if self.layout == "channels" else F.linear(hidden, up)
        return (h + delta).to(h.dtype)

    @torch.no_grad()
    def set_directions(self, directions: Directions, eps: float = 1.0) -> TopoAdapter:
        """Loads [D | b] = eps * directions.down and U = directions.up."""
        rows = directions.down.to(self.down.weight.dtype)
        if rows.shape != (self.num_neurons, self.down.weight[0].numel() + 1):
            raise ValueError(
                f"directions of shape {tuple(rows.shape)} do not fit an adapter with {self.num_neurons} neurons "
                f"and {self.down.weight[0].numel() + 1} input features"
            )
        self.down.weight.copy_((eps * rows[:, :-1]).reshape(self.down.weight.shape))
        self.down.bias.copy_(eps * rows[:, -1])
        self.up.copy_(directions.up.to(self.up.dtype))
        return self

    @classmethod
    def from_directions(
        cls,
        directions: Directions,
        layout: str,
        eps: float = 1.0,
        kernel_size: int = 3,
        activation="silu_tanh",
        train_up: bool = False,
        dtype=None,
        device=None,
    ) -> TopoAdapter:
        adapter = cls(
            directions.up.shape[0], directions.num_neurons, layout, kernel_size, activation, train_up, dtype, device
        )
        return adapter.set_directions(directions, eps)


class AdapterHook:
    """Applies the child adapter `attribute` of the hooked module to its output (or first input).

    A plain object rather than a closure, so a model with attached adapters still pickles and
    deep-copies; it looks the adapter up at call time, so replacing the child needs no new hook.
    """

    def __init__(self, attribute: str, where: str):
        self.attribute, self.where = attribute, where

    def __call__(self, module: nn.Module, args, *rest):
        adapter = getattr(module, self.attribute)
        if self.where == "output":
            (output,) = rest
            return replace_first_tensor(output, adapter(first_tensor(output)))
        (kwargs,) = rest
        state, slot = input_state(args, kwargs)
        if isinstance(slot, int):
            return (adapter(state), *args[1:]), kwargs
        return args, {**kwargs, slot: adapter(state)}


def register_adapter_hook(module: nn.Module, attribute: str, where: str) -> RemovableHandle:
    hook = AdapterHook(attribute, where)
    if where == "output":
        return module.register_forward_hook(hook, prepend=True)
    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def find_adapter_hooks(module: nn.Module, attribute: str) -> list[int]:
    """Ids of the module's hooks that apply its child `attribute`."""
    hooks = {**module._forward_hooks, **module._forward_pre_hooks}
    return [key for key, hook in hooks.items() if isinstance(hook, AdapterHook) and hook.attribute == attribute]


def attached_names(tap: Tap) -> list[str]:
    """Child names of the adapters attached at the tap, oldest first: topo_adapter, topo_adapter_1, ..."""
    base = ADAPTER_ATTRIBUTE[tap.where]
    names = []
    while hasattr(tap.module, base if not names else f"{base}_{len(names)}"):
        names.append(base if not names else f"{base}_{len(names)}")
    return names


def attach(tap: Tap, adapter: nn.Module) -> str:
    """Inserts the adapter at the tap for good (a child of the tapped module plus a hook) and returns its child name.

    A tap that already carries adapters gets another one right at the tap, before the earlier ones, which is
    where scoring and the line search (whose hooks also run first) evaluated it.
    """
    names = attached_names(tap)
    attribute = ADAPTER_ATTRIBUTE[tap.where] + (f"_{len(names)}" if names else "")
    adapter.train(tap.module.training)
    tap.module.add_module(attribute, adapter)
    register_adapter_hook(tap.module, attribute, tap.where)
    return attribute


def detach(tap: Tap, attribute: str | None = None) -> nn.Module:
    """Removes an adapter inserted at the tap (the most recent one by default) and returns it."""
    names = attached_names(tap)
    attribute = attribute or (names[-1] if names else ADAPTER_ATTRIBUTE[tap.where])
    adapter = getattr(tap.module, attribute, None)
    if adapter is None:
        raise ValueError(f"{tap.name} carries no {attribute}")
    for key in find_adapter_hooks(tap.module, attribute):
        tap.module._forward_hooks.pop(key, None)
        tap.module._forward_pre_hooks.pop(key, None)
        tap.module._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(tap.module, attribute)
    return adapter


@contextlib.contextmanager
def attached(tap: Tap, adapter: nn.Module) -> Iterator[nn.Module]:
    """The adapter inserted at the tap for the duration of the context only."""
    with transform_stream(tap, adapter):
        yield adapter
