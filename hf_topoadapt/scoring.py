"""score_positions: the topological derivative of the loss at every candidate position of a model.

Plumbing only: locate the positions, capture states and adjoints in one pass per batch, hand each
position's operator to the solvers. The model comes back exactly as it was.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import resolve_activation
from .config import ScoringConfig
from .locate import config_positions
from .sensitivity.capture import PairAccumulator, capture
from .sensitivity.crossfit import CrossFitted, SplitAccumulator, cross_fit, crossfit_spectrum
from .sensitivity.directions import coordinate_directions
from .sensitivity.distributed import fail_together, rank, sum_across
from .sensitivity.objective import LossFn, materialize, model_device
from .sensitivity.operators import BlockOperator, DenseBlocks
from .sensitivity.precision import autocast_off
from .sensitivity.solvers import Spectrum, exact_spectrum, lanczos_spectra


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
    kernel_size: int = 3  # the conv kernel of a layer on an image stream (sensitivity.features.effective_kernel)
    top_eigenvalues: list[float] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)  # output neurons the eps_s rule keeps (empty if <= 0)
    gain: float = 0.0  # phi^T Q phi of the eps_s initialisation (sum of the kept eigenvalues)
    tokens: int = 0  # tokens seen over the calibration data
    tokens_used: int = 0  # tokens with a non-zero adjoint the solver used (fewer only under a token cap)
    solver: str = "exact"
    residual: float = 0.0
    crossfit_eigenvalue: float | None = None  # the best row's cross-fitted value (METHOD.md section 8), if asked for
    spectrum: Spectrum | None = field(default=None, repr=False, compare=False)
    operator: BlockOperator | None = field(default=None, repr=False, compare=False)
    crossfit: CrossFitted | None = field(default=None, repr=False, compare=False)
    rank_by: str = "eigenvalue"  # ScoringConfig.rank_by: "per_token" divides the value by the tokens seen

    @property
    def ranking_value(self) -> float:
        """What positions compete by: the cross-fitted value when there is one, else the top eigenvalue; per token
        of the position under rank_by="per_token" (the sign, and so the threshold test, is unchanged)."""
        value = self.eigenvalue if self.crossfit_eigenvalue is None else self.crossfit_eigenvalue
        return value / max(self.tokens, 1) if self.rank_by == "per_token" else value

    def neuron_spectrum(self, config: ScoringConfig) -> Spectrum:
        """The eigenpairs the neuron rule chooses from: by cross-fitted value when cross-fitted."""
        if self.crossfit is None:
            return self.spectrum
        eps_s, cap = config.neuron_rule()
        return crossfit_spectrum(self.spectrum, self.crossfit, eps_s, cap)

    def as_dict(self) -> dict:
        keys = (
            "name",
            "index",
            "eigenvalue",
            "kind",
            "layout",
            "width",
            "num_features",
            "kernel_size",
            "top_eigenvalues",
            "neurons",
            "gain",
            "tokens",
            "tokens_used",
            "solver",
            "residual",
            "crossfit_eigenvalue",
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


def position_generator(seed: int, name: str, process: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for each position (and process, for the token subsample), so a position's score
    and initial directions do not depend on which other positions compete (e.g. in greedy top-k insertion).
    On the device the draws are made on, so no random numbers cross from the host."""
    return torch.Generator(device).manual_seed(seed + zlib.crc32(name.encode()) + 7919 * process)


def pair_memory(config: ScoringConfig, device: torch.device, positions: int) -> int:
    """Bytes of captured (z, p) pairs each of `positions` positions may hold: a share of the free memory on CUDA,
    of `cpu_pair_memory` elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        total = config.pair_memory_fraction * free
    else:
        total = config.cpu_pair_memory
    return int(total // max(1, positions))


def solve(operator: BlockOperator, config: ScoringConfig, generator: torch.Generator | None) -> Spectrum:
    """The spectrum of one position's operator (see `solve_all`)."""
    return solve_all([operator], config, [generator])[0]


def solve_all(
    operators: list[BlockOperator],
    config: ScoringConfig,
    generators: list[torch.Generator | None],
    progress: tqdm | None = None,
) -> list[Spectrum]:
    """Every position's spectrum: dense blocks exactly, token pairs by Lanczos, the latter batched across positions
    of one shape when `config.batch_positions` says so (by default on accelerators). `progress` advances by one
    per position solved."""
    # Every neuron is an output row with its own eigenpair: the spectrum must hold as many rows as a layer may take,
    # a fixed `neurons` above max_neurons included.
    most = config.neurons or config.max_neurons
    keep = max(most or 64, 16)
    spectra: list[Spectrum | None] = [None] * len(operators)
    groups: dict[tuple, list[int]] = {}
    for index, operator in enumerate(operators):
        if isinstance(operator, DenseBlocks):
            # Every pair the neuron rule may take: lambda >= (1 - eps_s) lambda_1, or any positive one for a fixed m.
            floor = 1.0 - config.eps_s if config.neurons is None else 0.0
            spectra[index] = exact_spectrum(operator, keep, floor)
            if progress is not None:
                progress.update(1)
            continue
        batched = config.batch_positions if config.batch_positions is not None else operator.device.type != "cpu"
        key = (operator.num_features, operator.dtype, operator.device) if batched else (index,)
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        solved = lanczos_spectra(
            [operators[i] for i in members],
            keep,
            config.lanczos_screen_iterations,
            config.lanczos_refine_iterations,
            max(config.lanczos_refine_rows, most or 0),
            generators=[generators[i] for i in members],
            screen_tokens=config.screen_tokens,
            tf32=config.tf32_products and operators[members[0]].device.type == "cuda",
        )
        for i, spectrum in zip(members, solved, strict=True):
            spectra[i] = spectrum
        if progress is not None:
            progress.update(len(members))
    return spectra


