"""Cross-fitted values (METHOD.md section 8): each part's top eigenvector per row, measured on the other part."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS

import hf_topoadapt as hta
from hf_topoadapt.sensitivity.crossfit import cross_fitted_values, top_vectors
from hf_topoadapt.sensitivity.operators import DenseBlocks, TokenPairs


def random_pairs(tokens: int, q: int, d_out: int, seed: int, spike: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, q, generator=g, dtype=torch.float64)
    z[:, 0] *= 1.0 + spike  # a well separated top eigenvector, so a short Lanczos run converges
    p = torch.randn(tokens, d_out, generator=g, dtype=torch.float64).abs()
    return z, p


def test_values_are_each_parts_top_vector_measured_on_the_other():
    a = DenseBlocks(TokenPairs(*random_pairs(30, 6, 4, 0), 1.0).blocks(torch.arange(4)))
    b = DenseBlocks(TokenPairs(*random_pairs(30, 6, 4, 1), 1.0).blocks(torch.arange(4)))
    rows = torch.tensor([3, 1])
    values = cross_fitted_values(a, b, rows)
    for i, r in enumerate(rows.tolist()):
        va = torch.linalg.eigh(a._blocks[r])[1][:, -1]
        vb = torch.linalg.eigh(b._blocks[r])[1][:, -1]
        expected = va @ b._blocks[r] @ va + vb @ a._blocks[r] @ vb
        assert torch.allclose(values[i], expected, rtol=1e-12)


def test_identical_parts_give_the_full_top_eigenvalue():
    """With Q_A = Q_B = Q/2 nothing is noise: the value is the top eigenvalue of Q itself."""
    half = DenseBlocks(TokenPairs(*random_pairs(40, 5, 3, 2), 1.0).blocks(torch.arange(3)))
    full = torch.linalg.eigvalsh(2 * half._blocks)[:, -1]
    assert torch.allclose(cross_fitted_values(half, half, torch.arange(3)), full, rtol=1e-12)


def test_a_noise_direction_scores_lower_cross_fitted_than_plain():
    """Independent halves of pure noise: the plain top eigenvalue is large, the cross-fitted value is not."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 20, 12, generator=g, dtype=torch.float64)
    p = torch.randn(2, 20, 8, generator=g, dtype=torch.float64)  # zero-mean adjoints: E[Q] = 0
    a, b = TokenPairs(z[0], p[0], 1.0), TokenPairs(z[1], p[1], 1.0)
    plain = torch.linalg.eigvalsh(a.blocks(torch.arange(8)) + b.blocks(torch.arange(8)))[:, -1]
    crossed = cross_fitted_values(a, b, torch.arange(8))
    assert float(plain.min()) > 0 and float(crossed.mean()) < 0.25 * float(plain.mean())


def test_matrix_free_top_vectors_match_the_dense_ones():
    z, p = random_pairs(200, 40, 3, 4, spike=3.0)
    pairs = TokenPairs(z, p, 1.0)
    dense = DenseBlocks(pairs.blocks(torch.arange(3)))
    free, exact = top_vectors(pairs, iterations=30, generator=torch.Generator().manual_seed(0)), top_vectors(dense)
    assert torch.allclose((free * exact).sum(1).abs(), torch.ones(3, dtype=torch.float64), atol=1e-8)


def doubled(batches):
    """Every example twice in a row: the alternate split then gives two identical halves."""
    return [{k: v.repeat_interleave(2, dim=0) for k, v in batch.items()} for batch in batches]


def test_scoring_keeps_the_plain_eigenvalue_and_ranks_by_the_cross_fitted_one():
    model, batches, _, _, _ = BUILDERS["hf_bert"]()
    plain = hta.score_positions(model, batches)
    crossed = hta.score_positions(model, batches, hta.ScoringConfig(crossfit=True))
    for p, c in zip(plain, crossed, strict=True):
        assert c.eigenvalue == pytest.approx(p.eigenvalue, rel=1e-10)  # Q_A + Q_B is Q
        assert p.crossfit_eigenvalue is None and c.crossfit_eigenvalue < c.eigenvalue  # noise removed
        assert c.as_dict()["crossfit_eigenvalue"] == c.crossfit_eigenvalue
    same = hta.score_positions(model, doubled(batches), hta.ScoringConfig(crossfit=True))
    for s in same:  # identical halves: nothing is noise, the cross-fitted value is the top eigenvalue itself
        assert s.crossfit_eigenvalue == pytest.approx(s.eigenvalue, rel=1e-9)


def test_insertion_goes_where_the_cross_fitted_value_is_best(monkeypatch):
    model, batches, _, _, _ = BUILDERS["hf_bert"]()
    scores = hta.score_positions(model, batches, hta.ScoringConfig(crossfit=True))
    best = max(scores, key=lambda s: s.crossfit_eigenvalue)
    record = hta.insert_layer(model, batches, hta.ScoringConfig(crossfit=True))
    assert record.accepted and record.position == best.name
    assert record.crossfit_gain == pytest.approx(best.crossfit_eigenvalue, rel=1e-12)
    assert record.num_neurons == len(best.neurons) >= 1


def test_one_example_cannot_be_split():
    model, batches, _, _, _ = BUILDERS["hf_bert"]()
    single = [{k: v[:1] for k, v in batches[0].items()}]
    with pytest.raises(ValueError, match="cross-fitting splits the calibration examples in two, and only 1 were seen"):
        hta.score_positions(model, single, hta.ScoringConfig(crossfit=True))
