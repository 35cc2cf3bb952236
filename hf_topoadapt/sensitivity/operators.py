"""The topological-derivative operator Q of one position, block diagonal with one (q x q) block per
output neuron r:  Q^(r) = c * sum_n p[n, r] z_n z_n^T  (METHOD.md section 3).

Two interchangeable representations: `DenseBlocks` keeps every block (exact, memory d_out * q^2, no
growth with the data) and `TokenPairs` keeps the (z, p) pairs and applies Q matrix-free in O(N d q).
Both expose the same small set of products that the eigen-solvers and the optimised-direction ascent
need, so the solvers never see which one they use.
"""

from __future__ import annotations

import torch


class BlockOperator:
    num_outputs: int
    num_features: int

    def apply(self, vectors: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Q^(r) v_r for each r in rows (all rows when None); vectors has shape (len(rows), q)."""
        raise NotImplementedError

    def quadratic_per_row(self, w: torch.Tensor) -> torch.Tensor:
        """w^T Q^(r) w for every r, shape (d_out,): c * sum_n p[n] (w . z_n)^2."""
        raise NotImplementedError

    def mixture(self, u: torch.Tensor) -> torch.Tensor:
        """sum_r u_r Q^(r) = c * sum_n (u . p_n) z_n z_n^T, a (q x q) matrix."""
        raise NotImplementedError

    def blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense blocks Q^(r) for the given rows, shape (len(rows), q, q)."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole operator as one dense (d_out*q x d_out*q) matrix, row-major in (r, feature) order.

        For tests and the naive baseline only: it has d^2 x d^2 entries.
        """
        rows = torch.arange(self.num_outputs)
        return torch.block_diag(*self.blocks(rows))


class DenseBlocks(BlockOperator):
    def __init__(self, blocks: torch.Tensor):
        self._blocks = blocks
        self.num_outputs, self.num_features = blocks.shape[0], blocks.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks.dtype

    def apply(self, vectors, rows=None):
        selected = self._blocks if rows is None else self._blocks[rows]
        return torch.einsum("rij,rj->ri", selected, vectors)

    def quadratic_per_row(self, w):
        return torch.einsum("i,rij,j->r", w, self._blocks, w)

    def mixture(self, u):
        return torch.einsum("r,rij->ij", u, self._blocks)

    def blocks(self, rows):
        return self._blocks[rows]


class TokenPairs(BlockOperator):
    """Q from N captured pairs; `weight` rescales a token subsample back to the full sum."""

    def __init__(self, z: torch.Tensor, p: torch.Tensor, curvature: float, weight: float = 1.0):
        self.z, self.p = z, p
        self.scale = curvature * weight
        self.num_outputs, self.num_features = p.shape[1], z.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.z.dtype

    def apply(self, vectors, rows=None):
        p = self.p if rows is None else self.p[:, rows]
        projections = self.z @ vectors.T  # (N, rows): z_n . v_r
        return self.scale * (p * projections).T @ self.z

    def quadratic_per_row(self, w):
        return self.scale * ((self.z @ w) ** 2) @ self.p

    def mixture(self, u):
        weights = self.p @ u
        return self.scale * (self.z * weights[:, None]).T @ self.z

    def blocks(self, rows):
        return self.scale * torch.einsum("nr,ni,nj->rij", self.p[:, rows], self.z, self.z)


def accumulate_blocks(z: torch.Tensor, p: torch.Tensor, curvature: float) -> torch.Tensor:
    """c * sum_n p[n, r] z_n z_n^T for every r, as a (d_out, q, q) tensor, one GEMM per row chunk."""
    d_out, q = p.shape[1], z.shape[1]
    out = z.new_empty(d_out, q, q)
    # Chunk the rows so the (N, chunk, q) weighted copy of z stays small.
    chunk = max(1, int(2**24 // max(1, z.shape[0] * q)))
    for start in range(0, d_out, chunk):
        weighted = p[:, start : start + chunk, None] * z[:, None, :]  # (N, chunk, q)
        out[start : start + chunk] = torch.einsum("nri,nj->rij", weighted, z)
    return out.mul_(curvature)
