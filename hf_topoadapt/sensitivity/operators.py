"""The topological-derivative operator Q of one position, block diagonal with one (q x q) block per
output neuron r:  Q^(r) = c * sum_n p[n, r] z_n z_n^T  (METHOD.md section 3).

Two interchangeable representations: `DenseBlocks` keeps every block (exact, memory d_out * q^2, no
growth with the data) and `TokenPairs` keeps the (z, p) pairs and applies Q matrix-free in O(N d q).
Both expose the same small set of products that the eigen-solvers and the optimised-direction ascent
need, so the solvers never see which one they use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .precision import full_precision


class BlockOperator:
    num_outputs: int
    num_features: int
    matrix_free = False  # whether mixture_products avoids forming the (q x q) mixture

    def token_subsample(self, count: int | None, generator: torch.Generator | None = None) -> BlockOperator:
        """An estimate of the operator from a token subsample (for ranking blocks cheaply); itself by default."""
        return self

    def apply(self, vectors: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Q^(r) v_r for each r in rows (all rows when None); vectors has shape (len(rows), q)."""
        raise NotImplementedError

    def quadratic_per_row(self, w: torch.Tensor) -> torch.Tensor:
        """w^T Q^(r) w for every r, shape (d_out,): c * sum_n p[n] (w . z_n)^2."""
        raise NotImplementedError

    def mixture(self, u: torch.Tensor) -> torch.Tensor:
        """sum_r u_r Q^(r) = c * sum_n (u . p_n) z_n z_n^T, a (q x q) matrix."""
        raise NotImplementedError

    def mixture_products(self, u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> x (sum_r u_r Q^(r)) for row vectors x (b, q), without forming the mixture: only operators with
        `matrix_free` (the ascent forms `mixture` for the others)."""
        raise NotImplementedError

    def blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense blocks Q^(r) for the given rows, shape (len(rows), q, q)."""
        raise NotImplementedError

    def restrict(self, rows: torch.Tensor) -> BlockOperator:
        """The operator made of the given blocks only (in that order), for repeated products with them."""
        return _Rows(self, rows)

    def dense(self) -> torch.Tensor:
        """The whole operator as one dense (d_out*q x d_out*q) matrix, row-major in (r, feature) order.

        For tests and the naive baseline only: it has d^2 x d^2 entries.
        """
        rows = torch.arange(self.num_outputs)
        return torch.block_diag(*self.blocks(rows))


class _Rows(BlockOperator):
    """A view on some blocks of another operator (the generic `restrict`)."""

    def __init__(self, parent: BlockOperator, rows: torch.Tensor):
        self.parent, self.rows = parent, rows
        self.num_outputs, self.num_features = len(rows), parent.num_features

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def apply(self, vectors, rows=None):
        return self.parent.apply(vectors, self.rows if rows is None else self.rows[rows])

    def quadratic_per_row(self, w):
        return self.parent.quadratic_per_row(w)[self.rows]

    def mixture(self, u):
        full = u.new_zeros(self.parent.num_outputs).index_add_(0, self.rows, u)
        return self.parent.mixture(full)

    def mixture_products(self, u):
        full = u.new_zeros(self.parent.num_outputs).index_add_(0, self.rows, u)
        return self.parent.mixture_products(full)

    @property
    def matrix_free(self) -> bool:
        return self.parent.matrix_free

    def blocks(self, rows):
        return self.parent.blocks(self.rows[rows])


class DenseBlocks(BlockOperator):
    def __init__(self, blocks: torch.Tensor):
        self._blocks = blocks
        self.num_outputs, self.num_features = blocks.shape[0], blocks.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks.dtype

    @property
    def device(self) -> torch.device:
        return self._blocks.device

    def apply(self, vectors, rows=None):
        selected = self._blocks if rows is None else self._blocks[rows]
        return torch.einsum("rij,rj->ri", selected, vectors)

    def quadratic_per_row(self, w):
        return torch.einsum("i,rij,j->r", w, self._blocks, w)

    def mixture(self, u):
        return torch.einsum("r,rij->ij", u, self._blocks)

    def blocks(self, rows):
        return self._blocks[rows]

    def restrict(self, rows):
        return DenseBlocks(self._blocks[rows])


class TokenPairs(BlockOperator):
    """Q from N captured pairs; `weight` rescales a token subsample back to the full sum."""

    matrix_free = True

    def __init__(self, z: torch.Tensor, p: torch.Tensor, curvature: float, weight: float = 1.0):
        self.z, self.p = z, p
        self.scale = curvature * weight
        self.num_outputs, self.num_features = p.shape[1], z.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.z.dtype

    @property
    def device(self) -> torch.device:
        return self.z.device

    def apply(self, vectors, rows=None):
        p = self.p if rows is None else self.p[:, rows]
        projections = self.z @ vectors.T  # (N, rows): z_n . v_r
        return (projections.mul_(p).T @ self.z).mul_(self.scale)

    def quadratic_per_row(self, w):
        return self.scale * ((self.z @ w) ** 2) @ self.p

    def mixture(self, u):
        weights = self.p @ u
        return self.scale * (self.z * weights[:, None]).T @ self.z

    def mixture_products(self, u):
        # O(N q) per product instead of O(N q^2) to form the matrix: cheaper while a solve takes fewer products
        # than there are features
        weights = self.scale * (self.p @ u)
        return lambda x: ((x @ self.z.T) * weights) @ self.z

    def blocks(self, rows):
        return accumulate_blocks(self.z, self.p[:, rows], self.scale)

    def restrict(self, rows):
        """The chosen columns of p copied once (a gather per product would re-read all of p each time)."""
        restricted = TokenPairs(self.z, self.p[:, rows].contiguous(), 1.0)
        restricted.scale = self.scale
        return restricted

    def token_subsample(self, count: int | None, generator: torch.Generator | None = None) -> TokenPairs:
        """A uniform sample of `count` tokens (without replacement), reweighted to estimate the same sum; the
        operator itself when it holds at most `count` tokens."""
        n = self.z.shape[0]
        if count is None or n <= count:
            return self
        device = generator.device if generator is not None else self.z.device
        chosen = torch.randperm(n, generator=generator, device=device)[:count].to(self.z.device)
        sample = TokenPairs(self.z[chosen], self.p[chosen], 1.0)
        sample.scale = self.scale * n / count
        return sample


@contextlib.contextmanager
def single_thread(tensor: torch.Tensor, work: float = 0.0, limit: float = 2**28) -> Iterator[None]:
    """Runs the block with one intra-op thread when `tensor` is on the CPU and `work` (multiply-adds per
    call) is below `limit`.

    Small products and LAPACK calls on small matrices gain nothing from threads, while waking a thread
    team costs a scheduler time slice whenever the cores are shared; MKL's threaded eigh of small matrices
    was measured hundreds of times slower than the serial one on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1 or work >= limit:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@full_precision
def accumulate_blocks(z: torch.Tensor, p: torch.Tensor, curvature: float) -> torch.Tensor:
    """c * sum_n p[n, r] z_n z_n^T for every r, as a (d_out, q, q) tensor of exactly symmetric blocks.

    Upper triangles only (half the work of full q x q products): per token chunk, the products
    z_n[i] z_n[j] for i <= j are laid out as a (q(q+1)/2, chunk) matrix K, and one GEMM adds p^T K^T.
    """
    n, q = z.shape
    d_out = p.shape[1]
    offsets = [0]
    for i in range(q):
        offsets.append(offsets[-1] + q - i)
    pairs = offsets[-1]
    rows, cols = torch.triu_indices(q, q, device=z.device)
    out = z.new_empty(d_out, q, q)
    # Token chunks: on the CPU the (pairs, chunk) products stay in cache; elsewhere fewer, larger kernels.
    chunk = 256 if z.device.type == "cpu" else max(64, min(4096, 2**25 // pairs))
    products = z.new_empty(pairs, min(chunk, max(n, 1)))
    # Row chunks keep the (rows, pairs) upper triangles under 2**26 entries (only very wide q needs more than one).
    row_chunk = max(1, min(d_out, 2**26 // pairs))
    with single_thread(z, work=n * pairs * d_out, limit=2**31):
        for first in range(0, d_out, row_chunk):
            upper = z.new_zeros(min(row_chunk, d_out - first), pairs)
            for start in range(0, n, chunk):
                part = z[start : start + chunk].T.contiguous()  # (q, m)
                block = products[:, : part.shape[1]]
                if z.device.type == "cpu":  # rows offsets[i]..: z[i] * z[j] for j >= i, in cache
                    for i in range(q):
                        torch.mul(part[i : i + 1], part[i:], out=block[offsets[i] : offsets[i + 1]])
                else:  # two gathers and one product instead of q launches (same (i, j) order as triu_indices)
                    torch.mul(part[rows], part[cols], out=block)
                upper.addmm_(p[start : start + chunk, first : first + row_chunk].T, block.T)
            upper.mul_(curvature)
            out[first : first + row_chunk, rows, cols] = upper
            out[first : first + row_chunk, cols, rows] = upper
    return out
