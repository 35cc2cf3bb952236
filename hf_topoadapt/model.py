"""TopoModel and get_topo_model: the PEFT-style front door.

get_topo_model scores every position, inserts eigenvector-initialised layers at the top-k greedily
(each one line-searched with the earlier ones in place), then hands the result to peft as a `PeftModel`
whose tuner holds the layers. Everything peft users expect (save_pretrained, from_pretrained,
push_to_hub, disable_adapter, print_trainable_parameters, modules_to_save) comes from peft.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from torch import nn

from . import __version__
from .cards import render_model_card
from .config import TopoAdapterConfig
from .insertion import InsertionRecord, insert_layer
from .layers import ADAPTER_ATTRIBUTE, TopoAdapter, attach, detach, factory_kwargs
from .locate import Position, config_positions
from .report import TopoReport
from .scoring import ScoringRound, score_round
from .sensitivity.capture import transform_stream
from .sensitivity.features import effective_kernel, layout_of
from .sensitivity.objective import LossFn, batch_loss, materialize, mean_loss
from .tuner import PREFIX, TopoLayer, check_not_sharded, sharded_parameters
from .warmup import find_head_modules, warm_up_head

REPORT_NAME = "topo_report.json"


class TopoModel(PeftModel):
    """A `peft.PeftModel` whose adapters are topological-derivative layers, with a report per adapter."""

    training_note: str | None = None  # a markdown paragraph on the training, for the model card
    card_results: list | None = None  # huggingface_hub EvalResults: the card's model-index
    card_datasets: list[str] | None = None  # Hub ids of the training data, for the card's metadata

    def _full_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors (topo layers and modules_to_save) in full, gathered from their shards on every
        process alike; the base weights are left sharded."""
        state = {}
        for key, value in self.state_dict().items():
            if PREFIX in key or ".modules_to_save." in key:
                state[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
        return state

    @property
    def topo_reports(self) -> dict[str, TopoReport]:
        """Every adapter's report by adapter name (an adapter made or loaded without one has none)."""
        return self.__dict__.setdefault("_topo_reports", {})

    @property
    def topo_report(self) -> TopoReport | None:
        """The active adapter's report."""
        name = self.active_adapter
        return self.topo_reports.get(name) if isinstance(name, str) else None

    @topo_report.setter
    def topo_report(self, report: TopoReport | None) -> None:
        if not isinstance(self.active_adapter, str):
            raise ValueError(f"no single active adapter ({self.active_adapter!r}) to attach a report to")
        if report is None:
            self.topo_reports.pop(self.active_adapter, None)
        else:
            self.topo_reports[self.active_adapter] = report

    def save_pretrained(
        self, save_directory: str, adapter_id: str | None = None, training: str | None = None, **kwargs
    ) -> None:
        """peft's adapter_config.json and adapter_model.safetensors, plus topo_report.json and our model card, for
        each saved adapter: "default" in `save_directory`, any other in the subfolder peft gives it (its name).

        With the base sharded by FSDP2 (`fully_shard`), call it on every process: the adapter tensors are gathered
        (a collective) and the first process writes them.

        Args:
            adapter_id: the Hub id or path people will load it from (shown in the card).
            training: a markdown paragraph on the training data and metrics, for the card.
        """
        if "state_dict" not in kwargs and sharded_parameters(self):
            kwargs["state_dict"] = self._full_adapter_state()
            kwargs.setdefault("is_main_process", torch.distributed.get_rank() == 0)
        super().save_pretrained(save_directory, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        for name in kwargs.get("selected_adapters") or list(self.peft_config):
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            report = self.topo_reports.get(name) or TopoReport()
            with open(os.path.join(folder, REPORT_NAME), "w") as f:
                json.dump(report.as_dict(), f, indent=2)
            card = render_model_card(
                self.peft_config[name],
                report,
                adapter_id or folder,
                training or self.training_note,
                model=self.get_base_model(),
                results=self.card_results,
                datasets=self.card_datasets,
                subfolder=name if adapter_id and name != "default" else None,  # its place inside the Hub repo
            )
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(card)

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

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, *args, **kwargs):
        """peft's load_adapter (a second adapter, or a Trainer checkpoint into an existing one) with the checks of
        `from_pretrained` and the adapter's report. A failed load of a new adapter leaves no part of it behind."""
        from .persistence import check_adapter_to_add, check_loaded_keys, read_report

        new = adapter_name not in self.peft_config
        if new:
            check_adapter_to_add(self.get_base_model(), model_id, **kwargs)
        try:
            result = super().load_adapter(
                model_id, adapter_name, is_trainable, *args, **{**kwargs, "use_safetensors": True}
            )
            check_loaded_keys(result)
            _check_no_grown_layers(result, model_id)
        except Exception:
            if new and adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            raise
        report = read_report(model_id, **kwargs)
        if report is None:
            self.topo_reports.pop(adapter_name, None)
        else:
            self.topo_reports[adapter_name] = report
        return result

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's delete_adapter, with the adapter's report; deleting the active one activates the first one left."""
        super().delete_adapter(adapter_name)
        self.topo_reports.pop(adapter_name, None)


def _check_no_grown_layers(result, model_id: str) -> None:
    """Saved topo layers the adapter lacks would be dropped without a word: the adapter was grown after this model
    was made (progressive growth), typically a Trainer checkpoint resumed without restoring the growth first."""
    extra = [key for key in result.unexpected_keys if PREFIX in key]
    if extra:
        raise ValueError(
            f"{model_id} holds topo layers this adapter does not have ({extra[:3]}): it was grown after this model "
            "was made. Load it with TopoModel.from_pretrained, or to resume a Trainer run call "
            "TopoGrowthCallback.restore(trainer, checkpoint) before trainer.train(resume_from_checkpoint=checkpoint)"
        )


def neuron_plan(scores: list, config: TopoAdapterConfig) -> list[tuple[str, int]]:
    """(position, neurons) within `config.neuron_budget`, best value per parameter first: every candidate neuron
    (an output row's top eigenvalue, or its cross-fitted value) over what it costs at its position. At most
    `num_adapters` positions, unless `fill_budget` and they are full (width or max_neurons) with budget to spare."""
    items = []
    for score in scores:
        if score.spectrum is None:
            continue
        cost = score.num_features + (score.width if config.train_up else 0)
        if score.crossfit is not None:
            values = list(zip(score.crossfit.rows, score.crossfit.values, strict=True))
        else:
            top: dict[int, float] = {}  # the spectrum is descending: a row's first pair is its top one
            for row, value in zip(score.spectrum.rows.tolist(), score.spectrum.eigenvalues.tolist(), strict=True):
                top.setdefault(row, value)
            values = list(top.items())
        items += [(value / cost, score.name, cost) for _, value in values if value > max(config.threshold, 0.0)]
    plan: dict[str, int] = {}
    spent, taken = 0, set()
    ordered = sorted(enumerate(items), key=lambda item: -item[1][0])
    # with fill_budget, a second pass opens positions past num_adapters for what the first left unspent
    for opening in (False, True) if config.fill_budget else (False,):
        for i, (_, name, cost) in ordered:
            full = not opening and name not in plan and len(plan) >= config.num_adapters
            capped = config.max_neurons is not None and plan.get(name, 0) >= config.max_neurons
            if i in taken or full or capped or spent + cost > config.neuron_budget:
                continue  # a cheaper neuron elsewhere may still fit
            plan[name] = plan.get(name, 0) + 1
            spent += cost
            taken.add(i)
    return list(plan.items())


def _budgeted_insertions(model, batches, config, loss_fn, candidates: list[Position]) -> list[InsertionRecord]:
    """Insert where `neuron_plan` puts the budget, each position with its planned neurons, one after the other (each
    rescored and line-searched with the earlier layers in place)."""
    scoring = config.scoring_config(positions=[p.name for p in candidates])
    first = score_round(model, batches, scoring, loss_fn)
    plan = neuron_plan(first.scores, config)
    if not plan:
        best = max(first.scores, key=lambda s: s.ranking_value)
        return [insert_layer(model, batches, scoring, loss_fn, best.name, scored=first)]
    records, first_step = [], None
    for i, (name, neurons) in enumerate(plan):
        scoring = config.scoring_config(positions=[name] if i else scoring.positions, neurons=neurons)
        # the first round's scores serve the first insertion (the neuron rule is applied when it is planned), and
        # every insertion with score_once
        reuse = first if not i else (_reused(first, records) if config.score_once else None)
        records += _insert_or_rescore(model, batches, scoring, loss_fn, name, first_step, reuse, records)
        first_step = records[-1].line_search_step if records[-1].accepted else first_step
    return records


def _insert_or_rescore(model, batches, scoring, loss_fn, name, first_step, reuse, records) -> list[InsertionRecord]:
    """The attempts at `name`, the last one decisive: insert_layer from `reuse`, an earlier round, and when that layer
    lowers no loss while earlier layers (`records`) went in since, again after scoring the position on the current
    model (its directions may have gone stale)."""
    record = insert_layer(model, batches, scoring, loss_fn, name, first_step=first_step, scored=reuse)
    if record.accepted or reuse is None or not any(r.accepted for r in records):
        return [record]
    record.reason += ", from the first scoring round's directions; scored again on the current model next"
    alone = dataclasses.replace(scoring, positions=[name])
    return [record, insert_layer(model, batches, alone, loss_fn, name, first_step=first_step)]


def _reused(scored: ScoringRound, records: list[InsertionRecord]) -> ScoringRound:
    """An earlier scoring round serving a later insertion: J is the loss after the layers inserted since (what the
    line search must beat), and the round's time is not counted again."""
    accepted = [r for r in records if r.accepted]
    loss = accepted[-1].loss_after if accepted else scored.loss
    return dataclasses.replace(scored, loss=loss, seconds={phase: 0.0 for phase in scored.seconds})


def _score_once_insertions(model, batches, config, loss_fn, candidates: list[Position]) -> list[InsertionRecord]:
    """The num_adapters best positions of one scoring round, best first, each line-searched with the earlier layers
    in place. A later position whose layer from that round no step improves is scored again on the current model
    (its directions may have gone stale with the layers inserted since), and passed over if that fails too."""
    scoring = config.scoring_config(positions=[p.name for p in candidates])
    first = score_round(model, batches, scoring, loss_fn)
    records: list[InsertionRecord] = []
    first_step = None
    for score in sorted(first.scores, key=lambda s: -s.ranking_value):
        if sum(r.accepted for r in records) >= config.num_adapters:
            break
        if score.ranking_value <= max(config.threshold, 0.0):
            if not records:  # the record says why nothing was inserted
                records.append(insert_layer(model, batches, scoring, loss_fn, score.name, scored=first))
            break  # the best remaining position cannot lower the loss, so none can
        reuse = _reused(first, records) if records else first
        records += _insert_or_rescore(model, batches, scoring, loss_fn, score.name, first_step, reuse, records)
        if records[-1].accepted:
            first_step = records[-1].line_search_step
    return records


def _insertions(model, batches, config, loss_fn, candidates: list[Position]) -> list[InsertionRecord]:
    """The eigen-initialised layers by the config's rule: a neuron budget, one scoring round, or the greedy rule."""
    if config.neuron_budget is not None:
        return _budgeted_insertions(model, batches, config, loss_fn, candidates)
    if config.score_once:
        return _score_once_insertions(model, batches, config, loss_fn, candidates)
    return _greedy_insertions(model, batches, config, loss_fn, candidates)


def _greedy_insertions(model, batches, config, loss_fn, candidates: list[Position]) -> list[InsertionRecord]:
    """Insert at the best remaining position, k times, each one scored again and line-searched with the earlier ones in
    place (the paper's rule)."""
    records: list[InsertionRecord] = []
    remaining = [p.name for p in candidates]
    first_step = None  # the line search starts where the previous one ended: step sizes vary little between layers
    while remaining and sum(r.accepted for r in records) < config.num_adapters:
        scoring = config.scoring_config(positions=remaining)
        record = insert_layer(model, batches, scoring, loss_fn, first_step=first_step)
        records.append(record)
        if record.accepted:
            first_step = record.line_search_step
        ranking = record.eigenvalue if record.crossfit_gain is None else record.crossfit_gain
        if not record.accepted and ranking <= max(config.threshold, 0.0):
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
    check_not_sharded(model)  # before the scoring work, not after it
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
    candidates = config_positions(model, scoring, named=config.target_modules)
    started = time.perf_counter()
    warmed = _warm_up_head(model, config, batches, loss_fn)
    warmup_seconds = time.perf_counter() - started
    if config.init == "random":
        records = _random_insertions(model, config, candidates, batches, loss_fn)
    else:
        records = _insertions(model, batches, config, loss_fn, candidates)
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
            "kernel_size": adapter.kernel_size,
        }
        weights[record.position] = adapter
    config.target_modules = list(shapes)
    config.adapter_shapes = shapes
    config.topo_version = __version__

    peft_model = TopoModel(model, config, adapter_name)
    load_adapter_weights(peft_model, shapes, weights, adapter_name)
    peft_model.topo_report = TopoReport.from_records(records)
    if warmed is not None:
        record, originals = warmed
        _restore_original_heads(peft_model, originals)
        peft_model.topo_report.warmup = record.as_dict()
        peft_model.topo_report.seconds = {"warmup": warmup_seconds, **peft_model.topo_report.seconds}
    return peft_model


def _warm_up_head(model, config: TopoAdapterConfig, batches, loss_fn):
    """The head warm-up before scoring: (its record, the heads' original weights), or None without one."""
    if not config.head_warmup_steps or batches is None:
        return None
    originals = {
        path: {k: v.detach().clone() for k, v in module.state_dict().items()}
        for path, module in find_head_modules(model, config.modules_to_save)
    }
    steps, lr = config.head_warmup_steps, config.head_warmup_lr
    return warm_up_head(model, batches, config.modules_to_save, steps, lr, loss_fn), originals


@torch.no_grad()
def _restore_original_heads(peft_model: TopoModel, originals: dict[str, dict]) -> None:
    """The warmed head lives on in peft's trainable copy (modules_to_save); the wrapped original gets its own
    weights back, so the base model (disable_adapter, unload) is the user's model, unchanged."""
    base = peft_model.get_base_model()
    for path, state in originals.items():
        wrapper = base.get_submodule(path)
        original = getattr(wrapper, "original_module", None)
        if original is None:
            raise RuntimeError(f"the warmed head {path} was not wrapped by modules_to_save")
        original.load_state_dict(state)


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
        width, layout, kernel = _probe_width(model, position, batches, loss_fn, config)
        neurons = config.neurons or config.max_neurons or 8
        adapter = TopoAdapter(width, neurons, layout, kernel, config.activation, **factory_kwargs(model))
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


def _probe_width(model, position: Position, batches, loss_fn, config: TopoAdapterConfig) -> tuple[int, str, int]:
    """Width, layout and conv kernel (config.kernel_size, or effective_kernel under shrink_kernel) of the hidden state
    at a position: one forward pass, or the model config without data."""
    if batches is None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(
                "cannot tell the hidden size at the positions without data: pass calibration_data (one batch is enough)"
            )
        return int(hidden), "tokens", config.kernel_size
    seen: list[torch.Tensor] = []
    with transform_stream(position, lambda h: seen.append(h) or h), torch.no_grad():
        batch_loss(model, batches[0], loss_fn)
    state, layout = seen[0], layout_of(seen[0])
    if layout != "channels":
        return state.shape[-1], layout, config.kernel_size
    kernel = effective_kernel(config.kernel_size, *state.shape[-2:]) if config.shrink_kernel else config.kernel_size
    return state.shape[1], layout, kernel


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
