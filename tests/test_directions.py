"""Optimised output directions on wide positions: the warm-started Lanczos path agrees with LAPACK's eigh."""

from __future__ import annotations

import pytest
import torch

from hf_topoadapt.sensitivity import directions as directions_module
from hf_topoadapt.sensitivity.directions import _top_eigenpair, optimized_directions
from hf_topoadapt.sensitivity.operators import TokenPairs
from hf_topoadapt.sensitivity.solvers import exact_spectrum


def _wide_operator(dtype: torch.dtype, q: int = 600, tokens: int = 900, outputs: int = 12) -> TokenPairs:
    generator = torch.Generator().manual_seed(3)
    mixing = torch.randn(q, q, generator=generator, dtype=dtype) / q**0.5  # correlated features, like conv patches
    z = torch.randn(tokens, q, generator=generator, dtype=dtype) @ mixing
    p = torch.randn(tokens, outputs, generator=generator, dtype=dtype)
    return TokenPairs(z, p, curvature=0.5)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_lanczos_path_matches_dense_eigh(monkeypatch, dtype, rel):
    operator = _wide_operator(dtype)
    assert operator.num_features > directions_module.DENSE_EIGH_MAX
    spectrum = exact_spectrum(operator, keep=8)
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m.shape) or real_eigh(m))
    wide = optimized_directions(operator, spectrum, 3)
    assert not [shape for shape in calls if shape[-1] > directions_module.DENSE_EIGH_MAX]  # no full (q x q) eigh
    monkeypatch.setattr(directions_module, "DENSE_EIGH_MAX", 10**9)
    dense = optimized_directions(operator, spectrum, 3)
    assert torch.allclose(wide.values, dense.values, rtol=rel, atol=0)
    # same vectors with the same sign: the sign decides the line search's direction downstream
    assert torch.allclose(wide.down, dense.down, atol=100 * rel)
    assert torch.allclose(wide.up, dense.up, atol=100 * rel)
    # each value is F(u, w) of the returned pair, and the ascent never ends below the best axis
    for j in range(3):
        value = wide.up[:, j] @ operator.quadratic_per_row(wide.down[j])
        assert float(value) == pytest.approx(float(wide.values[j]), rel=rel)
    assert float(wide.values[0]) >= spectrum.top * (1 - rel)


def test_lanczos_eigenpair_is_never_below_the_start_and_has_a_canonical_sign():
    generator = torch.Generator().manual_seed(0)
    q = 700
    basis, _ = torch.linalg.qr(torch.randn(q, q, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(-1.0, 1.0, q, dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    start = torch.randn(q, generator=generator, dtype=torch.float64)
    start = start / start.norm()
    value, vector = _top_eigenpair(matrix, start=start)
    assert value >= float(start @ matrix @ start)
    assert value == pytest.approx(1.0, rel=1e-8)
    assert abs(float(vector @ basis[:, -1])) == pytest.approx(1.0, abs=1e-6)
    assert float(vector[int(vector.abs().argmax())]) > 0
    negated_value, negated = _top_eigenpair(matrix, start=-start)
    assert negated_value == pytest.approx(value, rel=1e-10)
    assert torch.allclose(negated, vector, atol=1e-8)
