"""Eigen-solvers for the block-diagonal operator Q: exact per-block `eigh`, and batched Lanczos with
screening for large blocks. Both return the leading eigenpairs over all blocks together, sorted by
eigenvalue, which is what the eps_s neuron rule and the position ranking need.

Lanczos keeps accelerators busy without host round trips: random draws happen on the operator's device, a
breakdown is repaired without asking the host whether one happened, convergence is checked every few steps
(one wait each), and the blocks of several positions with the same shape share one batched run.
The results come back to the host once per run: a `Spectrum` is small (at most `keep` vectors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .operators import BlockOperator, DenseBlocks, single_thread
from .precision import autocast_off, cuda_matmul_precision, full_precision


@dataclass
class Spectrum:
    """Leading eigenpairs of Q over all blocks, eigenvalues descending (host tensors)."""

    eigenvalues: torch.Tensor  # (k,)
    rows: torch.Tensor  # (k,) output neuron owning each eigenvector
    vectors: torch.Tensor  # (k, q) unit eigenvectors
    solver: str
    residual: float = 0.0  # largest relative residual ||Qv - lambda v|| / |lambda_1| among the kept pairs

    @functools.cached_property
    def top(self) -> float:
        return self.eigenvalues[:1].tolist()[0]


CUDA_BATCHED_EIGH_MAX = 32  # torch batches eigh on CUDA (cuSOLVER syevj) only up to this size


def _eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a batch of small symmetric matrices: serially on the CPU (see `single_thread`); on
    CUDA batched when they are small enough, else on the host in float64 (CUDA would solve them one by one, each a
    kernel sequence; the host answers a few hundred 48 x 48 matrices in milliseconds)."""
    if matrices.is_cuda and matrices.shape[-1] > CUDA_BATCHED_EIGH_MAX:
        values, vectors = torch.linalg.eigh(matrices.double().cpu())
        return values.to(matrices), vectors.to(matrices)
    with single_thread(matrices):
        return torch.linalg.eigh(matrices)


def _keep_top(eigenvalues, rows, vectors, keep: int, solver: str, residual: float = 0.0) -> Spectrum:
    order = torch.argsort(eigenvalues, descending=True)[:keep]
    return Spectrum(eigenvalues[order].cpu(), rows[order].cpu(), vectors[order].cpu(), solver, residual)


@full_precision
def exact_spectrum(operator: BlockOperator, keep: int = 64, floor: float | None = None) -> Spectrum:
    """The leading eigenpairs over all blocks, exactly; O(d_out q^3).

    Keeps the `keep` largest, and with `floor` also every positive eigenpair with lambda >= floor * lambda_1
    (what the eps_s rule may take, however many rows it spans). Eigenvalues of every block come first (no
    vectors: about 2.3 times cheaper), then full `eigh` only of the blocks that own a kept eigenvalue.
    """
    blocks = (
        operator._blocks if isinstance(operator, DenseBlocks) else operator.blocks(torch.arange(operator.num_outputs))
    )
    q = operator.num_features
    with single_thread(blocks):
        all_values = torch.linalg.eigvalsh(blocks)  # (d_out, q), ascending per block
        wanted = min(max(1, keep), all_values.numel())
        top = all_values[:, -1].max()
        if floor is not None and top > 0:
            wanted = max(wanted, int(((all_values >= floor * top) & (all_values > 0)).sum()))
        owners = torch.topk(all_values.reshape(-1), wanted).indices // q
        rows = torch.unique(owners)
        per_block = int(torch.bincount(owners).max())
        values, vectors = torch.linalg.eigh(blocks[rows])
    values = values[:, -per_block:].reshape(-1)
    vectors = vectors[:, :, -per_block:].transpose(1, 2).reshape(-1, q)
    return _keep_top(values, rows.repeat_interleave(per_block), vectors, wanted, "exact")


