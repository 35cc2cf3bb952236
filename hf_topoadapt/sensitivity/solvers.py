"""Eigen-solvers for the block-diagonal operator Q: exact per-block `eigh`, and batched Lanczos with
screening for large blocks. Both return the leading eigenpairs over all blocks together, sorted by
eigenvalue, which is what the eps_s neuron rule and the position ranking need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .operators import BlockOperator, DenseBlocks, single_thread


@dataclass
class Spectrum:
    """Leading eigenpairs of Q over all blocks, eigenvalues descending."""

    eigenvalues: torch.Tensor  # (k,)
    rows: torch.Tensor  # (k,) output neuron owning each eigenvector
    vectors: torch.Tensor  # (k, q) unit eigenvectors
    solver: str
    residual: float = 0.0  # largest relative residual ||Qv - lambda v|| / |lambda_1| among the kept pairs

    @property
    def top(self) -> float:
        return float(self.eigenvalues[0])


def _eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a batch of symmetric matrices, serially on the CPU (see `single_thread`)."""
    with single_thread(matrices):
        return torch.linalg.eigh(matrices)


def _keep_top(eigenvalues, rows, vectors, keep: int, solver: str, residual: float = 0.0) -> Spectrum:
    order = torch.argsort(eigenvalues, descending=True)[:keep]
    return Spectrum(eigenvalues[order], rows[order], vectors[order], solver, residual)


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
    """w (b, q) minus its components along the rows of basis (b, j, q): classical Gram-Schmidt `passes` times
    (twice keeps the result orthogonal to rounding), two batched matrix products per pass."""
    w = w.unsqueeze(2)
    transposed = basis.transpose(1, 2)
    for _ in range(passes):
        w = torch.baddbmm(w, transposed, torch.bmm(basis, w), alpha=-1)
    return w.squeeze(2)


def lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lanczos with full re-orthogonalisation and a Rayleigh-Ritz step on the Krylov basis.

    Args:
        apply: maps (b, q) vectors to the products of b symmetric (q x q) matrices with them.
        start: (b, q) starting vectors.
        iterations: Krylov dimension (capped at q).

    Returns:
        Ritz values (b, k) ascending, Ritz vectors (b, k, q) and residual norms (b, k).
    """
    return _lanczos(apply, start, iterations, generator)


def _rayleigh_ritz(basis: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ritz values (ascending), vectors and residual norms of the symmetric maps with A V = images."""
    projected = basis @ images.transpose(1, 2)  # (b, k, k) = V^T A V
    projected = 0.5 * (projected + projected.transpose(1, 2))
    values, coefficients = _eigh(projected)
    ritz_vectors = coefficients.transpose(1, 2) @ basis  # (b, k, q)
    ritz_images = coefficients.transpose(1, 2) @ images
    residuals = (ritz_images - values[..., None] * ritz_vectors).norm(dim=2)
    return values, ritz_vectors, residuals


