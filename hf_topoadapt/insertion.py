"""Insert one layer where the topological derivative is largest, along its eigenvectors, with a
line-searched step that lowers the calibration loss (METHOD.md section 4)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .config import ScoringConfig
from .layers import TopoAdapter, attach, attached, factory_kwargs
from .scoring import PositionScore, score_with_operators, scoring_mode
from .sensitivity.directions import Directions, coordinate_directions, optimized_directions
from .sensitivity.line_search import line_search
from .sensitivity.objective import LossFn, materialize, mean_loss


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
    scores: list[PositionScore] = field(default_factory=list, repr=False)
    adapter: TopoAdapter | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        skip = {"scores", "adapter"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        out["scores"] = [s.as_dict() for s in self.scores]
        return out


def plan_directions(score: PositionScore, config: ScoringConfig) -> Directions:
    """The eps_s-rule initialisation at a scored position, optionally with optimised output directions."""
    coordinate = coordinate_directions(score.spectrum, score.operator.num_outputs, *config.neuron_rule())
    if config.directions == "coordinate":
        return coordinate
    return optimized_directions(score.operator, score.spectrum, coordinate.num_neurons, config.optimize_iterations)


def insert_layer(
    model: nn.Module,
    data: Iterable,
    config: ScoringConfig | None = None,
    loss_fn: LossFn | None = None,
    position: str | None = None,
) -> InsertionRecord:
    """Scores every position, builds the layer at the best one (or at `position`), line-searches its
    step and inserts it only if the calibration loss went down. The model is changed only then.
    """
    config = ScoringConfig.from_any(config)
    batches = materialize(data)
    scores, positions = score_with_operators(model, batches, config, loss_fn)
    if position is None:
        chosen = max(range(len(scores)), key=lambda i: scores[i].eigenvalue)
    else:
        names = [s.name for s in scores]
        if position not in names:
            raise ValueError(f"position {position!r} is not a candidate; the candidates are {names}")
        chosen = names.index(position)
    score, tap = scores[chosen], positions[chosen]
    record = InsertionRecord(
        score.name, score.index, score.eigenvalue, False, scores=scores, directions=config.directions
    )
    if score.eigenvalue <= max(config.threshold, 0.0):
        record.reason = (
            f"largest eigenvalue {score.eigenvalue:.4g} <= threshold {max(config.threshold, 0.0):.4g}: no layer "
            "lowers the loss to second order here"
        )
        return record
    directions = plan_directions(score, config)
    adapter = TopoAdapter(
        score.width,
        directions.num_neurons,
        score.layout,
        config.kernel_size,
        config.activation,
        **factory_kwargs(model),
    )
    record.num_neurons, record.gain = directions.num_neurons, directions.value
    if directions.kind == "coordinate":
        record.rows = directions.rows

    with scoring_mode(model, config.eval_mode):
        base_loss = mean_loss(model, batches, loss_fn)

        def loss_at(eps: float) -> float:
            adapter.set_directions(directions, eps)
            with attached(tap, adapter):
                return mean_loss(model, batches, loss_fn, nonfinite_ok=True)

        # First step: the one whose predicted decrease is line_search_start of the loss.
        start = (2.0 * config.line_search_start * max(abs(base_loss), 1e-12) / directions.value) ** 0.5
        result = line_search(loss_at, base_loss, start, config.line_search_growth, config.line_search_steps)
    record.loss_before, record.line_search = base_loss, result.trials
    if not result.accepted:
        record.reason = "no step of the line search lowered the calibration loss"
        return record
    adapter.set_directions(directions, result.eps)
    attach(tap, adapter)
    record.accepted, record.eps, record.loss_after = True, result.eps, result.loss
    record.predicted_decrease = 0.5 * result.eps**2 * directions.value
    record.measured_decrease = base_loss - result.loss
    record.adapter = adapter
    return record