def _breakdown_tolerance(dtype: torch.dtype) -> float:
    """Below this fraction of |A v|, the new Lanczos direction counts as a breakdown (the Krylov space is
    invariant) and a fresh random direction replaces it.

    What is left of A v after Gram-Schmidt is then mostly rounding, and twice-repeated Gram-Schmidt only keeps
    a vector orthogonal when it is well above rounding (about k * eps of |A v| for k basis vectors). 1e-10
    suits float64; in float32 it let rounding noise in as a direction (blocks of rank < the Krylov size, e.g.
    fewer tokens than steps), the basis lost orthogonality and Ritz values exceeded the largest eigenvalue
    several times over. 1000 eps (1.2e-4 in float32) is far above that noise.
    """
    return max(1e-10, 1000.0 * torch.finfo(dtype).eps)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """w (b, q), or several vectors per row (b, q, m), minus their components along the rows of basis (b, j, q):
    classical Gram-Schmidt `passes` times (twice keeps the result orthogonal to rounding), two batched matrix
    products per pass."""
    single = w.dim() == 2
    w = w.unsqueeze(2) if single else w
    transposed = basis.transpose(1, 2)
    for _ in range(passes):
        w = torch.baddbmm(w, transposed, torch.bmm(basis, w), alpha=-1)
    return w.squeeze(2) if single else w


