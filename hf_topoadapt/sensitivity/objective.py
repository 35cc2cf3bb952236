"""The shape functional J: the mean of the calibration batch losses (DESIGN.md's batch convention).

A dict batch is called as model(**batch) and its loss is outputs.loss (or loss_fn(outputs, batch));
a tuple batch (inputs, targets) is called as model(inputs) and its loss is loss_fn(outputs, targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import fail_together, sum_across

LossFn = Callable[[Any, Any], torch.Tensor]


class CalibrationDataError(ValueError):
    """The calibration data or the loss it gives is unusable."""


class NonFiniteLossError(CalibrationDataError):
    """A batch loss is NaN or infinite."""


def materialize(data: Iterable) -> list:
    """Calibration data is read several times (scoring, then the line search), so a one-shot
    iterator is turned into a list; a list, dataset or DataLoader is left as it is."""
    if data is None:
        raise CalibrationDataError("calibration data is None: pass an iterable of batches (a list or a DataLoader)")
    if isinstance(data, (torch.Tensor, Mapping)):
        raise CalibrationDataError(
            "calibration data must be an iterable of batches, not a single batch: wrap it as [batch]"
        )
    batches = list(data) if iter(data) is data else data
    try:
        empty = len(batches) == 0
    except TypeError:
        batches = list(batches)
        empty = len(batches) == 0
    if empty:
        raise CalibrationDataError("calibration data is empty: pass at least one batch")
    return batches


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return (
            type(value)({k: _to_device(v, device) for k, v in value.items()})
            if isinstance(value, dict)
            else {k: _to_device(v, device) for k, v in value.items()}
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def batch_loss(model: nn.Module, batch, loss_fn: LossFn | None, index: int = 0) -> torch.Tensor:
    """The scalar loss of one batch, checked to be finite."""
    batch = _to_device(batch, model_device(model))
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise CalibrationDataError(
                "the model returned no loss for a dict batch: include the labels in the batch "
                "(e.g. batch['labels']) or pass loss_fn(outputs, batch)"
            )
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        outputs = model(inputs)
        if loss_fn is None:
            loss = getattr(outputs, "loss", None)
            if loss is None:
                raise CalibrationDataError(
                    "a tuple batch (inputs, targets) needs loss_fn(outputs, targets): none was given and "
                    "the model output has no .loss"
                )
        else:
            loss = loss_fn(outputs, targets)
    else:
        raise CalibrationDataError(
            f"unsupported batch of type {type(batch).__name__}: use a dict of model inputs (labels included) "
            "or a tuple (inputs, targets) with loss_fn"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CalibrationDataError(
            f"the loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}"
        )
    loss = loss.reshape(())
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss of calibration batch {index} is {float(loss.detach())}: check the inputs and labels of that "
            "batch (NaN or infinite values, labels out of range) and the model's dtype"
        )
    return loss


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: list,
    loss_fn: LossFn | None,
    nonfinite_ok: bool = False,
    before_batch: Callable[[int], None] | None = None,
) -> float:
    """J: the average of the batch losses, every batch with equal weight.

    With nonfinite_ok, a NaN or infinite batch loss gives J = inf instead of an error (a trial step of a line
    search that overflowed is a bad step, not bad data). `before_batch(i)` is called before batch i runs.
    """
    total = 0.0
    with fail_together():
        for i, batch in enumerate(batches):
            if before_batch is not None:
                before_batch(i)
            try:
                total += float(batch_loss(model, batch, loss_fn, i))
            except NonFiniteLossError:
                if not nonfinite_ok:
                    raise
                total = math.inf
                break
    # Over several processes J is the mean over every process's batches, the same number on every rank.
    return sum_across(total) / sum_across(len(batches))
