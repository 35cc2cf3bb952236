"""The step size of a new layer: scan a growing grid of eps on both signs and keep the lowest loss
(never "one step past the best"); accept only a real decrease (METHOD.md section 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LineSearchResult:
    eps: float  # signed; 0.0 when nothing lowered the loss
    loss: float
    base_loss: float
    accepted: bool
    trials: list[tuple[float, float]] = field(default_factory=list)  # (eps, loss) in the order tried

    @property
    def decrease(self) -> float:
        return self.base_loss - self.loss


def line_search(
    loss_at: Callable[[float], float],
    base_loss: float,
    start: float,
    growth: float = 2.0,
    steps: int = 12,
    patience: int = 2,
) -> LineSearchResult:
    """Minimises loss_at(eps) over eps = +-start * growth^k, k < steps.

    A sign stops after `patience` consecutive steps above its best loss (the loss has turned up).
    """
    if start <= 0 or growth <= 1 or steps < 1:
        raise ValueError(f"line search needs start > 0, growth > 1, steps >= 1; got {start}, {growth}, {steps}")
    best_eps, best_loss = 0.0, base_loss
    trials: list[tuple[float, float]] = []
    for sign in (1.0, -1.0):
        sign_best, worse = float("inf"), 0
        for k in range(steps):
            eps = sign * start * growth**k
            loss = loss_at(eps)
            trials.append((eps, loss))
            if loss < best_loss:
                best_eps, best_loss = eps, loss
            if loss < sign_best:
                sign_best, worse = loss, 0
            else:
                worse += 1
                if worse >= patience:
                    break
    accepted = best_loss < base_loss
    return LineSearchResult(
        best_eps if accepted else 0.0, best_loss if accepted else base_loss, base_loss, accepted, trials
    )
