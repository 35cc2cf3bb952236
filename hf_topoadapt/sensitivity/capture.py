"""One forward and one backward pass per batch capture the state h_l and the adjoint p_l = -dJ/dh_l of
every tap at once: forward hooks record the tensors that flow on, and `torch.autograd.grad` of the
batch loss with respect to all of them gives every adjoint (including attention mixing downstream).

This module knows modules and hooks but no model family: a tap is just (module, input or output).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .distributed import gather_rows, sum_across, world_size
from .features import effective_kernel, layout_of, token_pairs
from .objective import LossFn, batch_loss
from .operators import BlockOperator, DenseBlocks, TokenPairs, accumulate_blocks
from .precision import autocast_off


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
    mode "pairs" keeps every token while they fit `max_bytes` (and `max_tokens`, when given), beyond that a
    uniform random subsample (reservoir by random keys), reweighted by (tokens with a non-zero adjoint) /
    (tokens kept) so the sum stays unbiased; mode "auto" picks "blocks" when q <= exact_max_features or the
    blocks hold at most exact_max_entries numbers, once the first state shows q and d_out.

    Nothing here waits for the device: tokens whose adjoint is zero (nothing downstream reads them) are
    counted and dropped once, in `operator`, and until then carry a key that loses every reservoir draw.
    """

    def __init__(
        self,
        mode: str,
        curvature: float,
        max_tokens: int | None,
        kernel_size: int,
        dtype,
        generator: torch.Generator | None,
        exact_max_features: int = 128,
        exact_max_entries: int = 0,
        max_bytes: int | None = None,
        shrink_kernel: bool = True,
    ):
        if mode not in ("auto", "blocks", "pairs"):
            raise ValueError(f"mode must be 'auto', 'blocks' or 'pairs', got {mode!r}")
        self.mode, self.curvature, self.max_tokens, self.max_bytes = mode, curvature, max_tokens, max_bytes
        self.exact_max_features, self.exact_max_entries = exact_max_features, exact_max_entries
        self.kernel_size, self.dtype, self.generator = kernel_size, dtype, generator
        self.shrink_kernel = shrink_kernel
        self.blocks: torch.Tensor | None = None
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (z, p, keys) per batch
        self.held = 0  # rows in chunks, zero-adjoint tokens included
        self.cap: int | None = None  # tokens a "pairs" position may hold: max_tokens and max_bytes together
        self.nonzero_count: torch.Tensor | None = None  # on the device: read once, in `operator`
        self.tokens_seen = 0
        self.layout: str | None = None
        self.width: int | None = None
        self.kernel: int | None = None  # the conv kernel of an image stream (effective_kernel), from its first state
        self._result: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (z, p, candidates) once compacted
        self._scaled_by = 1  # the compacted p is divided by the number of batches once `operator` is called

    def add(self, state: torch.Tensor, adjoint: torch.Tensor) -> None:
        with autocast_off():
            self._add(state, adjoint)

    def _add(self, state: torch.Tensor, adjoint: torch.Tensor) -> None:
        self.layout = layout_of(state)
        self.width = state.shape[1] if self.layout == "channels" else state.shape[-1]
        kernel = self.kernel_size
        if self.layout == "channels" and self.shrink_kernel:
            kernel = effective_kernel(self.kernel_size, *state.shape[-2:])
            if self.kernel is not None and kernel != self.kernel:
                raise ValueError(
                    f"the calibration batches reach this position with feature maps of different sizes "
                    f"({tuple(state.shape[-2:])} now), which would need a {kernel} x {kernel} conv where earlier "
                    f"batches needed {self.kernel} x {self.kernel}: calibrate on images of one size"
                )
        self.kernel = kernel
        z, p = token_pairs(state, adjoint, kernel, self.dtype)
        if self.mode == "auto":
            q, d_out = z.shape[1], p.shape[1]
            small = q <= self.exact_max_features or d_out * q * q <= self.exact_max_entries
            self.mode = "blocks" if small else "pairs"
        self.tokens_seen += z.shape[0]
        self._result, self._scaled_by = None, 1
        nonzero = p.abs().amax(dim=1) > 0  # tokens the loss does not depend on add nothing to Q
        count = nonzero.sum()
        self.nonzero_count = count if self.nonzero_count is None else self.nonzero_count + count
        if self.mode == "blocks":  # zero-adjoint tokens add exact zeros to the sums
            update = accumulate_blocks(z, p, self.curvature)
            self.blocks = update if self.blocks is None else self.blocks.add_(update)
            return
        if self.cap is None:
            self.cap = token_cap(self.max_tokens, self.max_bytes, z.shape[1] + p.shape[1], z.element_size())
        keys = torch.rand(z.shape[0], generator=self._generator(z.device), device=z.device, dtype=torch.float64)
        keys = torch.where(nonzero, keys, ZERO_ADJOINT_KEY)
        self.chunks.append((z, p, keys))
        self.held += z.shape[0]
        if self.held > self.cap:
            self._keep_smallest_keys()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The accumulator's generator, moved once to the device of the states (draws stay on the device)."""
        if self.generator is not None and self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.generator.initial_seed())
        return self.generator

    def _keep_smallest_keys(self) -> None:
        """The reservoir: the `cap` tokens with the smallest random keys, a uniform sample of those with a non-zero
        adjoint (the zero-adjoint ones have the largest key)."""
        z, p, keys = (torch.cat(parts) for parts in zip(*self.chunks, strict=True))
        if z.shape[0] > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices
            z, p, keys = z[keep], p[keep], keys[keep]
        self.chunks, self.held = [(z, p, keys)], z.shape[0]

    def _compacted(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Kept pairs without the zero-adjoint tokens, and the number of tokens with a non-zero adjoint seen."""
        if self._result is None:
            if self.mode == "blocks" or not self.chunks:
                candidates = 0 if self.nonzero_count is None else int(self.nonzero_count)
                self._result = (None, None, candidates)
            else:
                self._keep_smallest_keys()
                z, p, keys = self.chunks[0]
                keep = keys < ZERO_ADJOINT_KEY
                candidates = int(self.nonzero_count)
                self._result = (z[keep], p[keep], candidates)  # one device round trip for both
        return self._result

    @property
    def z(self) -> torch.Tensor | None:
        return self._compacted()[0]

    @property
    def p(self) -> torch.Tensor | None:
        """The kept adjoints (divided by the number of batches once `operator` was called)."""
        return self._compacted()[1]

    @property
    def candidates(self) -> int:
        """Tokens with a non-zero adjoint, the population the reservoir samples."""
        return self._compacted()[2]

    @property
    def tokens_used(self) -> int:
        z, _, candidates = self._compacted()
        return candidates if self.mode == "blocks" else (0 if z is None else z.shape[0])

    def combine_across_processes(self) -> None:
        """Makes every rank hold the sums (or the token subsample) of all ranks' batches."""
        if world_size() == 1:
            return
        self.tokens_seen = sum_across(self.tokens_seen)
        self.nonzero_count = sum_across(self.nonzero_count)
        self._result, self._scaled_by = None, 1
        if self.mode == "blocks":
            self.blocks = sum_across(self.blocks)
            return
        self._keep_smallest_keys()
        self.chunks = [gather_rows(*self.chunks[0])]
        self._keep_smallest_keys()

    def operator(self, num_batches: int) -> BlockOperator:
        """Q for J = mean over batches: the per-batch adjoints are divided by the number of batches."""
        if self.mode == "blocks":
            if self.blocks is None:
                raise RuntimeError("no tokens were captured at this position")
            return DenseBlocks(self.blocks / num_batches)
        z, p, candidates = self._compacted()
        if z is None or z.shape[0] == 0:
            raise RuntimeError("no tokens with a non-zero adjoint were captured at this position")
        if self._scaled_by != num_batches:  # in place: a second copy of every adjoint would double the memory
            p.mul_(self._scaled_by / num_batches)
            self._scaled_by = num_batches
        return TokenPairs(z, p, self.curvature, candidates / z.shape[0])


ZERO_ADJOINT_KEY = 2.0  # above every uniform key in [0, 1): a zero-adjoint token is the first to leave the reservoir


def token_cap(max_tokens: int | None, max_bytes: int | None, features: int, itemsize: int) -> int:
    """Tokens a position may hold: the explicit cap, and what fits `max_bytes` at (q + d_out) numbers plus a
    float64 key per token; every token when neither is set."""
    caps = [max_tokens] if max_tokens is not None else []
    if max_bytes is not None:
        caps.append(max(1, max_bytes // (features * itemsize + 8)))
    return min(caps) if caps else sys.maxsize


def capture(
    model: nn.Module,
    batches: list,
    taps: list[Tap],
    loss_fn: LossFn | None,
    accumulators: list[PairAccumulator],
    progress: bool = False,
) -> torch.Tensor:
    """Runs every batch once forward and once backward and feeds each tap's (h, p) to its accumulator.

    Returns the sum of the batch losses (float64, on the model's device): J at no extra cost, for the line
    search that follows an insertion.
    """
    states: list[list[torch.Tensor]] = [[] for _ in taps]
    total = torch.zeros((), dtype=torch.float64)

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
            total = total.to(loss.device) + loss.detach().double()
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
    return total
