"""Scoring over several processes (Accelerate, torchrun): every rank captures its own batches, then the
sums that define Q, the batch counts and the token subsample are combined so every rank solves the same
problem and inserts the same layer. Without an initialised process group every function is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def sum_across(value: torch.Tensor | float | int):
    """The sum over ranks, as the same type it came in."""
    if world_size() == 1:
        return value
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)(tensor.item())


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenates row blocks from every rank in rank order (ranks may hold different numbers of rows)."""
    if world_size() == 1:
        return tensors
    counts = [torch.zeros((), dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(tensors[0].shape[0]))
    longest = int(max(counts))
    out = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(pieces, padded.contiguous())
        out.append(torch.cat([piece[: int(n)] for piece, n in zip(pieces, counts, strict=True)]))
    return tuple(out)


class PeerFailedError(RuntimeError):
    """Another process failed during scoring; its own error is raised there."""


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Every rank leaves the block the same way: if any rank raises inside, all of them raise, so none waits
    forever in a later collective for a peer that has gone."""
    failed = None
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - re-raised below after telling the peers
        failed = error
    if world_size() > 1:
        flag = torch.tensor(1.0 if failed is not None else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if failed is None and flag.item() > 0:
            raise PeerFailedError("another process failed while scoring; see its error")
    if failed is not None:
        raise failed