def _lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    wanted: int = 1,
    check_every: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lanczos`, optionally stopping early: every `check_every` steps, once the top `wanted` Ritz pairs of
    every matrix have residuals <= tol * (the largest |top Ritz value|), the Krylov basis stops growing."""
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
            scale = values[:, -1].abs().max().clamp_min(tiny)
            if bool((residuals[:, -wanted:] <= tol * scale).all()):
                k = j + 1
                break
        w = _orthogonalise(image, basis[:, : j + 1])
        norms = w.norm(dim=1, keepdim=True)
        scale = image.norm(dim=1, keepdim=True).clamp_min(tiny)
        broken = (norms <= _breakdown_tolerance(w.dtype) * scale).squeeze(1)
        if broken.any():  # invariant subspace reached: continue from a fresh orthogonal direction
            fresh = torch.randn(int(broken.sum()), q, dtype=w.dtype, generator=generator).to(w.device)
            w[broken] = _orthogonalise(fresh, basis[broken, : j + 1])
            norms = w.norm(dim=1, keepdim=True)
        v = w / norms.clamp_min(tiny)
    return _rayleigh_ritz(basis[:, :k], images[:, :k])


def _screen(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Plain batched Lanczos (three-term recurrence, no re-orthogonalisation against the whole basis) for
    ranking blocks by their largest eigenvalue.

    Only the top Ritz value of each block is wanted here, and it is accurate without full
    re-orthogonalisation (a lost orthogonality only repeats converged Ritz values, it never lifts them past
    the largest eigenvalue). That saves the O(b k q) Gram-Schmidt passes over the whole basis at every step.

    Returns:
        The top Ritz value of each block (b,), and a function mapping block indices to their top Ritz vectors.
    """
    batch, q = start.shape
    k = min(iterations, q)
    tiny = torch.finfo(start.dtype).tiny
    basis = start.new_empty(k, batch, q)  # step-major: basis[j] is written in one contiguous piece
    alphas = start.new_zeros(batch, k)
    betas = start.new_zeros(batch, max(k - 1, 0))
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
        broken = norms <= _breakdown_tolerance(w.dtype) * image.norm(dim=1).clamp_min(tiny)
        betas[:, j] = norms
        if broken.any():  # invariant subspace reached: decouple (beta = 0), go on from a fresh orthogonal direction
            fresh = torch.randn(int(broken.sum()), q, dtype=w.dtype, generator=generator).to(w.device)
            w[broken] = _orthogonalise(fresh, basis[: j + 1, broken].transpose(0, 1))
            betas[broken, j] = 0.0
            norms = w.norm(dim=1)
        v = w / norms[:, None].clamp_min(tiny)
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


def _product_work(operator: BlockOperator, rows: int) -> float:
    """Multiply-adds of one product with `rows` blocks: 2 N q per block from pairs, q^2 from dense blocks."""
    q = operator.num_features
    tokens = getattr(operator, "z", None)
    return 2.0 * tokens.shape[0] * q * rows if tokens is not None else float(rows) * q * q


def lanczos_spectrum(
    operator: BlockOperator,
    keep: int = 64,
    screen_iterations: int = 16,
    refine_iterations: int = 48,
    refine_rows: int = 8,
    per_row: int = 2,
    generator: torch.Generator | None = None,
) -> Spectrum:
    """Matrix-free leading eigenpairs: a short Lanczos run on every block ranks them, then the best
    `refine_rows` blocks get a longer run (fully re-orthogonalised) started from their leading Ritz vector;
    it stops before `refine_iterations` once the top `per_row` pairs of every refined block have converged.
    """
    d_out, q = operator.num_outputs, operator.num_features
    dtype = operator.dtype
    device = getattr(operator, "device", torch.device("cpu"))
    start = torch.randn(d_out, q, dtype=dtype, generator=generator).to(device)  # same draws on every device
    with single_thread(start, _product_work(operator, d_out)):
        top_values, ritz_vectors = _screen(operator.apply, start, screen_iterations, generator)
    rows = torch.argsort(top_values, descending=True)[: min(d_out, max(refine_rows, 1))]
    refined = operator.restrict(rows)  # the chosen blocks only, laid out once for the repeated products
    with single_thread(start, _product_work(refined, len(rows))):
        refined_values, refined_vectors, residuals = _lanczos(
            refined.apply, ritz_vectors(rows), refine_iterations, generator, _refine_tolerance(dtype), per_row
        )
    take = min(per_row, refined_values.shape[1])
    top_values = refined_values[:, -take:].reshape(-1)
    top_vectors = refined_vectors[:, -take:].reshape(-1, q)
    top_rows = rows.repeat_interleave(take)
    scale = top_values.abs().max().clamp_min(torch.finfo(dtype).tiny)
    residual = float(residuals[:, -1].max() / scale)
    return _keep_top(top_values, top_rows, top_vectors, keep, "lanczos", residual)
