"""Eigen-solvers for the block-diagonal operator Q: exact per-block `eigh`, and batched Lanczos with
screening for large blocks. Both return the leading eigenpairs over all blocks together, sorted by
eigenvalue, which is what the eps_s neuron rule and the position ranking need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .operators import BlockOperator, DenseBlocks


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


def _keep_top(eigenvalues, rows, vectors, keep: int, solver: str, residual: float = 0.0) -> Spectrum:
    order = torch.argsort(eigenvalues, descending=True)[:keep]
    return Spectrum(eigenvalues[order], rows[order], vectors[order], solver, residual)


def exact_spectrum(operator: BlockOperator, keep: int = 64) -> Spectrum:
    """Every eigenpair of every block by batched `eigh`; O(d_out q^3)."""
    all_rows = torch.arange(operator.num_outputs)
    blocks = operator._blocks if isinstance(operator, DenseBlocks) else operator.blocks(all_rows)
    values, vectors = torch.linalg.eigh(blocks)  # ascending per block
    q = operator.num_features
    per_block = min(q, max(1, keep))
    values = values[:, -per_block:].reshape(-1)
    vectors = vectors[:, :, -per_block:].transpose(1, 2).reshape(-1, q)
    rows = all_rows.repeat_interleave(per_block)
    return _keep_top(values, rows, vectors, keep, "exact")


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
    batch, q = start.shape
    k = min(iterations, q)
    basis = start.new_zeros(batch, k, q)
    images = start.new_zeros(batch, k, q)
    v = start / start.norm(dim=1, keepdim=True).clamp_min(torch.finfo(start.dtype).tiny)
    for j in range(k):
        basis[:, j] = v
        images[:, j] = apply(v)
        if j + 1 == k:
            break
        w = images[:, j].clone()
        for _ in range(2):  # classical Gram-Schmidt twice keeps the basis orthonormal to rounding
            w -= torch.einsum("bk,bkq->bq", torch.einsum("bkq,bq->bk", basis[:, : j + 1], w), basis[:, : j + 1])
        norms = w.norm(dim=1, keepdim=True)
        scale = images[:, j].norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        broken = (norms <= 1e-10 * scale).squeeze(1)
        if broken.any():  # invariant subspace reached: continue from a fresh orthogonal direction
            fresh = torch.randn(int(broken.sum()), q, dtype=w.dtype, generator=generator).to(w.device)
            old = basis[broken, : j + 1]
            for _ in range(2):
                fresh -= torch.einsum("bk,bkq->bq", torch.einsum("bkq,bq->bk", old, fresh), old)
            w[broken] = fresh
            norms = w.norm(dim=1, keepdim=True)
        v = w / norms.clamp_min(torch.finfo(w.dtype).tiny)
    projected = basis @ images.transpose(1, 2)  # (b, k, k) = V^T A V
    projected = 0.5 * (projected + projected.transpose(1, 2))
    values, coefficients = torch.linalg.eigh(projected)
    ritz_vectors = coefficients.transpose(1, 2) @ basis  # (b, k, q)
    ritz_images = coefficients.transpose(1, 2) @ images
    residuals = (ritz_images - values[..., None] * ritz_vectors).norm(dim=2)
    return values, ritz_vectors, residuals


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
    `refine_rows` blocks get a longer run started from their leading Ritz vector.
    """
    d_out, q = operator.num_outputs, operator.num_features
    dtype = operator.dtype
    start = torch.randn(d_out, q, dtype=dtype, generator=generator)
    all_rows = torch.arange(d_out)
    values, vectors, _ = lanczos(lambda v: operator.apply(v), start, screen_iterations, generator)
    order = torch.argsort(values[:, -1], descending=True)[: min(d_out, max(refine_rows, 1))]
    rows = all_rows[order]
    refined_values, refined_vectors, residuals = lanczos(
        lambda v: operator.apply(v, rows), vectors[order, -1], refine_iterations, generator
    )
    take = min(per_row, refined_values.shape[1])
    top_values = refined_values[:, -take:].reshape(-1)
    top_vectors = refined_vectors[:, -take:].reshape(-1, q)
    top_rows = rows.repeat_interleave(take)
    scale = top_values.abs().max().clamp_min(torch.finfo(dtype).tiny)
    residual = float(residuals[:, -1].max() / scale)
    return _keep_top(top_values, top_rows, top_vectors, keep, "lanczos", residual)
