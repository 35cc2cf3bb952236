"""Growing a TopoModel (a peft model whose adapter is made of topo layers) during fine-tuning: METHOD.md section 7
applied to PEFT.

Each new layer becomes part of the model's adapter: a `TopoLayer` made by the tuner at the position the topological
derivative ranks first (scored with the current, trained head and layers), holding the eigenvector initialisation
`insert_layer` found, with the adapter's config (adapter_shapes, target_modules) updated. save_pretrained,
`TopoModel.from_pretrained`, `peft.PeftModel.from_pretrained` and load_adapter therefore see every grown layer, and
peft freezes, counts and activates it like the others. A model starts from its head alone (`head_only_topo_model`)
or from the k0 layers of `get_topo_model`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable

import torch
from peft import PeftModel
from torch import nn

from .. import __version__
from ..config import TopoAdapterConfig
from ..insertion import InsertionRecord, insert_layer
from ..layers import ADAPTER_ATTRIBUTE, TopoAdapter, detach
from ..locate import config_positions, find_positions
from ..model import TopoModel, load_adapter_weights
from ..report import INSERTION_KEYS, TopoReport
from ..sensitivity.objective import LossFn, materialize
from ..tuner import TopoTuner
from .distributed import average_gradients_across_ranks, unwrap
from .grow import Grower, GrowthConfig, count_parameters, first_batches
from .state import extend_optimizer

# Names a cross-fitted estimate of the gain (METHOD.md section 8) may have on an InsertionRecord or PositionScore;
# when present it decides the stop rule instead of the plain eigenvalue, whose estimate is biased upwards.
CROSSFIT_FIELDS = ("crossfit_gain", "cross_fitted_gain")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_topo_model(model: nn.Module) -> bool:
    """A peft model whose tuner holds topo layers: a TopoModel, or what peft.PeftModel.from_pretrained loads."""
    return isinstance(model, PeftModel) and isinstance(model.base_model, TopoTuner)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def crossfit_value(item) -> float | None:
    for name in CROSSFIT_FIELDS:
        value = getattr(item, name, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def head_only_topo_model(model: nn.Module, config: TopoAdapterConfig, adapter_name: str = "default") -> TopoModel:
    """A TopoModel with no topo layers yet, in which only `modules_to_save` (the new head) trains: the start of
    progressive growth from the head. Growth adds the layers; saved before the first one, it loads back as such.

    The config's scoring settings (positions, block_path, activation, eps_s rule, line search...) are the ones growth
    uses, and they are saved with the adapter. The model is modified in place, as in peft.
    """
    if not isinstance(config, TopoAdapterConfig):
        raise TypeError(f"config must be a TopoAdapterConfig, got {type(config).__name__}")
    if config.adapter_shapes:
        raise ValueError(
            "this config already describes layers (adapter_shapes): build that model with TopoModel(model, config) "
            "or load it with TopoModel.from_pretrained"
        )
    if config.target_modules:
        raise ValueError(
            "target_modules fixes the positions of get_topo_model; to restrict where growth may insert, give "
            "TopoAdapterConfig(positions=[...]) instead"
        )
    if not config.modules_to_save:
        raise ValueError(
            "a TopoModel without layers trains only modules_to_save: name the new head there (e.g. "
            "modules_to_save=['classifier']), or start from k0 >= 1 layers with get_topo_model"
        )
    config.adapter_shapes = {}
    config.topo_version = __version__
    topo_model = TopoModel(model, config, adapter_name)
    topo_model.topo_report = TopoReport()
    return topo_model


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("the position's module is not part of the model")


def _adapter_dtype(model: PeftModel, adapter_name: str, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the adapter's layers; with none yet, the one peft gives new layers (float32 on a bf16/fp16 base)."""
    for *_, layer in model.base_model._topo_layers():
        if adapter_name in layer.topo_up:
            return layer.topo_up[adapter_name].dtype
    return torch.float32 if base_dtype in LOW_PRECISION else base_dtype


