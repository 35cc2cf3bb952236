"""Cross-fitted values of a position's leading directions (METHOD.md section 8).

The top eigenvalue of Q estimated from a few dozen examples is biased upward by noise: lambda_max is convex, so a
noisy operator's largest eigenvalue overstates what its eigenvector achieves. Split the calibration examples into
two parts A and B (Q = Q_A + Q_B), take each output row's top eigenvector from one part and measure it on the other:

    value_r = a_r^T Q_B^(r) a_r + b_r^T Q_A^(r) b_r,   a_r, b_r = top eigenvectors of Q_A^(r), Q_B^(r)

Given its direction, each term is an unbiased estimate of half the full-data value of a direction fitted on half the
data, so value_r estimates the second-order loss decrease that row's layer neuron gives on examples it was not
fitted to. Positions and neurons chosen by it stop rewarding noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .capture import PairAccumulator
from .operators import BlockOperator, DenseBlocks, TokenPairs, single_thread
from .solvers import Spectrum, lanczos


def top_vectors(
    operator: BlockOperator, iterations: int = 48, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The unit eigenvector of the largest eigenvalue of every block of `operator`, shape (num_outputs, q)."""
    rows = torch.arange(operator.num_outputs, device=getattr(operator, "device", None))
    q = operator.num_features
    if isinstance(operator, DenseBlocks) or q <= iterations:
        blocks = operator.blocks(rows)
        with single_thread(blocks):
            _, vectors = torch.linalg.eigh(blocks)
        return vectors[:, :, -1]
    start = torch.randn(operator.num_outputs, q, dtype=operator.dtype, generator=generator).to(operator.device)
    with single_thread(start):
        _, ritz, _ = lanczos(operator.apply, start, iterations, generator)
    return ritz[:, -1]


def cross_fitted_values(
    part_a: BlockOperator,
    part_b: BlockOperator,
    rows: torch.Tensor,
    iterations: int = 48,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """value_r for the given output rows (see the module docstring), shape (len(rows),)."""
    a, b = part_a.restrict(rows), part_b.restrict(rows)
    a_vectors, b_vectors = top_vectors(a, iterations, generator), top_vectors(b, iterations, generator)
    on_b = (a_vectors * b.apply(a_vectors)).sum(dim=1)
    on_a = (b_vectors * a.apply(b_vectors)).sum(dim=1)
    return on_b + on_a


class SplitAccumulator:
    """Two accumulators fed alternate calibration examples (the first dimension of every state), parts A and B.

    Examples, not tokens, are split: the tokens of one example are correlated, so a token split would leave the
    same noise on both sides. `operator` is the full Q = Q_A + Q_B; `parts` are Q_A and Q_B.
    """

    def __init__(self, make: Callable[[], PairAccumulator]):
        self.halves = (make(), make())
        self.examples = 0
        self.parts: tuple[BlockOperator, BlockOperator] | None = None

    def add(self, state: torch.Tensor, adjoint: torch.Tensor) -> None:
        first = self.examples % 2  # alternate across batches too: batches of one example still split
        for half, start in zip(self.halves, (first, 1 - first), strict=True):
            if state.shape[0] > start:
                half.add(state[start::2], adjoint[start::2])
        self.examples += state.shape[0]

    def combine_across_processes(self) -> None:
        for half in self.halves:
            half.combine_across_processes()

    def __getattr__(self, name):  # layout, width, mode: the same in both parts
        if name == "halves":
            raise AttributeError(name)
        return getattr(self.halves[0], name)

    @property
    def tokens_seen(self) -> int:
        return sum(half.tokens_seen for half in self.halves)

    @property
    def tokens_used(self) -> int:
        return sum(half.tokens_used for half in self.halves)

    def operator(self, num_batches: int) -> BlockOperator:
        if self.examples < 2 or any(half.tokens_seen == 0 for half in self.halves):
            raise ValueError(
                f"cross-fitting splits the calibration examples in two, and only {self.examples} were seen: pass at "
                "least 2 examples (better a few dozen), or crossfit=False"
            )
        a, b = (half.operator(num_batches) for half in self.halves)
        full, self.parts = _combined(a, b)
        return full


def _combined(a: BlockOperator, b: BlockOperator) -> tuple[BlockOperator, tuple[BlockOperator, BlockOperator]]:
    """Q_A + Q_B, and the parts again as views on its storage (the pairs are held once)."""
    if isinstance(a, DenseBlocks) and isinstance(b, DenseBlocks):
        return DenseBlocks(a._blocks + b._blocks), (a, b)
    if not (isinstance(a, TokenPairs) and isinstance(b, TokenPairs)):
        raise TypeError(f"cannot add a {type(a).__name__} and a {type(b).__name__}")
    z = torch.cat([a.z, b.z])
    p = torch.cat([a.p * a.scale, b.p * b.scale])  # each part's own scale (curvature x subsample weight) folded in
    n = a.z.shape[0]
    return TokenPairs(z, p, 1.0), (TokenPairs(z[:n], p[:n], 1.0), TokenPairs(z[n:], p[n:], 1.0))


@dataclass
class CrossFitted:
    """The cross-fitted values of the candidate rows of one position, best first."""

    rows: list[int]
    values: list[float]

    @property
    def top(self) -> float:
        return self.values[0] if self.values else float("-inf")


def cross_fit(
    parts: tuple[BlockOperator, BlockOperator],
    spectrum: Spectrum,
    iterations: int,
    generator: torch.Generator | None = None,
) -> CrossFitted:
    """Cross-fitted values of the rows that own the plain spectrum's leading eigenpairs (the candidates for neurons)."""
    rows = torch.unique(spectrum.rows).to(parts[0].device if hasattr(parts[0], "device") else "cpu")
    values = cross_fitted_values(*parts, rows, iterations, generator)
    order = torch.argsort(values, descending=True)
    return CrossFitted(rows[order].tolist(), values[order].tolist())


def crossfit_spectrum(spectrum: Spectrum, fitted: CrossFitted, eps_s: float, max_neurons: int | None) -> Spectrum:
    """The plain spectrum's top eigenpair of each row kept by the eps_s rule on the cross-fitted values (value >=
    (1 - eps_s) * the best and > 0, at most max_neurons rows), in cross-fitted order: the directions come from all the
    calibration data, the choice of neurons from what generalises across its halves."""
    best = fitted.top
    keep = [r for r, v in zip(fitted.rows, fitted.values, strict=True) if v > 0 and v >= (1.0 - eps_s) * best]
    keep = keep[:max_neurons] if max_neurons is not None else keep
    rows = spectrum.rows.tolist()
    first = [rows.index(r) for r in keep]  # the spectrum is descending: a row's first pair is its top one
    first = [i for i in first if float(spectrum.eigenvalues[i]) > 0]
    index = torch.tensor(first, dtype=torch.long, device=spectrum.eigenvalues.device)
    return Spectrum(
        spectrum.eigenvalues[index], spectrum.rows[index], spectrum.vectors[index], spectrum.solver, spectrum.residual
    )