@dataclass
class ScoringRound:
    """One scoring pass: every position's score (with operator and spectrum), its tap, and J of the model."""

    scores: list[PositionScore]
    positions: list
    loss: float  # the mean of the batch losses, from the same forward passes
    # wall time of the round: the forward and backward passes that capture the positions, and the eigen-solves
    seconds: dict[str, float] = field(default_factory=dict)


def score_round(
    model: nn.Module, data: Iterable, config: ScoringConfig | None = None, loss_fn: LossFn | None = None
) -> ScoringRound:
    """score_positions that also keeps each position's operator and spectrum, and J (for insertion)."""
    start = time.perf_counter()
    config = ScoringConfig.from_any(config)
    _, curvature = resolve_activation(config.activation)
    positions = config_positions(model, config)
    dtype = compute_dtype(model, config)
    device = model_device(model)
    budget = pair_memory(config, device, len(positions))
    # Token-subsample keys differ per process (position_generator's third argument); the solver's start
    # vectors below must be the same on every process.
    mode = {"exact": "blocks", "lanczos": "pairs", "auto": "auto"}[config.solver]

    def accumulator(position, share: int = 1) -> PairAccumulator:
        return PairAccumulator(
            mode,
            curvature,
            config.max_tokens,
            config.kernel_size,
            dtype,
            position_generator(config.seed, position.name + ("" if share == 1 else "/part"), rank(), device),
            config.exact_max_features,
            config.exact_max_entries,
            max_bytes=None if budget is None else budget // share,
            shrink_kernel=config.shrink_kernel,
        )

    if config.crossfit:  # two halves of the examples per position, each with half the memory
        accumulators = [SplitAccumulator(lambda p=position: accumulator(p, 2)) for position in positions]
    else:
        accumulators = [accumulator(position) for position in positions]
    with fail_together():
        batches = materialize(data)
        with scoring_mode(model, config.eval_mode):
            loss_sum = capture(model, batches, positions, loss_fn, accumulators, config.progress)
    captured = time.perf_counter()
    num_batches = sum_across(len(batches))
    loss = sum_across(loss_sum) / num_batches
    with autocast_off():
        for accumulator in accumulators:
            accumulator.combine_across_processes()
        operators = [accumulator.operator(num_batches) for accumulator in accumulators]
        generators = [
            position_generator(config.seed, p.name, 0, op.device) for p, op in zip(positions, operators, strict=True)
        ]
        with tqdm(total=len(operators), desc="solving eigenproblems", disable=not config.progress) as bar:
            spectra = solve_all(operators, config, generators, bar)
        fits = [None] * len(positions)
        if config.crossfit:
            for i, (acc, spectrum, generator) in enumerate(zip(accumulators, spectra, generators, strict=True)):
                if spectrum.top > 0:
                    fits[i] = cross_fit(acc.parts, spectrum, config.lanczos_refine_iterations, generator)
        scores = [
            position_score(position, acc, operator, spectrum, config, fit)
            for position, acc, operator, spectrum, fit in zip(
                positions, accumulators, operators, spectra, fits, strict=True
            )
        ]
    seconds = {"capture": captured - start, "eigen_solves": time.perf_counter() - captured}
    return ScoringRound(scores, positions, float(loss), seconds)


def position_score(
    position, accumulator, operator: BlockOperator, spectrum: Spectrum, config, fit: CrossFitted | None = None
) -> PositionScore:
    neurons, gain = [], 0.0
    ranking = spectrum.top if fit is None else fit.top
    if ranking > config.threshold and ranking > 0:
        chosen = spectrum if fit is None else crossfit_spectrum(spectrum, fit, *config.neuron_rule())
        if chosen.eigenvalues.numel():
            rule = config.neuron_rule() if fit is None else (1.0, None)  # the cross-fitted rule already chose
            directions = coordinate_directions(chosen, operator.num_outputs, *rule)
            neurons = directions.rows
            gain = directions.value
    return PositionScore(
        name=position.name,
        index=position.index,
        eigenvalue=spectrum.top,
        kind=position.kind,
        layout=accumulator.layout,
        width=accumulator.width,
        num_features=operator.num_features,
        kernel_size=accumulator.kernel or config.kernel_size,
        top_eigenvalues=spectrum.eigenvalues[:8].tolist(),
        neurons=neurons,
        gain=gain,
        tokens=accumulator.tokens_seen,
        tokens_used=accumulator.tokens_used,
        solver=spectrum.solver,
        residual=spectrum.residual,
        crossfit_eigenvalue=None if fit is None else fit.top,
        spectrum=spectrum,
        operator=operator,
        crossfit=fit,
        rank_by=config.rank_by,
    )


def score_with_operators(
    model: nn.Module, data: Iterable, config: ScoringConfig | None = None, loss_fn: LossFn | None = None
) -> tuple[list[PositionScore], list]:
    """score_positions that also keeps each position's operator and spectrum (for insertion)."""
    scored = score_round(model, data, config, loss_fn)
    return scored.scores, scored.positions


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