@torch.no_grad()
def add_topo_layer(
    model: PeftModel, position: str, shape: dict, adapter_name: str, weights: TopoAdapter | None = None
) -> list[nn.Parameter]:
    """Makes a layer of the given shape part of the adapter at `position`, through the tuner (as at injection), and
    returns its trainable parameters in a fixed order (D, b, U). Zero weights unless `weights` (a plain TopoAdapter)
    are given."""
    config = model.peft_config[adapter_name]
    shapes = config.adapter_shapes or {}
    if position in shapes:
        raise ValueError(f"position {position!r} already carries a layer of adapter {adapter_name!r}")
    tuner, base = model.base_model, model.get_base_model()
    parent_path, _, target_name = shape["module"].rpartition(".")
    target = base.get_submodule(shape["module"])
    reference = next(target.parameters(), None)
    reference = reference if reference is not None else next(base.parameters())
    dtype = _adapter_dtype(model, adapter_name, reference.dtype)
    # The tuner creates the layers of every shape whose module is the key: give it this one only, or a layer already
    # at the same module (the embeddings position is the input of block 0) would be re-created with zero weights.
    single = copy.copy(config)
    single.adapter_shapes = {position: shape}
    tuner._create_and_replace(
        single, adapter_name, target, target_name, base.get_submodule(parent_path), current_key=shape["module"]
    )
    config.adapter_shapes = {**shapes, position: dict(shape)}
    config.target_modules = [*(config.target_modules or []), position]
    config.num_adapters = len(config.adapter_shapes)
    config.topo_version = __version__
    if shape["module"] not in tuner.targeted_module_names:
        tuner.targeted_module_names.append(shape["module"])

    layer = getattr(target, ADAPTER_ATTRIBUTE[shape["where"]])
    layer.train(target.training)
    layer.topo_down[adapter_name].to(dtype)
    up = layer.topo_up[adapter_name]
    if up.dtype != dtype:
        layer.topo_up[adapter_name] = nn.Parameter(up.to(dtype), requires_grad=up.requires_grad)
    # Trainable as the adapter's other layers are (the layer starts out active for "default" only).
    layer.set_adapter(tuner.active_adapters, inference_mode=config.inference_mode)
    if weights is not None:
        load_adapter_weights(model, {position: shape}, {position: weights}, adapter_name)
    down, up = layer.topo_down[adapter_name], layer.topo_up[adapter_name]
    return [p for p in (down.weight, down.bias, up) if p.requires_grad]


def rebuild_topo_model(
    model: nn.Module, growth_state: dict, optimizer: torch.optim.Optimizer | None = None, group: int = 0
) -> nn.Module:
    """Adds zero layers of the recorded shapes to the TopoModel the run started from, in the recorded order, so its
    adapter matches a checkpoint of the grown model; with an optimizer built on the starting model, appends their
    parameters exactly as growth did, so the optimizer's saved state loads onto the right tensors."""
    model = unwrap(model)
    for spec in growth_state.get("insertions", []):
        if spec["position"] in (model.peft_config[spec["adapter_name"]].adapter_shapes or {}):
            raise ValueError(
                f"the model already carries the grown layer at {spec['position']!r}: rebuild the model the run "
                "started from (the same get_topo_model or head_only_topo_model call), not one loaded from the grown "
                "checkpoint, so that the optimizer's parameters come in the order growth appended them"
            )
        parameters = add_topo_layer(model, spec["position"], spec["shape"], spec["adapter_name"])
        if optimizer is not None:
            extend_optimizer(optimizer, parameters, group)
        average_gradients_across_ranks(parameters)
    return model


def layer_cost(adapter: TopoAdapter, train_up: bool) -> int:
    """Trainable parameters of the layer once in the adapter."""
    return adapter.down.weight.numel() + adapter.down.bias.numel() + (adapter.up.numel() if train_up else 0)