def _draw(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws on the generator's device (the same numbers wherever the operator lives), then
    moved to `like`'s device when that differs."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, dtype=like.dtype, generator=generator, device=device).to(like.device)


def _next_direction(
    image: torch.Tensor, basis: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next Lanczos direction of each row (unnormalised) and its norm: `image` (b, q) orthogonalised against the
    row's basis (b, j, q), or, where the Krylov space is exhausted (what is left is rounding), a fresh random
    direction orthogonal to the basis.

    A fresh direction is drawn for every row, orthogonalised together with the images, and kept only where
    needed: asking the host which rows broke down would stall an accelerator at every step."""
    fresh = _draw(tuple(image.shape), image, generator)
    both = _orthogonalise(torch.stack([image, fresh], dim=2), basis)  # (b, q, 2)
    norms = both.norm(dim=1)
    tiny = torch.finfo(image.dtype).tiny
    broken = norms[:, 0] <= _breakdown_tolerance(image.dtype) * image.norm(dim=1).clamp_min(tiny)
    w = torch.where(broken[:, None], both[:, :, 1], both[:, :, 0])
    return w, torch.where(broken, norms[:, 1], norms[:, 0])


def lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lanczos with full re-orthogonalisation and a Rayleigh-Ritz step on the Krylov basis.

    Args:
        apply: maps (b, q) vectors to the products of b symmetric (q x q) matrices with them.
        start: (b, q) starting vectors.
        iterations: Krylov dimension (capped at q).
        tol: stop early once every matrix's top Ritz pair has a residual <= tol * (the largest |top Ritz value| of
            the batch); None runs every step.

    Returns:
        Ritz values (b, k) ascending, Ritz vectors (b, k, q) and residual norms (b, k).
    """
    with torch.no_grad(), autocast_off():
        return _lanczos(apply, start, iterations, generator, tol=tol)


def _rayleigh_ritz(basis: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ritz values (ascending), vectors and residual norms of the symmetric maps with A V = images."""
    projected = basis @ images.transpose(1, 2)  # (b, k, k) = V^T A V
    projected = 0.5 * (projected + projected.transpose(1, 2))
    values, coefficients = _eigh(projected)
    ritz_vectors = coefficients.transpose(1, 2) @ basis  # (b, k, q)
    ritz_images = coefficients.transpose(1, 2) @ images
    residuals = (ritz_images - values[..., None] * ritz_vectors).norm(dim=2)
    return values, ritz_vectors, residuals


def _group_scale(values: torch.Tensor, groups: torch.Tensor | None, tiny: float) -> torch.Tensor:
    """Per row, the largest |value| among the rows of its group (one group when `groups` is None)."""
    magnitudes = values.abs()
    if groups is None:
        return magnitudes.max().clamp_min(tiny).expand_as(magnitudes)
    # groups < rows: a buffer of one slot per row holds every group's maximum without asking the host
    largest = magnitudes.new_zeros(magnitudes.shape[0]).scatter_reduce(0, groups, magnitudes, "amax")
    return largest[groups].clamp_min(tiny)


def _lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    wanted: int = 1,
    check_every: int = 4,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lanczos`, optionally stopping early: every `check_every` steps (one wait for the device each), once the
    top `wanted` Ritz pairs of every matrix have residuals <= tol * (the largest |top Ritz value| of its group:
    the rows of one position share a scale), the Krylov basis stops growing."""
    batch, q = start.shape
    k = min(iterations, q)
    tiny = torch.finfo(start.dtype).tiny
    basis = start.new_zeros(batch, k, q)
    images = start.new_zeros(batch, k, q)
    v = start / start.norm(dim=1, keepdim=True).clamp_min(tiny)
    for j in range(k):
        basis[:, j] = v
        image = apply(v)
        images[:, j] = image
        if j + 1 == k:
            break
        if tol is not None and (j + 1) % check_every == 0 and j + 1 >= 2 * wanted:
            values, _, residuals = _rayleigh_ritz(basis[:, : j + 1], images[:, : j + 1])
            scale = _group_scale(values[:, -1], groups, tiny)
            if bool((residuals[:, -wanted:] <= tol * scale[:, None]).all()):
                k = j + 1
                break
        w, norms = _next_direction(image, basis[:, : j + 1], generator)
        v = w / norms[:, None].clamp_min(tiny)
    return _rayleigh_ritz(basis[:, :k], images[:, :k])


def _screen(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Plain batched Lanczos (three-term recurrence, no re-orthogonalisation against the whole basis) for
    ranking blocks by their largest eigenvalue.

    Only the top Ritz value of each block is wanted here, and it is accurate without full
    re-orthogonalisation (a lost orthogonality only repeats converged Ritz values, it never lifts them past
    the largest eigenvalue). That saves the O(b k q) Gram-Schmidt passes over the whole basis at every step.

    A block whose Krylov space is exhausted (rank below the step count, e.g. a dead output neuron) stops there:
    from a random start that space already holds every distinct eigenvalue, so its later steps are decoupled
    (beta = 0) and pushed below its spectrum. No host read, no fresh draws.

    Returns:
        The top Ritz value of each block (b,), and a function mapping block indices to their top Ritz vectors.
    """
    batch, q = start.shape
    k = min(iterations, q)
    tiny = torch.finfo(start.dtype).tiny
    basis = start.new_zeros(k, batch, q)  # step-major: basis[j] is written in one contiguous piece
    alphas = start.new_zeros(batch, k)
    betas = start.new_zeros(batch, max(k - 1, 0))
    stopped = torch.zeros(batch, k, dtype=torch.bool, device=start.device)  # steps after a row's breakdown
    v = start / start.norm(dim=1, keepdim=True).clamp_min(tiny)
    for j in range(k):
        basis[j] = v
        image = apply(v)
        w = image if j == 0 else torch.addcmul(image, betas[:, j - 1 : j], basis[j - 1], value=-1)
        alpha = torch.linalg.vecdot(w, v)
        w = torch.addcmul(w, alpha[:, None], v, value=-1)
        correction = torch.linalg.vecdot(w, v)  # one local re-orthogonalisation against v (rounding)
        w = torch.addcmul(w, correction[:, None], v, value=-1)
        alphas[:, j] = alpha + correction
        if j + 1 == k:
            break
        norms = w.norm(dim=1)
        broken = stopped[:, j] | (norms <= _breakdown_tolerance(w.dtype) * image.norm(dim=1).clamp_min(tiny))
        betas[:, j] = torch.where(broken, 0.0, norms)
        stopped[:, j + 1] = broken
        v = torch.where(broken[:, None], 0.0, w / norms[:, None].clamp_min(tiny))
    # Stopped steps (v = 0, so alpha = 0 there) moved below every eigenvalue of the row's tridiagonal (Gershgorin).
    bound = alphas.abs().amax(dim=1) + (2.0 * betas.abs().amax(dim=1) if k > 1 else 0.0)
    alphas = torch.where(stopped, -(2.0 * bound + tiny)[:, None], alphas)
    tridiagonal = torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    values, coefficients = _eigh(tridiagonal)
    top = coefficients[:, :, -1]

    def ritz_vectors(rows: torch.Tensor) -> torch.Tensor:
        vectors = torch.einsum("bk,kbq->bq", top[rows], basis[:, rows])
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(tiny)

    return values[:, -1], ritz_vectors


def _refine_tolerance(dtype: torch.dtype) -> float:
    """Relative residual at which the refinement stops early: 100 units of rounding (1.2e-5 in float32,
    2.2e-14 in float64). Eigenvalues are then exact to about its square; a longer run changes nothing
    that matters, it only grinds the vectors towards the rounding floor."""
    return 100.0 * torch.finfo(dtype).eps


def _product_work(operators: Sequence[BlockOperator], rows: int) -> float:
    """Multiply-adds of one product with `rows` blocks: 2 N q per block from pairs, q^2 from dense blocks."""
    q = operators[0].num_features
    tokens = sum(getattr(operator, "z", torch.empty(0, 0)).shape[0] for operator in operators)
    return 2.0 * tokens * q * rows / len(operators) if tokens else float(rows) * q * q


class _Stacked:
    """The blocks of several operators (same q) as one batch: rows of operator i follow those of operator i-1."""

    def __init__(self, operators: Sequence[BlockOperator], tf32: bool = False):
        self.operators = list(operators)
        self.sizes = [operator.num_outputs for operator in self.operators]
        self.tf32 = tf32

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        with cuda_matmul_precision(vectors.device, self.tf32):
            if len(self.operators) == 1:
                return self.operators[0].apply(vectors)
            parts = vectors.split(self.sizes)
            return torch.cat([operator.apply(part) for operator, part in zip(self.operators, parts, strict=True)])


def lanczos_spectrum(
    operator: BlockOperator,
    keep: int = 64,
    screen_iterations: int = 16,
    refine_iterations: int = 48,
    refine_rows: int = 8,
    per_row: int = 2,
    generator: torch.Generator | None = None,
    screen_tokens: int | None = None,
    tf32: bool = False,
) -> Spectrum:
    """Matrix-free leading eigenpairs: a short Lanczos run on every block ranks them, then the best
    `refine_rows` blocks get a longer run (fully re-orthogonalised) started from their leading Ritz vector;
    it stops before `refine_iterations` once the top `per_row` pairs of every refined block have converged.
    """
    (spectrum,) = lanczos_spectra(
        [operator], keep, screen_iterations, refine_iterations, refine_rows, per_row, [generator], screen_tokens, tf32
    )
    return spectrum


@full_precision
@torch.no_grad()
def lanczos_spectra(
    operators: Sequence[BlockOperator],
    keep: int = 64,
    screen_iterations: int = 16,
    refine_iterations: int = 48,
    refine_rows: int = 8,
    per_row: int = 2,
    generators: Sequence[torch.Generator | None] | None = None,
    screen_tokens: int | None = None,
    tf32: bool = False,
) -> list[Spectrum]:
    """`lanczos_spectrum` of several operators with the same q, dtype and device in one batched run.

    Every operator keeps its own start vectors (from its own generator) and its own convergence scale, so its
    result does not depend on its companions beyond rounding and when the shared run stops.

    Args:
        screen_tokens: rank the blocks on a uniform sample of at most this many tokens (the refinement of the
            best blocks always uses every token the operator holds); None screens on every token.
        tf32: the Lanczos products on CUDA in TF32 (float32 accumulation); the returned eigenvalues are then
            Rayleigh quotients re-measured with full-precision products (on any device).
    """
    if generators is None:
        generators = [None] * len(operators)
    q, dtype = operators[0].num_features, operators[0].dtype
    device = getattr(operators[0], "device", torch.device("cpu"))
    if any(op.num_features != q or op.dtype != dtype for op in operators):
        raise ValueError("lanczos_spectra needs operators of one feature size and dtype")
    starts = [
        _draw((op.num_outputs, q), torch.empty(0, dtype=dtype, device=device), generator)
        for op, generator in zip(operators, generators, strict=True)
    ]
    shortlist_rows = SHORTLIST * max(refine_rows, 1)
    screened = _Stacked(
        [
            op.token_subsample(screen_tokens, g) if _sample_pays(op, screen_tokens, shortlist_rows) else op
            for op, g in zip(operators, generators, strict=True)
        ],
        tf32,
    )
    sizes = screened.sizes
    with single_thread(starts[0], _product_work(screened.operators, sum(sizes))):
        top_values, ritz_vectors = _screen(screened.apply, torch.cat(starts), screen_iterations)
    # rows[i]: the blocks of operator i still in the running (all of them after the first screen)
    rows = [torch.arange(size, device=device) for size in sizes]
    if any(sample is not op for sample, op in zip(screened.operators, operators, strict=True)):
        # A token sample ranks blocks with noise: a shortlist of SHORTLIST times the blocks to refine is screened
        # again on every token (from its Ritz vectors), so a block the sample ranked a little low still competes.
        shortlist = _best_rows(top_values, sizes, shortlist_rows)
        again = _Stacked([op.restrict(best) for op, best in zip(operators, shortlist, strict=True)], tf32)
        with single_thread(starts[0], _product_work(again.operators, sum(again.sizes))):
            top_values, ritz_vectors = _screen(again.apply, ritz_vectors(_global(shortlist, sizes)), screen_iterations)
        rows, sizes = shortlist, again.sizes

    # The best blocks of each operator, refined together on every token.
    best = _best_rows(top_values, sizes, max(refine_rows, 1))
    chosen = [candidates[b] for candidates, b in zip(rows, best, strict=True)]
    restricted = [op.restrict(c) for op, c in zip(operators, chosen, strict=True)]
    groups = [torch.full((len(c),), i, dtype=torch.long, device=device) for i, c in enumerate(chosen)]
    global_rows = _global(best, sizes)
    refined = _Stacked(restricted, tf32)
    with single_thread(starts[0], _product_work(refined.operators, len(global_rows))):
        values, vectors, residuals = _lanczos(
            refined.apply,
            ritz_vectors(global_rows),
            refine_iterations,
            generators[0],
            _refine_tolerance(dtype),
            per_row,
            groups=torch.cat(groups) if len(operators) > 1 else None,
        )
    take = min(per_row, values.shape[1])
    values, vectors, residuals = values[:, -take:], vectors[:, -take:], residuals[:, -take:]
    if tf32:
        values, vectors, residuals = _remeasure(refined, vectors)
    # Per operator (its refined rows are consecutive): the `keep` best pairs, still on the device.
    kept_values, kept_rows, kept_vectors, relative_residuals = [], [], [], []
    for rows, first in zip(chosen, _offsets([len(rows) for rows in chosen]), strict=True):
        mine = slice(first, first + len(rows))
        top_values = values[mine].reshape(-1)
        order = torch.argsort(top_values, descending=True)[:keep]
        kept_values.append(top_values[order])
        kept_rows.append(rows.repeat_interleave(take)[order])
        kept_vectors.append(vectors[mine].reshape(-1, q)[order])
        scale = top_values.abs().max().clamp_min(torch.finfo(dtype).tiny)
        relative_residuals.append((residuals[mine][:, -1].max() / scale).reshape(1))
    # One trip to the host for every operator's results.
    counts = [len(v) for v in kept_values]
    numbers = torch.cat([torch.cat(kept_values), torch.cat(kept_rows).to(dtype), torch.cat(relative_residuals)]).cpu()
    all_vectors = torch.cat(kept_vectors).cpu()
    total = sum(counts)
    host_values, host_rows, host_residuals = numbers[:total], numbers[total : 2 * total].long(), numbers[2 * total :]
    spectra = []
    for first, count, residual in zip(_offsets(counts), counts, host_residuals.tolist(), strict=True):
        mine = slice(first, first + count)
        spectra.append(Spectrum(host_values[mine], host_rows[mine], all_vectors[mine], "lanczos", residual))
    return spectra


SHORTLIST = 4  # blocks screened again on every token, per block refined, when the first screen used a sample


def _sample_pays(operator: BlockOperator, screen_tokens: int | None, shortlist_rows: int) -> bool:
    """Whether screening on a token sample, then the shortlist on every token, costs well under screening every
    block on every token (products scale with tokens x blocks): for wide positions with many tokens, not for
    narrow ones, where the shortlist is a large share of the blocks."""
    tokens = getattr(operator, "z", None)
    if screen_tokens is None or tokens is None or tokens.shape[0] <= screen_tokens:
        return False
    n, blocks = tokens.shape[0], operator.num_outputs
    return screen_tokens * blocks + n * min(blocks, shortlist_rows) < 0.75 * n * blocks


def _best_rows(values: torch.Tensor, sizes: list[int], count: int) -> list[torch.Tensor]:
    """Per operator (its `size` consecutive entries of `values`), the indices of its `count` largest values."""
    return [
        torch.topk(values[first : first + size], min(size, count)).indices
        for first, size in zip(_offsets(sizes), sizes, strict=True)
    ]


def _global(local: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Per-operator row indices as indices into the stacked batch of all operators' rows."""
    return torch.cat([rows + first for rows, first in zip(local, _offsets(sizes), strict=True)])


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def _remeasure(refined: _Stacked, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh quotients, vectors and residual norms of the Ritz vectors (b, t, q) with full float32 products,
    ascending per block: the eigenvalues carry no TF32 rounding, their error is second order in the vectors'."""
    exact = _Stacked(refined.operators, tf32=False)
    images = torch.stack([exact.apply(vectors[:, i]) for i in range(vectors.shape[1])], dim=1)  # (b, t, q)
    quotients = torch.linalg.vecdot(vectors, images) / torch.linalg.vecdot(vectors, vectors)
    residuals = (images - quotients[..., None] * vectors).norm(dim=2)
    order = torch.argsort(quotients, dim=1)
    return (
        quotients.gather(1, order),
        vectors.gather(1, order[..., None].expand_as(vectors)),
        residuals.gather(1, order),
    )
