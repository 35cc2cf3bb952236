"""The step size of a new layer: search a growing grid of eps on both signs and keep the lowest loss
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
    step: int | None = None  # grid index k of the kept eps (|eps| = start * growth^k); None when rejected

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
    first: int = 0,
) -> LineSearchResult:
    """Minimises loss_at(eps) over eps = +-start * growth^k, 0 <= k < steps.

    Each sign starts at k = `first` and walks up the grid while the loss falls; when the step above `first` is
    not lower, it walks down from `first` instead. A walk stops after `patience` consecutive steps that are not
    below the sign's best (the loss has turned up), so along a loss that falls and then rises the kept step is
    a local minimum on the grid, found with a few evaluations when `first` is near it.
    """
    if start <= 0 or growth <= 1 or steps < 1:
        raise ValueError(f"line search needs start > 0, growth > 1, steps >= 1; got {start}, {growth}, {steps}")
    first = min(max(first, 0), steps - 1)
    best_eps, best_loss, best_step = 0.0, base_loss, None
    trials: list[tuple[float, float]] = []
    for sign in (1.0, -1.0):
        losses: dict[int, float] = {}

        def evaluate(k: int, sign=sign, losses=losses) -> float:
            eps = sign * start * growth**k
            losses[k] = loss_at(eps)
            trials.append((eps, losses[k]))
            return losses[k]

        sign_best = evaluate(first)
        for direction in (1, -1):
            if direction == -1 and min(losses, key=losses.get) != first:
                break  # the walk up found lower steps: no need to look below `first`
            worse, k = 0, first + direction
            while 0 <= k < steps:
                loss = evaluate(k)
                if loss < sign_best:
                    sign_best, worse = loss, 0
                else:
                    worse += 1
                    if worse >= patience:
                        break
                k += direction
        k_best = min(losses, key=losses.get)
        if losses[k_best] < best_loss:
            best_eps, best_loss, best_step = sign * start * growth**k_best, losses[k_best], k_best
    accepted = best_loss < base_loss
    return LineSearchResult(
        best_eps if accepted else 0.0,
        best_loss if accepted else base_loss,
        base_loss,
        accepted,
        trials,
        best_step if accepted else None,
    )


def fixed_step(loss_at: Callable[[float], float], base_loss: float, eps: float) -> LineSearchResult:
    """One step of size `eps` in both signs instead of a search: the sign with the lower loss (the third-order
    terms differ), kept when its loss is not above the base loss (a small decrease can round away in bf16)."""
    if not eps > 0:
        raise ValueError(f"the step must be > 0, got {eps}")
    trials = [(eps, loss_at(eps)), (-eps, loss_at(-eps))]
    best_eps, best_loss = min(trials, key=lambda trial: trial[1])
    accepted = best_loss <= base_loss
    return LineSearchResult(
        best_eps if accepted else 0.0, best_loss if accepted else base_loss, base_loss, accepted, trials,
        0 if accepted else None,
    )  # fmt: skip
