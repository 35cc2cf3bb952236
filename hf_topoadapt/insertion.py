"""Insert one layer where the topological derivative is largest, along its eigenvectors, with a
line-searched step that lowers the calibration loss (METHOD.md section 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .config import ScoringConfig
from .layers import TopoAdapter, attach, attached, factory_kwargs
from .locate import PositionsNotFoundError, find_block_list
from .scoring import PositionScore, ScoringRound, score_round, scoring_mode
from .sensitivity.directions import Directions, coordinate_directions, optimized_directions
from .sensitivity.line_search import LineSearchResult, fixed_step, line_search
from .sensitivity.objective import LossFn, materialize, mean_loss
from .sensitivity.replay import PrefixReplay


@dataclass
class InsertionRecord:
    position: str
    index: int
    eigenvalue: float
    accepted: bool
    reason: str = ""
    directions: str = "coordinate"
    num_neurons: int = 0
    rows: list[int] = field(default_factory=list)  # output neurons (coordinate directions only)
    gain: float = 0.0  # phi^T Q phi of the initialisation
    eps: float = 0.0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    predicted_decrease: float = 0.0  # (eps^2 / 2) * gain
    measured_decrease: float = 0.0
    line_search: list[tuple[float, float]] = field(default_factory=list)
    crossfit_gain: float | None = None  # the chosen position's cross-fitted value (ScoringConfig.crossfit)
    line_search_step: int | None = None  # grid index k of the chosen step (eps = start * growth^k)
    replayed: bool = False  # whether the line search's later trials skipped the blocks before the layer
    # Wall time per phase (capture, eigen_solves, directions, line_search): a figure of this machine, so it is not
    # saved with the report (TopoReport.seconds).
    seconds: dict[str, float] = field(default_factory=dict, repr=False)
    scores: list[PositionScore] = field(default_factory=list, repr=False)
    adapter: TopoAdapter | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        skip = {"scores", "adapter", "seconds"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        out["scores"] = [s.as_dict() for s in self.scores]
        return out


def plan_directions(score: PositionScore, config: ScoringConfig) -> Directions:
    """The eps_s-rule initialisation at a scored position (neurons chosen by cross-fitted value when the score has
    one), optionally with optimised output directions."""
    rule = config.neuron_rule() if score.crossfit is None else (1.0, None)  # cross-fitting already chose the rows
    coordinate = coordinate_directions(score.neuron_spectrum(config), score.operator.num_outputs, *rule)
    if config.directions == "coordinate":
        return coordinate
    return optimized_directions(
        score.operator, score.spectrum, coordinate.num_neurons, config.optimize_iterations,
        tol=config.optimize_tol, solver=config.optimize_solver,
    )  # fmt: skip


def insert_layer(
    model: nn.Module,
    data: Iterable,
    config: ScoringConfig | None = None,
    loss_fn: LossFn | None = None,
    position: str | None = None,
    *,
    first_step: int | None = None,
    scored: ScoringRound | None = None,
) -> InsertionRecord:
    """Scores every position, builds the layer at the best one (or at `position`), line-searches its
    step and inserts it only if the calibration loss went down. The model is changed only then.

    The loss before insertion comes from the scoring pass itself, and the line search's trial passes skip the
    blocks before the layer (their outputs are replayed), so an insertion costs one scoring pass and a few
    partial forward passes.

    Args:
        first_step: grid index k (eps = start * growth^k) the line search starts at; None: `FIRST_STEP`.
            `get_topo_model` passes the previous insertion's best step.
        scored: a scoring round of this model on these batches with this config, already made (it is not
            repeated).
    """
    config = ScoringConfig.from_any(config)
    batches = materialize(data)
    scored = scored if scored is not None else score_round(model, batches, config, loss_fn)
    scores, positions = scored.scores, scored.positions
    if position is None:
        chosen = max(range(len(scores)), key=lambda i: scores[i].ranking_value)
    else:
        names = [s.name for s in scores]
        if position not in names:
            raise ValueError(f"position {position!r} is not a candidate; the candidates are {names}")
        chosen = names.index(position)
    score, tap = scores[chosen], positions[chosen]
    record = InsertionRecord(
        score.name, score.index, score.eigenvalue, False, scores=scores, directions=config.directions
    )
    record.seconds = {**scored.seconds, "directions": 0.0, "line_search": 0.0}
    record.crossfit_gain = score.crossfit_eigenvalue
    if score.ranking_value <= max(config.threshold, 0.0):
        what = "largest eigenvalue" if score.crossfit is None else "best cross-fitted value"
        record.reason = (
            f"{what} {score.ranking_value:.4g} <= threshold {max(config.threshold, 0.0):.4g}: no layer "
            "lowers the loss to second order here"
        )
        return record
    started = time.perf_counter()
    plans = [plan_directions(score, config)]
    if plans[0].kind != "coordinate":  # optimised directions can miss where the paper's layer still lowers the loss
        plans.append(plan_directions(score, dataclasses.replace(config, directions="coordinate")))
    record.seconds["directions"] = time.perf_counter() - started
    started = time.perf_counter()
    base_loss = scored.loss
    for directions in plans:
        adapter = TopoAdapter(
            score.width,
            directions.num_neurons,
            score.layout,
            score.kernel_size,
            config.activation,
            **factory_kwargs(model),
        )
        record.directions, record.num_neurons, record.gain = directions.kind, directions.num_neurons, directions.value
        record.rows = directions.rows if directions.kind == "coordinate" else []
        with scoring_mode(model, config.eval_mode):
            prefix = prefix_modules(model, tap, config)
            trials = TrialLosses(model, batches, loss_fn, tap, adapter, directions, prefix)
            if config.step_decrease is not None:
                result = fixed_step(trials, base_loss, predicted_step(config.step_decrease, base_loss, directions))
            else:
                # Step k = 0: the one whose predicted decrease is line_search_start of the loss.
                start = predicted_step(config.line_search_start, base_loss, directions)
                first = FIRST_STEP if first_step is None else first_step
                result = line_search(
                    trials, base_loss, start, config.line_search_growth, config.line_search_steps, patience=1,
                    first=first,
                )  # fmt: skip
                if result.accepted and config.step_scale != 1.0:
                    result = _scaled_step(result, trials, config.step_scale)
        record.loss_before, record.line_search = base_loss, result.trials
        record.line_search_step = result.step
        record.replayed = trials.replayed
        if result.accepted:
            break
    record.seconds["line_search"] = time.perf_counter() - started
    if not result.accepted:
        tried = " or ".join(f"{plan.kind} directions" for plan in plans)
        record.reason = f"no step of the line search lowered the calibration loss (with {tried})"
        if config.step_scale != 1.0:
            record.reason += f" once scaled by step_scale={config.step_scale:g}"
        return record
    adapter.set_directions(directions, result.eps)
    attach(tap, adapter)
    record.accepted, record.eps, record.loss_after = True, result.eps, result.loss
    record.predicted_decrease = 0.5 * result.eps**2 * directions.value
    record.measured_decrease = base_loss - result.loss
    record.adapter = adapter
    return record


def predicted_step(fraction: float, loss: float, directions: Directions) -> float:
    """The eps whose second-order predicted decrease, (eps^2 / 2) * value, is `fraction` of the loss."""
    return (2.0 * fraction * max(abs(loss), 1e-12) / directions.value) ** 0.5


def _scaled_step(result: LineSearchResult, trials: TrialLosses, scale: float) -> LineSearchResult:
    """The line search's result moved to `scale` times its step, with the calibration loss measured there (one more
    pass); rejected when that loss is above the base loss. An equal loss is accepted: the full step already lowered
    it, and a tenth of a step lowers it by about a hundredth as much, which a bf16 loss can round away."""
    eps = scale * result.eps
    loss = trials(eps)
    accepted = loss <= result.base_loss
    return dataclasses.replace(
        result,
        eps=eps if accepted else 0.0,
        loss=loss if accepted else result.base_loss,
        accepted=accepted,
        trials=[*result.trials, (eps, loss)],
    )


# Where the line search starts: eps predicting a decrease of 16 * line_search_start of the loss (1.6% by
# default), near where the step sizes of insertions into transformers were seen to end up (k = 1 to 3).
FIRST_STEP = 2


def prefix_modules(model: nn.Module, tap, config: ScoringConfig) -> list[nn.Module]:
    """The blocks a forward pass runs before reaching the tap (empty when the tap is not after a block or past the
    last one): what a line search at this tap need not recompute."""
    after_blocks = ("head", "head_input")  # inside the head, or the classifier's input: after every block
    if tap.where != "output" or getattr(tap, "kind", "block") not in ("block", *after_blocks):
        return []
    try:
        _, blocks = find_block_list(model, config.block_path)
    except PositionsNotFoundError:
        return []
    if tap.kind in after_blocks:
        return blocks
    index = next((i for i, block in enumerate(blocks) if block is tap.module), None)
    return [] if index is None else blocks[: index + 1]


class TrialLosses:
    """J with the adapter at the tap for a given eps: `loss_at(eps)` of the line search.

    The first trial runs the whole model and records what the blocks before the tap return; later trials replay
    that and run only the rest of the model. The replayed pass is first checked against the full one (same eps,
    same loss); a model where replaying changes the loss, or raises, gets full passes.
    """

    def __init__(self, model, batches, loss_fn, tap, adapter, directions, prefix: list[nn.Module]):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.tap, self.adapter, self.directions = tap, adapter, directions
        self.replay = PrefixReplay(prefix) if prefix else None
        self.recorded = False
        self.replayed = False  # whether later trials ran only the rest of the model

    def _loss(self, eps: float, replay_mode: str | None) -> float:
        self.adapter.set_directions(self.directions, eps)
        with contextlib.ExitStack() as stack:
            stack.enter_context(attached(self.tap, self.adapter))
            before_batch = None
            if replay_mode is not None:
                stack.enter_context(self.replay.recording() if replay_mode == "record" else self.replay.replaying())
                before_batch = self.replay.start_batch
            return mean_loss(self.model, self.batches, self.loss_fn, nonfinite_ok=True, before_batch=before_batch)

    def __call__(self, eps: float) -> float:
        if self.replay is not None and not self.recorded:
            # First trial: a full pass, recorded, then the replayed pass checked against it.
            loss, self.recorded = self._loss(eps, "record"), True
            complete = len(self.replay.records) == len(self.batches)  # a non-finite loss stops at its batch
            if math.isfinite(loss) and complete:
                try:
                    again = self._loss(eps, "replay")
                except Exception:  # noqa: BLE001 - a model that cannot be replayed is run in full
                    again = math.nan
                self.replayed = abs(again - loss) <= 1e-6 * max(1.0, abs(loss))
            if not self.replayed:
                self.replay = None
            return loss
        return self._loss(eps, "replay" if self.replay is not None else None)
