"""The grown architecture as data, and checkpoints that survive a crash.

A growth state lists every insertion (where, width, neurons, layout), so `rebuild` can put zero layers
of the right shapes into a freshly built model before `load_state_dict`, and extend a fresh optimizer
in the same parameter order as the uninterrupted run (optimizer state is keyed by that order).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..layers import TopoAdapter, attach, factory_kwargs
from ..locate import find_positions
from .distributed import average_gradients_across_ranks, unwrap
from .models import GrowableModel


def list_index(model: nn.Module, position: str) -> int | None:
    """Index in `model.blocks` that a layer at `position` takes, or None when it must go in by a hook.

    "embeddings" (and "stem", the position of a model with no blocks yet) is the input of block 0;
    "blocks.i" is the output of block i, so the new layer becomes block i + 1.
    """
    if not isinstance(model, GrowableModel):
        return None
    if position in ("embeddings", "stem"):
        return 0
    prefix, _, number = position.rpartition(".")
    if prefix == model.block_path and number.isdigit():
        return int(number) + 1
    return None


def place_layer(model: nn.Module, adapter: nn.Module, spec: dict) -> None:
    """Puts the adapter into the model where `spec` says: into the block list, or attached by a hook."""
    adapter.train(model.training)
    if spec["mode"] == "list":
        model.get_submodule(spec["block_path"]).insert(spec["index"], adapter)
    elif spec["mode"] == "hook":
        (tap,) = find_positions(model, spec.get("block_path"), [spec["position"]])
        attach(tap, adapter)
    else:
        raise ValueError(f"unknown insertion mode {spec['mode']!r} in the growth state")


def extend_optimizer(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], group: int = 0) -> int:
    """Appends new parameters to an existing param group; returns how many were added.

    The state of every existing parameter (Adam's exp_avg, exp_avg_sq, step) is untouched, and the number
    of groups stays the same so an LR scheduler carries on unchanged. Works on an accelerate
    `AcceleratedOptimizer`, whose `param_groups` are the wrapped optimizer's.
    """
    if not 0 <= group < len(optimizer.param_groups):
        raise ValueError(f"param group {group} does not exist; the optimizer has {len(optimizer.param_groups)}")
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in parameters if p.requires_grad and id(p) not in known]
    optimizer.param_groups[group]["params"].extend(new)
    return len(new)


def rebuild(
    model: nn.Module, growth_state: dict, optimizer: torch.optim.Optimizer | None = None, group: int = 0
) -> nn.Module:
    """Inserts zero layers of the recorded shapes, in the recorded order, so the model's state dict
    matches a checkpoint of the grown model; with an optimizer built on the base model, appends their
    parameters exactly as growth did, so the optimizer's saved state loads too. A TopoModel's layers are
    part of its peft adapter: `topo_model.rebuild_topo_model` adds them."""
    model = unwrap(model)
    from .topo_model import is_topo_model, rebuild_topo_model  # imports this module

    if is_topo_model(model):
        return rebuild_topo_model(model, growth_state, optimizer, group)
    factory = factory_kwargs(model)
    for spec in growth_state.get("insertions", []):
        adapter = TopoAdapter(
            spec["width"],
            spec["neurons"],
            spec["layout"],
            spec["kernel_size"],
            spec["activation"],
            train_up=spec.get("train_up", True),
            **factory,
        )
        place_layer(model, adapter, spec)
        if optimizer is not None:
            extend_optimizer(optimizer, adapter.parameters(), group)
        average_gradients_across_ranks(adapter.parameters())
    return model


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes through a temporary file in the same folder and renames it: a crash mid-write leaves the
    previous file intact (os.replace is atomic on POSIX and Windows)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, lambda file: file.write(json.dumps(value, indent=2, default=str).encode()))


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    grower: Any = None,
    extra: dict | None = None,
) -> None:
    """One file with the model, optimizer, scheduler, growth state (architecture + log), RNG and `extra`."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "growth": grower.state_dict() if grower is not None else {"insertions": []},
        "rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    grower: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Rebuilds the grown architecture on a freshly built base model (and its fresh optimizer), loads every
    state and returns the checkpoint's `extra` dict."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    group = grower.config.param_group if grower is not None else 0
    rebuild(model, payload["growth"], optimizer, group)
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if grower is not None:
        grower.load_state_dict(payload["growth"])
    if restore_rng:
        torch.set_rng_state(payload["rng"])
    return payload["extra"]
