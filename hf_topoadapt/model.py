"""TopoModel and get_topo_model: the PEFT-style front door.

get_topo_model scores every position, inserts eigenvector-initialised layers at the top-k greedily
(each one line-searched with the earlier ones in place), then hands the result to peft as a `PeftModel`
whose tuner holds the layers. Everything peft users expect (save_pretrained, from_pretrained,
push_to_hub, disable_adapter, print_trainable_parameters, modules_to_save) comes from peft.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from torch import nn

from . import __version__
from .config import TopoAdapterConfig
from .insertion import InsertionRecord, insert_layer
from .layers import ADAPTER_ATTRIBUTE, TopoAdapter, attach, detach, factory_kwargs
from .locate import Position, find_positions
from .model_cards import render_model_card
from .report import TopoReport
from .sensitivity.capture import transform_stream
from .sensitivity.features import layout_of
from .sensitivity.objective import LossFn, batch_loss, materialize, mean_loss
from .tuner import TopoLayer

REPORT_NAME = "topo_report.json"


class TopoModel(PeftModel):
    """A `peft.PeftModel` whose adapters are topological-derivative layers, with `topo_report`."""

    topo_report: TopoReport | None = None

    def save_pretrained(
        self, save_directory: str, adapter_id: str | None = None, training: str | None = None, **kwargs
    ) -> None:
        """peft's adapter_config.json and adapter_model.safetensors, plus topo_report.json and our model card.

        Args:
            adapter_id: the Hub id or path people will load it from (shown in the card).
            training: a markdown paragraph on the training data and metrics, for the card.
        """
        super().save_pretrained(save_directory, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        report = self.topo_report or TopoReport()
        with open(os.path.join(save_directory, REPORT_NAME), "w") as f:
            json.dump(report.as_dict(), f, indent=2)
        card = render_model_card(
            self.peft_config[self.active_adapter], report, adapter_id or save_directory, training or self.training_note
        )
        with open(os.path.join(save_directory, "README.md"), "w") as f:
            f.write(card)

    training_note: str | None = None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload topo adapter",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        api: HfApi | None = None,
    ):
        """Uploads the saved adapter folder (config, safetensors weights, report, model card) with huggingface_hub.

        transformers' own push_to_hub would replace the card with a generic one, hence this override.
        """
        api = api or HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, adapter_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
                token=token,
            )

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default", **kwargs) -> TopoModel:
        """Loads a saved topo adapter onto the base model (safetensors only), with its report."""
        from .persistence import load_topo_model

        return load_topo_model(cls, model, model_id, adapter_name, **kwargs)


def _greedy_insertions(model, batches, config, loss_fn, candidates: list[Position]) -> list[InsertionRecord]:
    """Insert at the best remaining position, k times, each one line-searched with the earlier ones in place."""
    records: list[InsertionRecord] = []
    remaining = [p.name for p in candidates]
    while remaining and sum(r.accepted for r in records) < config.num_adapters:
        record = insert_layer(model, batches, config.scoring_config(positions=remaining), loss_fn)
        records.append(record)
        if not record.accepted and record.eigenvalue <= max(config.threshold, 0.0):
            break  # the best remaining position cannot lower the loss, so none can
        remaining.remove(record.position)
    return records


def get_topo_model(
    model: nn.Module,
    config: TopoAdapterConfig,
    calibration_data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> TopoModel:
    """Scores every position of `model`, inserts topo adapters at the top-ranked ones and returns a TopoModel
    with only the adapters (and `modules_to_save`) trainable. The model is modified in place, as in peft.
    """
    if not isinstance(config, TopoAdapterConfig):
        raise TypeError(f"config must be a TopoAdapterConfig, got {type(config).__name__}")
    if calibration_data is None and not (config.target_modules and config.init == "random"):
        raise ValueError(
            "get_topo_model needs calibration_data (an iterable of batches) to score positions and initialise the "
            "layers; only TopoAdapterConfig(target_modules=[...], init='random') works without data"
        )
    batches = None
    if calibration_data is not None:
        batches = materialize(calibration_data)
        if config.calibration_batches is not None:
            batches = batches[: config.calibration_batches]
    scoring = config.scoring_config()
    candidates = find_positions(
        model, scoring.block_path, config.target_modules or scoring.positions, scoring.include_head, scoring.head_path
    )
    if config.init == "random":
        records = _random_insertions(model, config, candidates, batches, loss_fn)
    else:
        records = _greedy_insertions(model, batches, config, loss_fn, candidates)
    accepted = [r for r in records if r.accepted]
    if not accepted:
        reason = records[0].reason if records else "no candidate positions"
        raise ValueError(f"no topo adapter could be inserted: {reason}")

    by_name = {p.name: p for p in candidates}
    shapes, weights = {}, {}
    for record in accepted:
        position = by_name[record.position]
        adapter = detach(position)
        shapes[record.position] = {
            "module": _module_path(model, position.module),
            "where": position.where,
            "width": adapter.width,
            "layout": adapter.layout,
            "neurons": adapter.num_neurons,
        }
        weights[record.position] = adapter
    config.target_modules = list(shapes)
    config.adapter_shapes = shapes
    config.topo_version = __version__

    peft_model = TopoModel(model, config, adapter_name)
    load_adapter_weights(peft_model, shapes, weights, adapter_name)
    peft_model.topo_report = TopoReport.from_records(records)
    return peft_model


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("the position's module is not part of the model")


def _random_insertions(model, config, candidates, batches, loss_fn) -> list[InsertionRecord]:
    """Ablation: small random rows at the fixed positions (no eigenvectors, no line search)."""
    if not config.target_modules:
        raise ValueError("init='random' needs target_modules: the positions to insert at")
    generator = torch.Generator().manual_seed(config.seed)
    records = []
    for position in candidates:
        width, layout = _probe_width(model, position, batches, loss_fn)
        neurons = config.neurons or config.max_neurons or 8
        adapter = TopoAdapter(width, neurons, layout, config.kernel_size, config.activation, **factory_kwargs(model))
        with torch.no_grad():
            for tensor in (adapter.down.weight, adapter.down.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * config.init_scale)
            eye = torch.zeros(width, neurons)
            eye[torch.randperm(width, generator=generator)[:neurons], torch.arange(min(neurons, width))] = 1.0
            adapter.up.copy_(eye)
        before = mean_loss(model, batches, loss_fn) if batches else float("nan")
        attach(position, adapter)
        after = mean_loss(model, batches, loss_fn) if batches else float("nan")
        records.append(
            InsertionRecord(
                position.name,
                position.index,
                float("nan"),
                True,
                reason="random init",
                directions="random",
                num_neurons=neurons,
                loss_before=before,
                loss_after=after,
                measured_decrease=before - after,
            )
        )
    return records


def _probe_width(model, position: Position, batches, loss_fn) -> tuple[int, str]:
    """Width and layout of the hidden state at a position: one forward pass, or the model config without data."""
    if batches is None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(
                "cannot tell the hidden size at the positions without data: pass calibration_data (one batch is enough)"
            )
        return int(hidden), "tokens"
    seen: list[torch.Tensor] = []
    with transform_stream(position, lambda h: seen.append(h) or h), torch.no_grad():
        batch_loss(model, batches[0], loss_fn)
    layout = layout_of(seen[0])
    return seen[0].shape[1] if layout == "channels" else seen[0].shape[-1], layout


@torch.no_grad()
def load_adapter_weights(peft_model: PeftModel, shapes: dict, adapters: dict, adapter_name: str) -> None:
    """Copies plain TopoAdapter weights into the injected TopoLayers."""
    base = peft_model.base_model.model
    for name, shape in shapes.items():
        module = base.get_submodule(shape["module"])
        layer = getattr(module, ADAPTER_ATTRIBUTE[shape["where"]])
        if not isinstance(layer, TopoLayer):
            raise RuntimeError(f"no topo layer was injected at {name}")
        adapter = adapters[name]
        layer.topo_down[adapter_name].weight.copy_(adapter.down.weight)
        layer.topo_down[adapter_name].bias.copy_(adapter.down.bias)
        layer.topo_up[adapter_name].copy_(adapter.up)