class TopoModelGrower(Grower):
    """`Grower` for a TopoModel: the same schedules (I and II), stop rules, log and state, with each new layer made
    part of the peft adapter (see the module docstring).

    - Candidates are the adapter's positions (TopoAdapterConfig.positions, or all) that carry none of its layers.
    - Scoring and insertion use the adapter's TopoAdapterConfig (saved with it, so a reload builds the same layers):
      GrowthConfig.scoring and GrowthConfig.train_up apply to plain models only.
    - Stops when the best position's eigenvalue (its cross-fitted gain where the record has one) is <= threshold,
      at max_insertions (grown layers), max_depth (all layers of the adapter), max_params, max_trainable (a layer
      that would exceed it gets fewer neurons if one or more fit), or when no candidate is left. A line search that
      lowers no loss inserts nothing this time without stopping growth.
    """

    _STATE = (*Grower._STATE, "report")

    def __init__(
        self,
        model: nn.Module,
        config: GrowthConfig | dict | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        adapter_name: str | None = None,
    ):
        super().__init__(model, config, loss_fn, optimizer)
        if not is_topo_model(self.model):
            raise TypeError(f"TopoModelGrower grows a TopoModel, got {type(self.model).__name__}")
        rules = (self.config.position_rule, self.config.init_rule)
        if self.config.method != "fixed" and rules != ("topological", "eigen"):
            raise ValueError(
                "growing a TopoModel supports method='topological' (eigenvector layers at the best position) and "
                f"'fixed'; got method={self.config.method!r} where={self.config.where!r} init={self.config.init!r}. "
                "The baselines insert plain layers: grow a plain model for them"
            )
        name = adapter_name or self.model.active_adapter
        if not isinstance(name, str) or name not in self.model.peft_config:
            raise ValueError(f"no adapter {name!r} to grow; the model has {list(self.model.peft_config)}")
        self.adapter_name = name

    @property
    def adapter_config(self) -> TopoAdapterConfig:
        return self.model.peft_config[self.adapter_name]

    @property
    def report(self) -> dict | None:
        """The adapter's topo report (part of the growth state, so a resumed plain loop has the grown insertions)."""
        report = getattr(self.model, "topo_reports", {}).get(self.adapter_name)
        return report.as_dict() if report is not None else None

    @report.setter
    def report(self, value: dict | None) -> None:
        if value is not None and hasattr(self.model, "topo_reports"):
            self.model.topo_reports[self.adapter_name] = TopoReport.from_dict(value)

    def _depth(self) -> int:
        return len(self.adapter_config.adapter_shapes or {})

    def _allowed_new_parameters(self) -> int | None:
        """How many parameters a new layer may add under max_trainable and max_params (None: no limit)."""
        limits = []
        if self.config.max_trainable is not None:
            limits.append(self.config.max_trainable - trainable_parameters(self.model))
        if self.config.max_params is not None:
            limits.append(self.config.max_params - count_parameters(self.model))
        return min(limits) if limits else None

    def _check_stop_rules(self) -> bool:
        if not super()._check_stop_rules():
            return False
        limit = self.config.max_trainable
        if limit is not None and trainable_parameters(self.model) >= limit:
            self.stopped = f"reached max_trainable={limit}"
        return not self.stopped

    def candidates(self) -> tuple[list[str], dict[str, int]]:
        """Names of the positions that may get a layer, and every position's depth index."""
        config = self.adapter_config
        found = config_positions(self.model.get_base_model(), config)
        taken = set(config.adapter_shapes or {})
        return [p.name for p in found if p.name not in taken], {p.name: p.index for p in found}

    def _insert(self, batches: list, positions: list[str], **caps) -> tuple[InsertionRecord, TopoAdapter | None]:
        """insert_layer on the base model, then the plain layer it attached taken out again: the model is unchanged
        and the layer (None when not accepted) is returned for the adapter to take in."""
        base = self.model.get_base_model()
        scoring = self.adapter_config.scoring_config(positions=positions, step_scale=self.config.step_scale, **caps)
        record = insert_layer(base, batches, scoring, self.loss_fn, first_step=self._first_step())
        if not record.accepted:
            return record, None
        (tap,) = find_positions(base, scoring.block_path, [record.position], scoring.include_head, scoring.head_path)
        adapter = detach(tap)
        if adapter is not record.adapter:
            raise RuntimeError(f"insert_layer's layer at {record.position} was not the last one attached there")
        return record, adapter

    def _first_step(self) -> int | None:
        """Where the line search starts: where the previous insertion's ended (step sizes vary little)."""
        steps = [e.get("line_search_step") for e in self.log if e["accepted"]]
        return steps[-1] if steps else None

    def _neuron_caps(self, fit: int) -> dict:
        config = self.adapter_config
        if config.neurons is not None:
            return {"neurons": min(config.neurons, fit)}
        return {"max_neurons": min(config.max_neurons or fit, fit)}

    def grow_now(
        self,
        calibration_data: Iterable,
        epoch: float | None = None,
        step: int | None = None,
        val_loss: float | None = None,
    ) -> dict:
        """Scores the free positions with the current model, inserts one layer into the adapter (if the rules allow)
        and returns the log entry."""
        start = time.perf_counter()
        entry = {
            "epoch": epoch,
            "step": step,
            "val_loss": val_loss,
            "method": self.config.method,
            "where": "topological",
            "init": "eigen",
            "adapter": self.adapter_name,
            "accepted": False,
            "reason": "",
        }
        remaining, depth_index = self.candidates()
        if not remaining:
            self.stopped = entry["reason"] = f"every candidate position carries a layer of {self.adapter_name!r}"
            return self._finish(entry, start)
        config = self.adapter_config
        batches = first_batches(materialize(calibration_data), self.config.calibration_batches)
        record, adapter = self._insert(batches, remaining)
        entry["scores"] = {s.name: s.eigenvalue for s in record.scores}
        entry["score_kind"] = "eigenvalue"
        crossfit = {s.name: value for s in record.scores if (value := crossfit_value(s)) is not None}
        if crossfit:
            entry["crossfit_scores"] = crossfit
        entry["position"] = record.position
        threshold = max(config.threshold, 0.0)
        gain = crossfit_value(record)
        if gain is not None:
            entry["crossfit_gain"] = gain
        if not record.accepted:
            entry["reason"] = record.reason
            if (record.eigenvalue if gain is None else gain) <= threshold:  # the paper's stop rule: no layer helps
                self.stopped = record.reason
                self._add_to_report(record, epoch, step, depth_index)
            return self._finish(self._with_record(entry, record), start)
        if gain is not None and gain <= threshold:
            self.stopped = entry["reason"] = (
                f"cross-fitted gain {gain:.4g} <= threshold {threshold:.4g} at {record.position}: the best layer "
                "would not lower the loss on data it was not fitted to"
            )
            return self._finish(self._with_record(entry, record), start)

        allowed = self._allowed_new_parameters()
        cost = layer_cost(adapter, config.train_up)
        if allowed is not None and cost > allowed:
            fit = allowed // (cost // adapter.num_neurons)
            if fit < 1:
                self.stopped = entry["reason"] = (
                    f"a layer of one neuron at {record.position} would exceed the parameter budget "
                    f"({self._budget_text()})"
                )
                return self._finish(self._with_record(entry, record), start)
            entry["budget_neurons"] = fit  # the eps_s rule's layer did not fit: the best `fit` neurons do
            record, adapter = self._insert(batches, [record.position], **self._neuron_caps(fit))
            if adapter is None:
                entry["reason"] = record.reason
                return self._finish(self._with_record(entry, record), start)

        base = self.model.get_base_model()
        (tap,) = find_positions(base, config.block_path, [record.position], config.include_head, config.head_path)
        shape = {
            "module": _module_path(base, tap.module),
            "where": tap.where,
            "width": adapter.width,
            "layout": adapter.layout,
            "neurons": adapter.num_neurons,
            "kernel_size": adapter.kernel_size,
        }
        parameters = add_topo_layer(self.model, record.position, shape, self.adapter_name, weights=adapter)
        if self.optimizer is not None:
            extend_optimizer(self.optimizer, parameters, self.config.param_group)
        average_gradients_across_ranks(parameters)
        self.insertions.append({"position": record.position, "adapter_name": self.adapter_name, "shape": shape})
        self._add_to_report(record, epoch, step, depth_index)
        entry.update(
            accepted=True,
            depth=self._depth(),
            trainable=trainable_parameters(self.model),
            params=count_parameters(self.model),
        )
        return self._finish(self._with_record(entry, record), start)

    def _budget_text(self) -> str:
        parts = [f"{name}={getattr(self.config, name)}" for name in ("max_trainable", "max_params")]
        return ", ".join(p for p in parts if not p.endswith("=None"))

    @staticmethod
    def _with_record(entry: dict, record: InsertionRecord) -> dict:
        entry.update(
            eigenvalue=record.eigenvalue,
            eps=record.eps,
            loss_before=record.loss_before,
            loss_after=record.loss_after,
            predicted_decrease=record.predicted_decrease,
            neurons=record.num_neurons,
            line_search_step=record.line_search_step,
        )
        return entry

    def _add_to_report(self, record: InsertionRecord, epoch, step, depth_index: dict[str, int]) -> None:
        """The insertion (or the decision that stopped growth) joins the adapter's report, saved with the model."""
        reports = getattr(self.model, "topo_reports", None)
        if reports is None:  # a plain peft.PeftModel holds no report
            return
        report = reports.get(self.adapter_name) or TopoReport()
        if not report.scores:  # a model started from its head: the first growth round's scores
            report.scores = [{**s.as_dict(), "index": depth_index.get(s.name, s.index)} for s in record.scores]
        insertion = {key: getattr(record, key) for key in INSERTION_KEYS}
        insertion.update(index=depth_index.get(record.position, record.index), epoch=epoch, step=step)
        report.insertions.append(insertion)
        reports[self.adapter_name] = report


def make_grower(
    model: nn.Module,
    config: GrowthConfig | dict | None = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Grower:
    """The grower that fits the model: `TopoModelGrower` for a TopoModel, `Grower` for a plain model."""
    inner = unwrap(model)
    if is_topo_model(inner):
        return TopoModelGrower(model, config, loss_fn, optimizer)
    if isinstance(inner, PeftModel):
        raise TypeError(
            f"cannot grow a peft model with a {type(inner.base_model).__name__} adapter: the new layers would not be "
            "part of its adapter (neither saved nor loaded). Grow a TopoModel (get_topo_model or "
            "hf_topoadapt.growth.head_only_topo_model) or a plain model"
        )
    grower = Grower(model, config, loss_fn, optimizer)
    if grower.config.max_trainable is not None:
        raise ValueError(
            "max_trainable is for growing a TopoModel; a plain model trains all its parameters: use max_params"
        )
    return grower
