"""The eigen-solvers and the two operator representations (float64, CPU).

Exact per-block eigh against a dense eigen-solve, Lanczos against exact, `TokenPairs` against
`DenseBlocks`, and the token reservoir (unbiased, exact when nothing is dropped).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import hf_bert, hf_gpt2, hf_llama, residual_cnn, residual_mlp

import hf_topoadapt as hta
from hf_topoadapt.scoring import score_with_operators
from hf_topoadapt.sensitivity.capture import PairAccumulator
from hf_topoadapt.sensitivity.operators import DenseBlocks, TokenPairs, accumulate_blocks
from hf_topoadapt.sensitivity.solvers import exact_spectrum, lanczos, lanczos_spectrum

DTYPE = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_symmetric_blocks(d_out: int, q: int, seed: int) -> torch.Tensor:
    a = torch.randn(d_out, q, q, generator=generator(seed), dtype=DTYPE)
    return a + a.transpose(1, 2)


def random_pairs(n: int, q: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    z = torch.randn(n, q, generator=g, dtype=DTYPE)
    z[:, -1] = 1.0
    p = torch.randn(n, d_out, generator=g, dtype=DTYPE)
    return z, p


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------
# exact block solver


@pytest.mark.parametrize("keep", [4, 1000])
def test_exact_spectrum_matches_dense_eigh(keep):
    d_out, q = 5, 7
    blocks = random_symmetric_blocks(d_out, q, seed=0)
    operator = DenseBlocks(blocks)
    dense = operator.dense()
    assert dense.shape == (d_out * q, d_out * q)
    expected = np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1]
    assert expected[0] > 0 > expected[-1]  # indefinite

    spectrum = exact_spectrum(operator, keep)
    count = min(keep, d_out * q)
    assert spectrum.solver == "exact"
    assert spectrum.eigenvalues.shape == (count,)
    np.testing.assert_allclose(spectrum.eigenvalues.numpy(), expected[:count], rtol=1e-12, atol=1e-12)
    assert spectrum.top == pytest.approx(expected[0], rel=1e-13)
    # each pair is an eigenpair of the block that owns it, with a unit vector
    for value, row, vector in zip(spectrum.eigenvalues, spectrum.rows, spectrum.vectors, strict=True):
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-12)
        assert float((blocks[row] @ vector - value * vector).norm()) < 1e-11
    # and the dense matrix agrees: the eigenvector embedded at its row's slot
    row, vector = int(spectrum.rows[0]), spectrum.vectors[0]
    full = torch.zeros(d_out * q, dtype=DTYPE)
    full[row * q : (row + 1) * q] = vector
    assert float((dense @ full - spectrum.top * full).norm()) < 1e-11


def test_exact_spectrum_on_token_pairs_equals_dense_blocks():
    z, p = random_pairs(60, 6, 4, seed=1)
    pairs = TokenPairs(z, p, curvature=1.5, weight=2.0)
    dense = DenseBlocks(accumulate_blocks(z, p, 1.5) * 2.0)
    a, b = exact_spectrum(pairs, 24), exact_spectrum(dense, 24)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.rows, b.rows)


def test_dense_d_squared_solve_equals_block_solver_d8():
    """The naive baseline (eigh of the whole d(d+1) x d(d+1) matrix) and the block solver agree."""
    d = 8
    z, p = random_pairs(200, d + 1, d, seed=2)
    operator = DenseBlocks(accumulate_blocks(z, p, 1.0))
    dense = operator.dense()
    assert dense.shape == (d * (d + 1), d * (d + 1))
    naive = float(torch.linalg.eigvalsh(dense)[-1])
    naive_np = float(np.linalg.eigvalsh(dense.numpy())[-1])
    block = exact_spectrum(operator).top
    assert block == pytest.approx(naive, rel=1e-10)
    assert block == pytest.approx(naive_np, rel=1e-10)
    # off-diagonal blocks are exactly zero
    mask = torch.block_diag(*[torch.ones(d + 1, d + 1, dtype=DTYPE)] * d)
    assert float(dense[mask == 0].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------------
# TokenPairs vs DenseBlocks


@pytest.mark.parametrize("weight", [1.0, 3.25])
def test_token_pairs_products_equal_dense_blocks(weight):
    n, q, d_out, c = 150, 9, 7, 0.75
    z, p = random_pairs(n, q, d_out, seed=4)
    pairs = TokenPairs(z, p, c, weight)
    blocks = accumulate_blocks(z, p, c) * weight
    # accumulate_blocks itself: c * sum_n p[n, r] z_n z_n^T
    naive = c * weight * torch.stack([(z * p[:, r : r + 1]).T @ z for r in range(d_out)])
    torch.testing.assert_close(blocks, naive, rtol=1e-12, atol=1e-12)
    dense = DenseBlocks(blocks)
    assert (pairs.num_outputs, pairs.num_features) == (dense.num_outputs, dense.num_features) == (d_out, q)

    g = generator(5)
    vectors = torch.randn(d_out, q, generator=g, dtype=DTYPE)
    torch.testing.assert_close(pairs.apply(vectors), dense.apply(vectors), rtol=1e-12, atol=1e-10)
    rows = torch.tensor([5, 0, 3])
    torch.testing.assert_close(pairs.apply(vectors[:3], rows), dense.apply(vectors[:3], rows), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(pairs.apply(vectors[:3], rows)[0], blocks[5] @ vectors[0], rtol=1e-12, atol=1e-10)

    w = torch.randn(q, generator=g, dtype=DTYPE)
    expected = torch.stack([w @ blocks[r] @ w for r in range(d_out)])
    torch.testing.assert_close(pairs.quadratic_per_row(w), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(dense.quadratic_per_row(w), expected, rtol=1e-12, atol=1e-10)

    u = torch.randn(d_out, generator=g, dtype=DTYPE)
    expected = sum(u[r] * blocks[r] for r in range(d_out))
    torch.testing.assert_close(pairs.mixture(u), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(dense.mixture(u), expected, rtol=1e-12, atol=1e-10)

    torch.testing.assert_close(pairs.blocks(rows), blocks[rows], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(pairs.dense(), dense.dense(), rtol=1e-12, atol=1e-10)


def test_accumulate_blocks_chunks_rows():
    """Enough tokens that the row loop runs in several chunks (2**24 / (N q) < d_out)."""
    n, q, d_out = 40000, 60, 12
    z, p = random_pairs(n, q, d_out, seed=6)
    assert 2**24 // (n * q) < d_out
    blocks = accumulate_blocks(z, p, 2.0)
    for r in (0, 6, 11):
        torch.testing.assert_close(blocks[r], 2.0 * (z * p[:, r : r + 1]).T @ z, rtol=1e-11, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Lanczos


def test_lanczos_full_krylov_is_exact():
    batch, q = 6, 10
    matrices = random_symmetric_blocks(batch, q, seed=7)
    start = torch.randn(batch, q, generator=generator(8), dtype=DTYPE)
    values, vectors, residuals = lanczos(lambda v: torch.einsum("bij,bj->bi", matrices, v), start, q)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrices), rtol=1e-10, atol=1e-10)
    assert float(residuals.max()) < 1e-9
    torch.testing.assert_close(
        torch.einsum("bij,bkj->bki", matrices, vectors), values[..., None] * vectors, rtol=1e-9, atol=1e-9
    )


def test_lanczos_breakdown_on_invariant_subspace():
    """Starting from an eigenvector the Krylov space is invariant after one step: the solver must restart
    from a fresh direction and still find every eigenvalue."""
    q = 6
    diagonal = torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0, 1.5], dtype=DTYPE)
    matrix = torch.diag(diagonal)
    start = torch.zeros(1, q, dtype=DTYPE)
    start[0, 1] = 1.0
    values, vectors, residuals = lanczos(lambda v: v @ matrix, start, q, generator(0))
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    torch.testing.assert_close(values[0], diagonal.sort().values, rtol=1e-12, atol=1e-12)
    assert float(residuals.max()) < 1e-10


def planted_pairs(n=3000, d=96, seed=9, strength=0.5, row=37):
    """Random pairs with one planted direction in one block: a clear eigen-gap at the top."""
    g = generator(seed)
    q = d + 1
    z = torch.randn(n, q, generator=g, dtype=DTYPE)
    z[:, -1] = 1.0
    p = torch.randn(n, d, generator=g, dtype=DTYPE)
    direction = torch.randn(q, generator=g, dtype=DTYPE)
    direction /= direction.norm()
    p[:, row] += strength * (z @ direction) ** 2
    return z, p, row


def test_lanczos_spectrum_matches_exact_on_token_pairs():
    z, p, row = planted_pairs()
    pairs = TokenPairs(z, p, curvature=1.0, weight=1.7)
    exact = exact_spectrum(DenseBlocks(accumulate_blocks(z, p, 1.0) * 1.7), keep=16)
    values = exact.eigenvalues
    assert int(exact.rows[0]) == row
    assert float(values[0]) > 1.5 * float(values[1])  # the gap the test relies on

    spectrum = lanczos_spectrum(pairs, keep=16, generator=generator(0))
    assert spectrum.solver == "lanczos"
    assert spectrum.top == pytest.approx(exact.top, rel=1e-6)
    assert int(spectrum.rows[0]) == row
    assert abs(float(spectrum.vectors[0] @ exact.vectors[0])) == pytest.approx(1.0, abs=1e-6)
    assert spectrum.residual < 1e-4
    # eigenvalues come out descending and each is a Rayleigh quotient of its block
    assert torch.all(spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:])
    for value, r, vector in zip(spectrum.eigenvalues[:4], spectrum.rows[:4], spectrum.vectors[:4], strict=True):
        rayleigh = float(vector @ pairs.apply(vector[None], r[None])[0])
        assert rayleigh == pytest.approx(float(value), rel=1e-8)
        assert float(value) <= exact.top * (1 + 1e-12)


@pytest.mark.parametrize("builder", [hf_gpt2, hf_llama], ids=["hf_gpt2", "hf_llama"])
def test_score_positions_lanczos_matches_exact_width32(builder):
    model, batches, loss_fn, width, _ = builder(width=32)
    exact = hta.score_positions(model, batches, hta.ScoringConfig(solver="exact"), loss_fn)
    approx = hta.score_positions(model, batches, hta.ScoringConfig(solver="lanczos"), loss_fn)
    assert [s.solver for s in exact] == ["exact"] * len(exact)
    assert [s.solver for s in approx] == ["lanczos"] * len(approx)
    for a, b in zip(approx, exact, strict=True):
        assert a.num_features == b.num_features == width + 1
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-6), a.name
        assert a.top_eigenvalues[0] == pytest.approx(b.top_eigenvalues[0], rel=1e-6)
        assert a.tokens == b.tokens


def test_auto_solver_switches_on_exact_max_features():
    model, batches, loss_fn, width, _ = hf_gpt2(width=32)
    small = hta.score_positions(model, batches, hta.ScoringConfig(exact_max_features=16, exact_max_entries=0), loss_fn)
    large = hta.score_positions(model, batches, hta.ScoringConfig(exact_max_features=33, exact_max_entries=0), loss_fn)
    # ... or on the size of the blocks, d_out * q^2 = 32 * 33^2
    held = hta.score_positions(
        model, batches, hta.ScoringConfig(exact_max_features=16, exact_max_entries=32 * 33**2), loss_fn
    )
    assert {s.solver for s in held} == {"exact"}
    assert {s.solver for s in small} == {"lanczos"}
    assert {s.solver for s in large} == {"exact"}
    for a, b in zip(small, large, strict=True):
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the token reservoir


def feed(accumulator: PairAccumulator, z: torch.Tensor, p: torch.Tensor, sizes: list[int]) -> None:
    """Feeds pairs as if they were vector-layout states (z without its trailing 1) in batches of the given sizes."""
    start = 0
    for size in sizes:
        accumulator.add(z[start : start + size, :-1], p[start : start + size])
        start += size
    assert start == z.shape[0]


def test_pairs_mode_equals_blocks_mode_when_nothing_is_dropped():
    z, p = random_pairs(300, 6, 5, seed=10)
    p[::7] = 0.0  # tokens with zero adjoint are dropped in both modes
    sizes = [100, 50, 150]
    blocks_mode = PairAccumulator("blocks", 1.0, 1000, 3, DTYPE, generator(0))
    pairs_mode = PairAccumulator("pairs", 1.0, 300, 3, DTYPE, generator(0))
    feed(blocks_mode, z, p, sizes)
    feed(pairs_mode, z, p, sizes)
    a, b = blocks_mode.operator(3), pairs_mode.operator(3)
    assert isinstance(a, DenseBlocks) and isinstance(b, TokenPairs)
    torch.testing.assert_close(b.dense(), a.dense(), rtol=1e-12, atol=1e-12)
    expected = torch.block_diag(*accumulate_blocks(z, p, 1.0) / 3)  # J is the mean over 3 batches
    torch.testing.assert_close(a.dense(), expected, rtol=1e-12, atol=1e-12)
    assert pairs_mode.tokens_seen == blocks_mode.tokens_seen == 300
    assert pairs_mode.tokens_used == 300 - len(range(0, 300, 7))


@pytest.mark.parametrize("builder", [residual_mlp, residual_cnn, hf_bert], ids=["mlp", "cnn", "hf_bert"])
def test_real_model_pairs_mode_equals_blocks_mode(builder):
    model, batches, loss_fn, _, _ = builder()
    exact, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="exact"), loss_fn)
    pairs, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="lanczos", max_tokens=10**6), loss_fn)
    for a, b in zip(pairs, exact, strict=True):
        assert isinstance(a.operator, TokenPairs) and isinstance(b.operator, DenseBlocks)
        assert a.operator.scale == 1.0  # nothing subsampled: no reweighting
        torch.testing.assert_close(a.operator.dense(), b.operator.dense(), rtol=1e-12, atol=1e-15)
        assert a.tokens == b.tokens
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-6)
    if builder is residual_mlp:
        assert [s.tokens_used for s in pairs] == [14] * len(pairs)  # 7 samples in each of 2 batches
    if builder is residual_cnn:
        assert [s.tokens_used for s in pairs] == [2 * 2 * 16] * len(pairs)  # 2 batches x 2 images x 4x4 pixels


def test_reservoir_is_uniform_and_unbiased():
    n, q, d_out, cap = 400, 4, 3, 100
    z, p = random_pairs(n, q, d_out, seed=11)
    sizes = [40, 160, 200]  # unequal batches with different statistics
    p[:40] += 2.0
    p[200:] -= 1.0
    full = accumulate_blocks(z, p, 1.0)
    ident = torch.arange(n, dtype=DTYPE)  # tag each token by its first feature to count inclusions
    tagged = z.clone()
    tagged[:, 0] = ident
    counts = torch.zeros(n)
    estimates = []
    seeds = 300
    for seed in range(seeds):
        accumulator = PairAccumulator("pairs", 1.0, cap, 3, DTYPE, generator(seed))
        feed(accumulator, tagged, p, sizes)
        assert accumulator.tokens_used == cap and accumulator.tokens_seen == n
        kept = accumulator.z[:, 0].long()
        assert len(set(kept.tolist())) == cap  # a sample without replacement
        counts[kept] += 1
        operator = accumulator.operator(1)
        assert operator.scale == pytest.approx(n / cap)
        # rebuild this sample's estimate with the real z (the tag replaced feature 0)
        estimates.append(accumulate_blocks(z[kept], p[kept], 1.0) * (n / cap))
        torch.testing.assert_close(operator.p, p[kept])
    estimates = torch.stack(estimates)
    # unbiased: the error of the mean over S seeds is the single-sample RMS error / sqrt(S); a biased sample
    # or a wrong reweighting leaves an error that does not shrink with S
    single = float(((estimates - full).flatten(1).norm(dim=1) ** 2).mean().sqrt() / full.norm())
    averaged = relative(estimates.mean(0), full)
    assert single > 0.3  # one subsample is far off...
    assert averaged < 2.0 * single / seeds**0.5  # ...the average over seeds converges to the full sum
    # every batch is sampled at the same rate cap / n
    start = 0
    for size in sizes:
        rate = float(counts[start : start + size].sum()) / (size * seeds)
        assert rate == pytest.approx(cap / n, rel=0.05)
        start += size


def test_reservoir_weight_counts_only_nonzero_adjoints():
    n, cap = 200, 50
    z, p = random_pairs(n, 5, 3, seed=12)
    p[100:] = 0.0  # half the tokens do not influence the loss
    accumulator = PairAccumulator("pairs", 1.0, cap, 3, DTYPE, generator(0))
    feed(accumulator, z, p, [120, 80])
    kept = accumulator.p.clone()
    operator = accumulator.operator(2)
    assert accumulator.tokens_seen == n
    assert accumulator.tokens_used == cap
    assert operator.scale == pytest.approx(100 / cap)  # population = tokens with a non-zero adjoint
    assert float(kept.abs().amax(dim=1).min()) > 0
    torch.testing.assert_close(operator.p, kept / 2)  # J is the mean over the 2 batches
    assert accumulator.operator(2).p is operator.p  # divided once, in place (no second copy of the adjoints)


def test_lanczos_float32_with_fewer_tokens_than_steps():
    """A position with fewer tokens than Lanczos steps (a classifier's last block sees only the CLS tokens):
    the Krylov space runs out, and float32 Lanczos must still match the exact top eigenvalue."""
    from hf_topoadapt.sensitivity.operators import TokenPairs
    from hf_topoadapt.sensitivity.solvers import exact_spectrum, lanczos_spectrum

    g = torch.Generator().manual_seed(3)
    z = torch.cat([torch.randn(32, 96, generator=g), torch.ones(32, 1)], dim=1)
    p = torch.randn(32, 96, generator=g) * 1e-2
    operator = TokenPairs(z.float(), p.float(), 1.0)
    exact = exact_spectrum(TokenPairs(z.double(), p.double(), 1.0)).top
    approx = lanczos_spectrum(operator, generator=torch.Generator().manual_seed(0)).top
    assert approx == pytest.approx(exact, rel=1e-4)
