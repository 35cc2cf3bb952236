"""Warm-up of a new head before scoring (METHOD.md section 8).

A freshly initialised classifier sends noise back through the adjoints p_l = -dJ/dh_l that every position's
operator is built from, so positions would be ranked by how well a new layer fits that noise. A few optimizer steps
on the head alone (a linear probe: the body is frozen) make the adjoints carry what the best readout cannot explain.

The head's inputs do not change while only the head trains, so they are captured in one pass and the head trains on
them alone, as cheap as a linear probe. That shortcut is used only when it reproduces the model's own loss on the
first batch; otherwise every step runs the whole model (the body without gradients).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .sensitivity.objective import LossFn, _to_device, batch_loss, mean_loss, model_device


@dataclass
class WarmupRecord:
    modules: list[str]
    steps: int
    lr: float
    loss_before: float
    loss_after: float
    cached: bool  # trained on the captured head inputs (True) or through the whole model

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def find_head_modules(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules named in `names` (peft's modules_to_save convention: a module path or its last part)."""
    found = [
        (path, module)
        for path, module in model.named_modules()
        if path and any(path == name or path.endswith("." + name) for name in names)
    ]
    outermost = [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found if q != p)]
    if not outermost:
        raise ValueError(
            f"head warm-up: no module of the model is named {list(names)} (modules_to_save); name the new head, "
            "e.g. modules_to_save=['classifier']"
        )
    return outermost


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config=None) -> torch.Tensor:
    """The loss transformers' classification heads compute from their logits (problem_type of the config)."""
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class _Captured:
    """The inputs the head received and the targets of every batch, for training the head on them alone."""

    def __init__(self):
        self.inputs: list[tuple[tuple, dict]] = []
        self.targets: list = []
        self.outputs: list = []


def _capture(model, head, batches, loss_fn) -> _Captured | None:
    captured = _Captured()

    def keep(module, args, kwargs, output):
        captured.inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        captured.outputs.append(output.detach() if torch.is_tensor(output) else output)

    handle = head.register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                batch_loss(model, batch, loss_fn, index)
                captured.targets.append(_targets(batch, model))
    finally:
        handle.remove()
    if len(captured.inputs) != len(batches):
        return None  # the head runs more than once per batch: no shortcut
    return captured


def _targets(batch, model):
    batch = _to_device(batch, model_device(model))
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def _head_loss(model, head, captured: _Captured, index: int, loss_fn: LossFn | None) -> torch.Tensor:
    """The batch loss from the head's output alone: loss_fn(logits, targets) for tuple batches, else the
    classification loss transformers' heads compute."""
    args, kwargs = captured.inputs[index]
    logits = head(*args, **kwargs)
    if loss_fn is not None:
        return loss_fn(logits, captured.targets[index])
    return classification_loss(logits, captured.targets[index], getattr(model, "config", None))


def _shortcut_matches(model, head, captured: _Captured, first_batch, loss_fn) -> bool:
    """Whether the loss computed from the head's output alone equals the model's loss on the first batch."""
    if captured.targets[0] is None or not torch.is_tensor(captured.outputs[0]):
        return False
    try:
        with torch.no_grad():
            shortcut = float(_head_loss(model, head, captured, 0, loss_fn))
            reference = float(batch_loss(model, first_batch, None if isinstance(first_batch, Mapping) else loss_fn))
    except Exception:  # any output or target the shortcut does not understand: train through the model
        return False
    return math.isfinite(shortcut) and math.isclose(shortcut, reference, rel_tol=1e-4, abs_tol=1e-6)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, parameters: list[nn.Parameter]):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in parameters}
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def warm_up_head(
    model: nn.Module,
    batches: Sequence,
    modules: Sequence[str],
    steps: int,
    lr: float = 1e-2,
    loss_fn: LossFn | None = None,
    weight_decay: float = 0.0,
) -> WarmupRecord:
    """Trains only `modules` (the new head, e.g. modules_to_save) for `steps` AdamW steps over the calibration
    batches in turn, in eval mode, the rest of the model frozen. The head's weights change in place; every
    parameter's requires_grad comes back as it was."""
    if steps < 1:
        raise ValueError(f"head warm-up steps must be >= 1, got {steps}")
    heads = find_head_modules(model, modules)
    parameters = [p for _, m in heads for p in m.parameters()]
    if not parameters:
        raise ValueError(f"head warm-up: the modules {[p for p, _ in heads]} have no parameters to train")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        before = mean_loss(model, batches, loss_fn)
        head = heads[0][1]
        # loss_fn(outputs, batch) of dict batches needs the model's whole output: no shortcut then
        shortcut_loss = None if isinstance(batches[0], Mapping) else loss_fn
        possible = len(heads) == 1 and (loss_fn is None or shortcut_loss is not None)
        captured = _capture(model, head, batches, loss_fn) if possible else None
        cached = captured is not None and _shortcut_matches(model, head, captured, batches[0], shortcut_loss)
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        with _only_trainable(model, parameters), torch.enable_grad():
            for step in range(steps):
                index = step % len(batches)
                if cached:
                    loss = _head_loss(model, head, captured, index, shortcut_loss)
                else:
                    loss = batch_loss(model, batches[index], loss_fn, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        after = mean_loss(model, batches, loss_fn)
    finally:
        for module, training in modes:
            module.training = training
    return WarmupRecord([p for p, _ in heads], steps, lr, before, after, cached)
