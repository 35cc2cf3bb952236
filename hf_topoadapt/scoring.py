"""score_positions: the topological derivative of the loss at every candidate position of a model.

Plumbing only: locate the positions, capture states and adjoints in one pass per batch, hand each
position's operator to the solvers. The model comes back exactly as it was.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import resolve_activation
from .config import ScoringConfig
from .locate import find_positions
from .sensitivity.capture import PairAccumulator, capture
from .sensitivity.directions import coordinate_directions
from .sensitivity.distributed import fail_together, rank, sum_across
from .sensitivity.objective import LossFn, materialize
from .sensitivity.operators import BlockOperator, DenseBlocks
from .sensitivity.solvers import Spectrum, exact_spectrum, lanczos_spectrum


@dataclass
class PositionScore:
    """The topological derivative at one position.

    `eigenvalue` is Lambda_l = lambda_max(Q_l) for J = the mean of the batch losses: inserting the layer
    along its eigenvector with step eps lowers J by (eps^2 / 2) * Lambda_l to second order.
    """

    name: str
    index: int
    eigenvalue: float
    kind: str = "block"
    layout: str = "tokens"
    width: int = 0  # hidden size d (channels C for a feature map)
    num_features: int = 0  # q, the length of z = [h (or patch); 1]
    top_eigenvalues: list[float] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)  # output neurons the eps_s rule keeps (empty if <= 0)
    gain: float = 0.0  # phi^T Q phi of the eps_s initialisation (sum of the kept eigenvalues)
    tokens: int = 0  # tokens seen over the calibration data
    tokens_used: int = 0  # tokens the solver used (a subsample under the token cap)
    solver: str = "exact"
    residual: float = 0.0
    spectrum: Spectrum | None = field(default=None, repr=False, compare=False)
    operator: BlockOperator | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        keys = (
            "name",
            "index",
            "eigenvalue",
            "kind",
            "layout",
            "width",
            "num_features",
            "top_eigenvalues",
            "neurons",
            "gain",
            "tokens",
            "tokens_used",
            "solver",
            "residual",
        )
        return {key: getattr(self, key) for key in keys}


def compute_dtype(model: nn.Module, config: ScoringConfig) -> torch.dtype:
    if config.compute_dtype is not None:
        return config.compute_dtype
    for parameter in model.parameters():
        return torch.float64 if parameter.dtype == torch.float64 else torch.float32
    return torch.float32


@contextlib.contextmanager
def scoring_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (no dropout) while scoring; every module's own training flag comes back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def position_generator(seed: int, name: str, process: int = 0) -> torch.Generator:
    """A generator of its own for each position (and process, for the token subsample), so a position's score
    and initial directions do not depend on which other positions compete (e.g. in greedy top-k insertion)."""
    return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()) + 7919 * process)


def solve(operator: BlockOperator, config: ScoringConfig, generator: torch.Generator) -> Spectrum:
    keep = max(config.max_neurons or 64, 16)
    if isinstance(operator, DenseBlocks):
        # Every pair the neuron rule may take: lambda >= (1 - eps_s) lambda_1, or any positive one for a fixed m.
        floor = 1.0 - config.eps_s if config.neurons is None else 0.0
        return exact_spectrum(operator, keep, floor)
    return lanczos_spectrum(
        operator,
        keep,
        config.lanczos_screen_iterations,
        config.lanczos_refine_iterations,
        max(config.lanczos_refine_rows, config.max_neurons or 0),
        generator=generator,
    )


def score_with_operators(
    model: nn.Module, data: Iterable, config: ScoringConfig | None = None, loss_fn: LossFn | None = None
) -> tuple[list[PositionScore], list]:
    """score_positions that also keeps each position's operator and spectrum (for insertion)."""
    config = ScoringConfig.from_any(config)
    _, curvature = resolve_activation(config.activation)
    positions = find_positions(model, config.block_path, config.positions, config.include_head, config.head_path)
    dtype = compute_dtype(model, config)
    # Token-subsample keys differ per process (position_generator's third argument); the solver's start
    # vectors below must be the same on every process.
    mode = {"exact": "blocks", "lanczos": "pairs", "auto": "auto"}[config.solver]
    accumulators = [
        PairAccumulator(
            mode,
            curvature,
            config.max_tokens,
            config.kernel_size,
            dtype,
            position_generator(config.seed, position.name, rank()),
            config.exact_max_features,
            config.exact_max_entries,
        )
        for position in positions
    ]
    with fail_together():
        batches = materialize(data)
        with scoring_mode(model, config.eval_mode):
            capture(model, batches, positions, loss_fn, accumulators, config.progress)
    num_batches = sum_across(len(batches))
    for accumulator in accumulators:
        accumulator.combine_across_processes()
    scores = []
    for position, accumulator in tqdm(
        list(zip(positions, accumulators, strict=True)), desc="solving eigenproblems", disable=not config.progress
    ):
        operator = accumulator.operator(num_batches)
        spectrum = solve(operator, config, position_generator(config.seed, position.name))
        neurons, gain = [], 0.0
        if spectrum.top > config.threshold and spectrum.top > 0:
            directions = coordinate_directions(spectrum, operator.num_outputs, *config.neuron_rule())
            neurons = directions.rows
            gain = directions.value
        scores.append(
            PositionScore(
                name=position.name,
                index=position.index,
                eigenvalue=spectrum.top,
                kind=position.kind,
                layout=accumulator.layout,
                width=accumulator.width,
                num_features=operator.num_features,
                top_eigenvalues=spectrum.eigenvalues[:8].tolist(),
                neurons=neurons,
                gain=gain,
                tokens=accumulator.tokens_seen,
                tokens_used=accumulator.tokens_used,
                solver=spectrum.solver,
                residual=spectrum.residual,
                spectrum=spectrum,
                operator=operator,
            )
        )
    return scores, positions


def score_positions(
    model: nn.Module, data: Iterable, config: ScoringConfig | None = None, loss_fn: LossFn | None = None
) -> list[PositionScore]:
    """Scores every candidate position of the model; the model is left unchanged.

    Args:
        model: any supported model (see `locate`), in any dtype; its parameters need no gradients.
        data: an iterable of batches: dicts called as model(**batch) with the loss in outputs.loss, or
            tuples (inputs, targets) called as model(inputs) with loss_fn(outputs, targets).
        config: a `ScoringConfig` (or any object with the same attribute names); None uses the defaults.
        loss_fn: the loss for tuple batches (or loss_fn(outputs, batch) for dict batches).

    Returns:
        One `PositionScore` per position, in depth order.
    """
    scores, _ = score_with_operators(model, data, config, loss_fn)
    for score in scores:
        score.operator = None  # the captured pairs can be large; insertion keeps them, plain scoring does not
    return scores
