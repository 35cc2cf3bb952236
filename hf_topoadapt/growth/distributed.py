"""Growth under DistributedDataParallel (Accelerate, torchrun).

A DDP wrapper's reducer knows only the parameters that existed when it was built, so the gradients of a
layer inserted later would stay local and the ranks would drift apart. Rather than rebuilding the wrapper
(the Trainer keeps its own reference to it), each new parameter gets a hook that averages its gradient
across ranks as soon as it is accumulated. Every rank inserts the same layer (the scoring sums its
operators across ranks), so the hooks fire in the same order everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..sensitivity.distributed import world_size

_HOOKED = "_topo_grad_averaged"


def _average_gradient(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
    parameter.grad.div_(world_size())


def average_gradients_across_ranks(parameters: Iterable[nn.Parameter]) -> int:
    """Registers the averaging hook on each trainable parameter (once); returns how many got one. A no-op
    without an initialised process group of more than one rank."""
    if world_size() == 1:
        return 0
    count = 0
    for parameter in parameters:
        if parameter.requires_grad and not getattr(parameter, _HOOKED, False):
            parameter.register_post_accumulate_grad_hook(_average_gradient)
            setattr(parameter, _HOOKED, True)
            count += 1
    return count


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; growth edits that one."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
