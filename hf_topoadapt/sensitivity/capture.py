"""One forward and one backward pass per batch capture the state h_l and the adjoint p_l = -dJ/dh_l of
every tap at once: forward hooks record the tensors that flow on, and `torch.autograd.grad` of the
batch loss with respect to all of them gives every adjoint (including attention mixing downstream).

This module knows modules and hooks but no model family: a tap is just (module, input or output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .distributed import gather_rows, sum_across, world_size
from .features import layout_of, token_pairs
from .objective import LossFn, batch_loss
from .operators import BlockOperator, DenseBlocks, TokenPairs, accumulate_blocks


@dataclass(frozen=True)
class Tap:
    """A point on the hidden-state stream: the output of `module`, or its first input."""

    name: str
    module: nn.Module
    where: str = "output"  # "output" | "input"


def first_tensor(value):
    """The hidden state inside a block's output: the tensor itself, or element 0 of a tuple/list/ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):
        items = value.to_tuple()
        if items and isinstance(items[0], torch.Tensor):
            return items[0]
    raise TypeError(f"cannot find a hidden-state tensor in a value of type {type(value).__name__}")


def replace_first_tensor(value, tensor: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    if hasattr(value, "to_tuple"):
        key = next(iter(value.keys()))
        value[key] = tensor
        return value
    raise TypeError(f"cannot replace the hidden state inside a value of type {type(value).__name__}")


def input_state(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    """The hidden state a block receives: its first positional argument or a known keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for key in ("hidden_states", "x", "input", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], key
    raise TypeError("the block received no tensor as its first argument nor as hidden_states=/x=")


def add_stream_hook(tap: Tap, fn) -> RemovableHandle:
    """Makes every forward pass apply fn to the hidden state at the tap, until the handle is removed."""
    if tap.where == "output":

        def hook(module, args, output):
            return replace_first_tensor(output, fn(first_tensor(output)))

        return tap.module.register_forward_hook(hook, prepend=True)
    if tap.where == "input":

        def pre_hook(module, args, kwargs):
            state, slot = input_state(args, kwargs)
            if isinstance(slot, int):
                return (fn(state), *args[1:]), kwargs
            return args, {**kwargs, slot: fn(state)}

        return tap.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    raise ValueError(f"tap.where must be 'output' or 'input', got {tap.where!r}")


@contextlib.contextmanager
def transform_stream(tap: Tap, fn) -> Iterator[None]:
    """Applies fn to the hidden state at the tap during forward passes, within the context only."""
    handle = add_stream_hook(tap, fn)
    try:
        yield
    finally:
        handle.remove()


class PairAccumulator:
    """Collects (z, p) for one tap across batches.

    mode "blocks" sums every Q block as it goes (exact; memory d_out * q^2 whatever the data size);
    mode "pairs" keeps a uniform random subsample of at most `max_tokens` tokens (reservoir by random
    keys), reweighted by (tokens seen) / (tokens kept) so the sum stays unbiased; mode "auto" picks
    "blocks" when q <= exact_max_features or the blocks hold at most exact_max_entries numbers, once the first
    state shows q and d_out.
    """

    def __init__(
        self,
        mode: str,
        curvature: float,
        max_tokens: int,
        kernel_size: int,
        dtype,
        generator,
        exact_max_features: int = 128,
        exact_max_entries: int = 0,
    ):
        if mode not in ("auto", "blocks", "pairs"):
            raise ValueError(f"mode must be 'auto', 'blocks' or 'pairs', got {mode!r}")
        self.mode, self.curvature, self.max_tokens = mode, curvature, max_tokens
        self.exact_max_features, self.exact_max_entries = exact_max_features, exact_max_entries
        self.kernel_size, self.dtype, self.generator = kernel_size, dtype, generator
        self.blocks: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.p: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.tokens_seen = 0
        self.candidates = 0  # tokens with a non-zero adjoint, the population the reservoir samples
        self.layout: str | None = None
        self.width: int | None = None

    def add(self, state: torch.Tensor, adjoint: torch.Tensor) -> None:
        self.layout = layout_of(state)
        self.width = state.shape[1] if self.layout == "channels" else state.shape[-1]
        z, p = token_pairs(state, adjoint, self.kernel_size, self.dtype)
        if self.mode == "auto":
            q, d_out = z.shape[1], p.shape[1]
            small = q <= self.exact_max_features or d_out * q * q <= self.exact_max_entries
            self.mode = "blocks" if small else "pairs"
        self.tokens_seen += z.shape[0]
        nonzero = p.abs().amax(dim=1) > 0  # tokens the loss does not depend on add nothing to Q
        z, p = z[nonzero], p[nonzero]
        self.candidates += z.shape[0]
        if self.mode == "blocks":
            update = accumulate_blocks(z, p, self.curvature)
            self.blocks = update if self.blocks is None else self.blocks.add_(update)
            return
        keys = torch.rand(z.shape[0], generator=self.generator, dtype=torch.float64)
        if self.z is not None:
            z, p, keys = torch.cat([self.z, z]), torch.cat([self.p, p]), torch.cat([self.keys, keys])
        self._keep_smallest_keys(z, p, keys)

    def _keep_smallest_keys(self, z: torch.Tensor, p: torch.Tensor, keys: torch.Tensor) -> None:
        """The reservoir: the max_tokens tokens with the smallest random keys, a uniform sample of all."""
        if z.shape[0] > self.max_tokens:
            keep = torch.topk(keys, self.max_tokens, largest=False).indices
            z, p, keys = z[keep], p[keep], keys[keep]
        self.z, self.p, self.keys = z, p, keys

    @property
    def tokens_used(self) -> int:
        if self.mode == "blocks":
            return self.candidates
        return 0 if self.z is None else self.z.shape[0]

    def combine_across_processes(self) -> None:
        """Makes every rank hold the sums (or the token subsample) of all ranks' batches."""
        if world_size() == 1:
            return
        self.tokens_seen = sum_across(self.tokens_seen)
        self.candidates = sum_across(self.candidates)
        if self.mode == "blocks":
            self.blocks = sum_across(self.blocks)
            return
        self._keep_smallest_keys(*gather_rows(self.z, self.p, self.keys))

    def operator(self, num_batches: int) -> BlockOperator:
        """Q for J = mean over batches: the per-batch adjoints are divided by the number of batches."""
        if self.mode == "blocks":
            if self.blocks is None:
                raise RuntimeError("no tokens were captured at this position")
            return DenseBlocks(self.blocks / num_batches)
        if self.z is None:
            raise RuntimeError("no tokens with a non-zero adjoint were captured at this position")
        weight = self.candidates / max(1, self.z.shape[0])
        return TokenPairs(self.z, self.p / num_batches, self.curvature, weight)


def capture(
    model: nn.Module,
    batches: list,
    taps: list[Tap],
    loss_fn: LossFn | None,
    accumulators: list[PairAccumulator],
    progress: bool = False,
) -> None:
    """Runs every batch once forward and once backward and feeds each tap's (h, p) to its accumulator."""
    states: list[list[torch.Tensor]] = [[] for _ in taps]

    def recorder(i: int):
        def record(state: torch.Tensor) -> torch.Tensor:
            if not state.requires_grad:  # frozen weights upstream: make the state a leaf we can differentiate
                state = state.detach().requires_grad_(True)
            states[i].append(state)
            return state

        return record

    with contextlib.ExitStack() as stack:
        for i, tap in enumerate(taps):
            stack.enter_context(transform_stream(tap, recorder(i)))
        for index, batch in enumerate(tqdm(batches, desc="capturing states and adjoints", disable=not progress)):
            for recorded in states:
                recorded.clear()
            with torch.enable_grad():
                loss = batch_loss(model, batch, loss_fn, index)
                flat = [t for recorded in states for t in recorded]
                if not flat:
                    raise RuntimeError(
                        "no candidate position was reached by the forward pass: the located blocks are not used by "
                        "this model's forward; name the block list explicitly"
                    )
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            k = 0
            for i, recorded in enumerate(states):
                for state in recorded:
                    grad = grads[k]
                    k += 1
                    adjoint = -grad if grad is not None else torch.zeros_like(state)
                    accumulators[i].add(state, adjoint)
            del loss, flat, grads
        for recorded in states:
            recorded.clear()
