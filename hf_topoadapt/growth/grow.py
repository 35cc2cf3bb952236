"""Growing a network during training (METHOD.md section 7) and its baselines, as one machinery.

`Grower.maybe_grow(epoch, val_loss, calibration_data)` is called once per training round. It decides
(Proposed (I): a per-stage epoch schedule; Proposed (II): patience on the validation loss), checks
the stop rules, chooses a position and an initialisation, inserts the layer and appends its
parameters to the optimizer. `grow(...)` is a plain PyTorch loop around it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ScoringConfig, check_real, check_whole
from ..insertion import insert_layer
from ..layers import detach, factory_kwargs
from ..locate import config_positions, find_positions
from ..scoring import score_with_operators, scoring_mode
from ..sensitivity.objective import LossFn, batch_loss, materialize, mean_loss
from .baselines import initialised_layer, pick_position, probe_positions
from .distributed import average_gradients_across_ranks, unwrap
from .models import GrowableModel
from .state import extend_optimizer, list_index, load_checkpoint, place_layer, save_checkpoint, save_json

# method -> (where the layer goes, how it is initialised)
METHODS = {
    "topological": ("topological", "eigen"),  # the paper: argmax eigenvalue, eigenvectors, line-searched eps
    "random": ("random", "random"),  # random position, small random initialisation
    "net2deeper": ("random", "identity"),  # random position, function-preserving new layer
    "sensli": ("sensli", "identity"),  # first-order score (gradient norm of a zero tanh layer)
    "td_random": ("topological", "random"),  # TD position, random init: separates "where" from "how"
    "td_zero": ("topological", "identity"),  # TD position, function-preserving init
    "fixed": (None, None),  # never grows: train the final-size network from scratch
}
WHERE = ("topological", "random", "last", "sensli")
INIT = ("eigen", "random", "identity")


def _is_count(value) -> bool:
    """A whole number >= 1 (2.0 counts, 1.5, nan, True and "2" do not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return int(value) == value and value >= 1


@dataclass
class GrowthConfig:
    method: str = field(default="topological", metadata={"help": f"One of {sorted(METHODS)}."})
    where: str | None = field(default=None, metadata={"help": f"Override the method's position rule: {WHERE}."})
    init: str | None = field(default=None, metadata={"help": f"Override the method's initialisation: {INIT}."})
    schedule: list[int] | None = field(
        default=None,
        metadata={"help": "Proposed (I): epochs per stage E(0), E(1), ...; the last value repeats."},
    )
    patience: int | None = field(
        default=None,
        metadata={"help": "Proposed (II): grow after this many rounds without a validation improvement."},
    )
    min_delta: float = field(default=0.0, metadata={"help": "A validation loss must fall by more than this."})
    max_insertions: int | None = field(default=None, metadata={"help": "Stop after this many new layers."})
    max_depth: int | None = field(
        default=None,
        metadata={"help": "Stop at this depth: blocks of our models; inserted layers of any other model."},
    )
    max_params: int | None = field(default=None, metadata={"help": "Never exceed this many parameters."})
    stop_patience: int | None = field(
        default=None,
        metadata={"help": "Stop growing after this many stages in a row without a validation improvement."},
    )
    calibration_batches: int | None = field(
        default=4, metadata={"help": "Batches of the train data used to score and insert (None: all)."}
    )
    neurons: int | list[int] = field(
        default=8,
        metadata={
            "help": "Neurons of a layer not sized by the eps_s rule (the baselines' inits); a list gives them per "
            "insertion (the last value repeats), e.g. the sizes a topological run chose, to compare at equal size."
        },
    )
    init_scale: float = field(default=1e-2, metadata={"help": "Std of the 'random' initialisation."})
    train_up: bool = field(default=True, metadata={"help": "Train the output directions U of new layers."})
    param_group: int = field(default=0, metadata={"help": "Optimizer param group that receives new parameters."})
    seed: int = field(default=0, metadata={"help": "Seed of random positions and initialisations."})
    scoring: Any = field(default=None, metadata={"help": "ScoringConfig (or dict) for scoring and insertion."})
    log_path: str | None = field(default=None, metadata={"help": "Write the growth log here as JSON."})
    max_trainable: int | None = field(
        default=None,
        metadata={
            "help": "Growing a TopoModel: never let its trainable parameters exceed this; a layer that would is given "
            "fewer neurons when one or more still fit, else growth stops (a plain model: use max_params)."
        },
    )
    step_scale: float = field(
        default=1.0,
        metadata={
            "help": "Growing a TopoModel: the fraction of the line-searched step a grown layer takes, in place of its "
            "TopoAdapterConfig's (0.1, chosen for adapters inserted once before training). 1, the paper's step: a "
            "grown layer's step is taken on the trained model, and a tenth lost on validation there "
            "(benchmarks/results/transfer_training.md, round 5). A plain model: GrowthConfig.scoring's step_scale."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown growth method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.where is not None and self.where not in WHERE:
            raise ValueError(f"where must be one of {WHERE} or None, got {self.where!r}")
        if self.init is not None and self.init not in INIT:
            raise ValueError(f"init must be one of {INIT} or None, got {self.init!r}")
        if self.schedule is not None:
            if len(self.schedule) == 0:
                raise ValueError("schedule is empty: give the epochs per stage E(0), E(1), ... (each >= 1)")
            if not all(_is_count(e) for e in self.schedule):
                raise ValueError(f"schedule entries must be whole numbers of epochs >= 1, got {self.schedule}")
            self.schedule = [int(e) for e in self.schedule]
        for name in ("patience", "max_insertions", "stop_patience", "calibration_batches", "max_params"):
            setattr(self, name, check_whole(name, getattr(self, name), 1, optional=True))
        self.max_depth = check_whole("max_depth", self.max_depth, 0, optional=True)
        self.param_group = check_whole("param_group", self.param_group, 0)
        self.seed = check_whole("seed", self.seed, -(2**63))
        if self.method != "fixed":
            if self.schedule is None and self.patience is None:
                raise ValueError("give schedule=[E0, E1, ...] (Proposed I) or patience=N (Proposed II) to decide when")
            if self.schedule is not None and self.patience is not None:
                raise ValueError("give either schedule (Proposed I) or patience (Proposed II), not both")
        counts = self.neurons if isinstance(self.neurons, (list, tuple)) else [self.neurons]
        if not counts or not all(_is_count(n) for n in counts):
            raise ValueError(f"neurons must be a whole number >= 1 or a non-empty list of them, got {self.neurons!r}")
        if isinstance(self.neurons, (list, tuple)):
            self.neurons = [int(n) for n in self.neurons]
        self.init_scale = check_real(
            "init_scale", self.init_scale, 0.0, strict=True,
            why=" (the std of the 'random' initialisation: at 0 the new rows never get a gradient)",
        )  # fmt: skip
        self.min_delta = check_real("min_delta", self.min_delta, 0.0)
        self.scoring = ScoringConfig.from_any(self.scoring)
        self.max_trainable = check_whole("max_trainable", self.max_trainable, 1, optional=True)
        scale = check_real("step_scale", self.step_scale, 0.0, strict=True, why=" (1: the line search's step)")
        if scale > 1.0:
            raise ValueError(f"step_scale must be in (0, 1]: a fraction of the line-searched step, got {scale}")
        self.step_scale = scale

    def neurons_at(self, insertion: int) -> int:
        """Neurons of the layer inserted `insertion`-th (0-based) by a baseline initialisation."""
        if isinstance(self.neurons, list):
            return self.neurons[min(insertion, len(self.neurons) - 1)]
        return self.neurons

    @property
    def position_rule(self) -> str | None:
        return self.where or METHODS[self.method][0]

    @property
    def init_rule(self) -> str | None:
        return self.init or METHODS[self.method][1]

    @property
    def needs_validation(self) -> bool:
        return self.patience is not None or self.stop_patience is not None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_batches(data: Iterable, limit: int | None) -> list:
    return list(itertools.islice(data, limit)) if limit is not None else list(data)


class Grower:
    """Decides when to grow, inserts the layer and keeps the optimizer and the growth log up to date.

    Args:
        model: the model being trained (one of `growth.models`, or any model the engine can score).
        config: a `GrowthConfig` (or dict).
        loss_fn: the loss for tuple batches; None for dict batches with labels inside.
        optimizer: gets the new parameters appended to `config.param_group` (its state is kept).
    """

    def __init__(
        self,
        model: nn.Module,
        config: GrowthConfig | dict | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.model, self.loss_fn, self.optimizer = unwrap(model), loss_fn, optimizer
        self.config = config if isinstance(config, GrowthConfig) else GrowthConfig(**(config or {}))
        self.insertions: list[dict] = []  # the architecture: what `rebuild` needs
        self.log: list[dict] = []  # one entry per growth decision, accepted or not
        self.stage, self.stage_epochs, self.bad_rounds = 0, 0, 0
        self.best_val = math.inf
        self.best_before_stage, self.best_this_stage, self.stages_without_improvement = math.inf, math.inf, 0
        self.stopped = ""  # why growth stopped ("" while it may go on)
        self.growth_seconds = 0.0  # time spent scoring and inserting

    # -- state -------------------------------------------------------------------------------------------

    _STATE = (
        "insertions",
        "log",
        "stage",
        "stage_epochs",
        "bad_rounds",
        "best_val",
        "best_before_stage",
        "best_this_stage",
        "stages_without_improvement",
        "stopped",
        "growth_seconds",
    )

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name])

    # -- when --------------------------------------------------------------------------------------------

    def _stage_end(self, val_loss: float | None) -> None:
        """Bookkeeping of the "no validation improvement over a stage" stop rule."""
        if val_loss is None:
            return
        if self.best_this_stage < self.best_before_stage - self.config.min_delta:
            self.stages_without_improvement = 0
        else:
            self.stages_without_improvement += 1
        self.best_before_stage = min(self.best_before_stage, self.best_this_stage)
        self.best_this_stage = math.inf

    def should_grow(self, val_loss: float | None = None) -> bool:
        """Counts one finished training round (epoch) and says whether a growth decision is due now."""
        config = self.config
        if config.method == "fixed" or self.stopped:
            return False
        if val_loss is not None:
            self.best_this_stage = min(self.best_this_stage, val_loss)
        elif config.needs_validation:
            raise ValueError("this growth config uses validation losses (patience or stop_patience): pass val_loss")
        if config.schedule is not None:
            self.stage_epochs += 1
            due = self.stage_epochs >= config.schedule[min(self.stage, len(config.schedule) - 1)]
        else:
            if val_loss < self.best_val - config.min_delta:
                self.best_val, self.bad_rounds = val_loss, 0
            else:
                self.bad_rounds += 1
            due = self.bad_rounds >= config.patience
        if not due:
            return False
        self.stage, self.stage_epochs, self.bad_rounds = self.stage + 1, 0, 0
        self._stage_end(val_loss)
        return self._check_stop_rules()

    def _check_stop_rules(self) -> bool:
        config = self.config
        if config.stop_patience is not None and self.stages_without_improvement >= config.stop_patience:
            self.stopped = f"no validation improvement over {self.stages_without_improvement} stages"
        elif config.max_insertions is not None and len(self.insertions) >= config.max_insertions:
            self.stopped = f"reached max_insertions={config.max_insertions}"
        elif config.max_depth is not None and self._depth() >= config.max_depth:
            self.stopped = f"reached max_depth={config.max_depth}"
        elif config.max_params is not None and count_parameters(self.model) >= config.max_params:
            self.stopped = f"reached max_params={config.max_params}"
        return not self.stopped

    def maybe_grow(
        self,
        epoch: float,
        val_loss: float | None = None,
        calibration_data: Iterable | None = None,
        step: int | None = None,
    ) -> dict | None:
        """Call after every training round; grows when due and returns the log entry (None otherwise)."""
        if not self.should_grow(val_loss):
            return None
        if calibration_data is None:
            raise ValueError("growth is due: pass calibration_data (batches of the training data)")
        return self.grow_now(calibration_data, epoch=epoch, step=step, val_loss=val_loss)

    # -- where and how -----------------------------------------------------------------------------------

    def scoring_config(self) -> ScoringConfig:
        """The user's scoring settings; our models are scored on their `blocks` list (which holds mixed
        block types once grown), and a model with no blocks yet on the output of its stem."""
        scoring = self.config.scoring
        if isinstance(self.model, GrowableModel) and scoring.block_path is None and scoring.positions is None:
            if self.model.depth == 0:
                return dataclasses.replace(scoring, positions=["stem"])
            return dataclasses.replace(scoring, block_path=self.model.block_path)
        return scoring

    def _spec(self, position: str, adapter: nn.Module, scoring: ScoringConfig) -> dict:
        index = list_index(self.model, position)
        return {
            "mode": "hook" if index is None else "list",
            "position": position,
            "block_path": self.model.block_path if index is not None else scoring.block_path,
            "index": index,
            "width": adapter.width,
            "neurons": adapter.num_neurons,
            "layout": adapter.layout,
            "kernel_size": adapter.kernel_size,
            "activation": scoring.activation if isinstance(scoring.activation, str) else "silu_tanh",
            "train_up": self.config.train_up,
        }

    def grow_now(
        self,
        calibration_data: Iterable,
        epoch: float | None = None,
        step: int | None = None,
        val_loss: float | None = None,
    ) -> dict:
        """Scores, inserts one layer (if the rules allow) and returns the log entry."""
        start = time.perf_counter()
        config, model = self.config, self.model
        scoring = self.scoring_config()
        batches = first_batches(materialize(calibration_data), config.calibration_batches)
        where, init = config.position_rule, config.init_rule
        rng = random.Random(config.seed + 1009 * len(self.log))  # reproducible across a resume
        generator = torch.Generator().manual_seed(config.seed + 1009 * len(self.log))
        positions = config_positions(model, scoring)
        entry = {
            "epoch": epoch,
            "step": step,
            "val_loss": val_loss,
            "method": config.method,
            "where": where,
            "init": init,
            "accepted": False,
            "reason": "",
        }

        record = None
        if where == "topological" and init == "eigen":  # the paper: one scoring pass picks and initialises
            record = insert_layer(model, batches, scoring, self.loss_fn)
            entry["scores"] = {s.name: s.eigenvalue for s in record.scores}
            entry["score_kind"] = "eigenvalue"
            chosen = [p.name for p in positions].index(record.position)
        elif where == "topological":
            scores, _ = score_with_operators(model, batches, scoring, self.loss_fn)
            entry["scores"] = {s.name: s.eigenvalue for s in scores}
            entry["score_kind"] = "eigenvalue"
            chosen = max(range(len(scores)), key=lambda i: scores[i].eigenvalue)
            width, layout = scores[chosen].width, scores[chosen].layout
        else:
            probes = probe_positions(model, batches, positions, self.loss_fn, scoring.kernel_size)
            entry["scores"] = {p.name: probe.score for p, probe in zip(positions, probes, strict=True)}
            entry["score_kind"] = "gradient_norm"  # SensLI's first-order score, logged for every rule
            chosen = pick_position(where, positions, probes, rng)
            width, layout = probes[chosen].width, probes[chosen].layout
        position = positions[chosen].name
        entry["position"] = position

        if init == "eigen":
            if record is None:
                record = insert_layer(model, batches, scoring, self.loss_fn, position=position)
            entry.update(
                eigenvalue=record.eigenvalue,
                eps=record.eps,
                loss_before=record.loss_before,
                loss_after=record.loss_after,
                predicted_decrease=record.predicted_decrease,
                neurons=record.num_neurons,
            )
            if not record.accepted:
                entry["reason"] = record.reason
                if where == "topological":  # the paper's stop rule: no layer lowers the loss here
                    self.stopped = record.reason
                return self._finish(entry, start)
            adapter = record.adapter
            adapter.up.requires_grad_(config.train_up)
            (tap,) = find_positions(model, scoring.block_path, [position])
            detach(tap)  # insert_layer attached it by a hook; `place_layer` decides where it lives
        else:
            if where == "topological" and entry["scores"][position] <= max(scoring.threshold, 0.0):
                self.stopped = entry["reason"] = (
                    f"largest eigenvalue {entry['scores'][position]:.4g} <= threshold {scoring.threshold:.4g}"
                )
                return self._finish(entry, start)
            neurons = config.neurons_at(len(self.insertions))
            neurons = min(neurons, width) if init == "random" else neurons
            adapter = initialised_layer(
                init,
                width,
                neurons,
                layout,
                scoring.kernel_size,
                scoring.activation,
                config.init_scale,
                generator,
                **factory_kwargs(model),
            )
            with scoring_mode(model, scoring.eval_mode):
                entry["loss_before"] = mean_loss(model, batches, self.loss_fn)
            entry.update(eps=0.0, neurons=adapter.num_neurons)

        spec = self._spec(position, adapter, scoring)
        place_layer(model, adapter, spec)
        if config.max_params is not None and count_parameters(model) > config.max_params:
            self._remove(spec)
            self.stopped = entry["reason"] = f"the new layer would exceed max_params={config.max_params}"
            return self._finish(entry, start)
        if init != "eigen":
            with scoring_mode(model, scoring.eval_mode):
                entry["loss_after"] = mean_loss(model, batches, self.loss_fn)
        if self.optimizer is not None:
            extend_optimizer(self.optimizer, adapter.parameters(), config.param_group)
        average_gradients_across_ranks(adapter.parameters())
        self.insertions.append(spec)
        entry.update(accepted=True, block_index=spec["index"], depth=self._depth(), params=count_parameters(model))
        return self._finish(entry, start)

    def _depth(self) -> int:
        return self.model.depth if isinstance(self.model, GrowableModel) else len(self.insertions)

    def _remove(self, spec: dict) -> None:
        if spec["mode"] == "list":
            del self.model.get_submodule(spec["block_path"])[spec["index"]]
        else:
            (tap,) = find_positions(self.model, spec["block_path"], [spec["position"]])
            detach(tap)

    def _finish(self, entry: dict, start: float) -> dict:
        entry["seconds"] = time.perf_counter() - start
        self.growth_seconds += entry["seconds"]
        self.log.append(entry)
        if self.config.log_path:
            save_json(self.config.log_path, self.log)
        return entry


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, loss_fn: LossFn | None) -> float:
    """Mean batch loss in eval mode (the model's mode is restored)."""
    with scoring_mode(model, True):
        return mean_loss(model, materialize(data), loss_fn)


def grow(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    growth_config: GrowthConfig | dict | None = None,
    epochs: int = 10,
    calibration_data: Iterable | None = None,
    scheduler_interval: str = "epoch",
    checkpoint_path: str | None = None,
    resume: bool = False,
    epoch_callback: Callable[[int, nn.Module], dict | None] | None = None,
) -> tuple[Grower, list[dict]]:
    """A plain training loop that grows the model: train a round, evaluate, maybe grow, checkpoint.

    Returns the `Grower` (its `log` and `insertions`) and a history with one dict per epoch
    (train_loss, val_loss, depth, params, seconds), plus whatever `epoch_callback(epoch, model)` returns
    (e.g. a test metric), called after each epoch's growth decision.
    """
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    from .topo_model import make_grower  # imports this module

    # Grows the module inside a DDP wrapper; a TopoModel's layers join its peft adapter.
    grower = make_grower(model, growth_config, loss_fn, optimizer)
    history: list[dict] = []
    start_epoch, step = 0, 0
    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path")
        extra = load_checkpoint(checkpoint_path, grower.model, optimizer, scheduler, grower)
        start_epoch, step, history = extra["epoch"], extra["step"], extra["history"]
    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        model.train()
        losses = []
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, batch, loss_fn, step)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        val_loss = evaluate(model, val_loader, loss_fn) if val_loader is not None else None
        calibration = calibration_data
        if calibration is None and grower.config.method != "fixed":
            calibration = first_batches(train_loader, grower.config.calibration_batches)
        entry = grower.maybe_grow(epoch + 1, val_loss, calibration, step=step)
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": sum(losses) / max(len(losses), 1),
                "val_loss": val_loss,
                "depth": grower._depth(),
                "params": count_parameters(model),
                "grew": bool(entry and entry["accepted"]),
                "seconds": time.perf_counter() - began,
            }
        )
        if epoch_callback is not None:
            history[-1].update(epoch_callback(epoch + 1, model) or {})
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                grower.model,
                optimizer,
                scheduler,
                grower,
                extra={"epoch": epoch + 1, "step": step, "history": history},
            )
    return grower, history
