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


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-6), (torch.float32, 2e-3)])
@pytest.mark.parametrize("q", [40, 600])  # below and above the width where the dense path switches to Lanczos
def test_matrix_free_ascent_reaches_the_dense_objective_without_forming_a_matrix(monkeypatch, dtype, rel, q):
    operator = _wide_operator(dtype, q=q, tokens=3 * q // 2)
    spectrum = exact_spectrum(operator, keep=8)
    dense = optimized_directions(operator, spectrum, 3)
    monkeypatch.setattr(TokenPairs, "mixture", lambda *_: pytest.fail("the matrix-free ascent formed a mixture"))
    free = optimized_directions(operator, spectrum, 3, solver="matrix_free")
    # the same objective up to the solver's tolerance (the ascent stops once a step gains less than it)
    assert float(free.values.sum()) == pytest.approx(float(dense.values.sum()), rel=rel)
    for j in range(3):  # each value is F(u, w) of the returned pair, u unit and orthogonal to the earlier ones
        value = free.up[:, j] @ operator.quadratic_per_row(free.down[j])
        assert float(value) == pytest.approx(float(free.values[j]), rel=1e-4 if dtype == torch.float32 else 1e-9)
    gram = free.up.T @ free.up
    assert torch.allclose(gram, torch.eye(3, dtype=dtype), atol=1e-5 if dtype == torch.float32 else 1e-10)
    assert torch.allclose(free.down.norm(dim=1), torch.ones(3, dtype=dtype), atol=1e-5)
    assert float(free.values[0]) >= spectrum.top * (1 - rel)  # never below the best axis


def test_matrix_free_ascent_on_dense_blocks_is_the_dense_ascent():
    from hf_topoadapt.sensitivity.operators import DenseBlocks

    pairs = _wide_operator(torch.float64, q=30, tokens=60, outputs=5)
    operator = DenseBlocks(pairs.blocks(torch.arange(5)))
    assert not operator.matrix_free and operator.restrict(torch.tensor([0, 2])).matrix_free is False
    spectrum = exact_spectrum(operator, keep=4)
    dense = optimized_directions(operator, spectrum, 2)
    free = optimized_directions(operator, spectrum, 2, solver="matrix_free")
    assert torch.equal(free.down, dense.down) and torch.equal(free.up, dense.up)


def test_an_unknown_ascent_solver_is_a_clear_error():
    import hf_topoadapt as hta

    operator = _wide_operator(torch.float64, q=20, tokens=30, outputs=3)
    with pytest.raises(ValueError, match="solver must be one of"):
        optimized_directions(operator, exact_spectrum(operator, keep=2), 1, solver="lobpcg")
    with pytest.raises(ValueError, match=r"optimize_solver must be one of \('dense', 'matrix_free', 'auto'\)"):
        hta.TopoAdapterConfig(optimize_solver="lobpcg")
    with pytest.raises(ValueError, match="optimize_tol must be >= 0.0"):
        hta.TopoAdapterConfig(optimize_tol=-1e-3)


def test_matrix_free_ascent_finds_the_dense_neurons():
    operator = _wide_operator(torch.float64, q=80, tokens=120, outputs=6)
    spectrum = exact_spectrum(operator, keep=6)
    dense = optimized_directions(operator, spectrum, 4)
    free = optimized_directions(operator, spectrum, 4, solver="matrix_free")
    cosines = (dense.down * free.down).sum(dim=1).abs()
    assert torch.allclose(cosines, torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(free.values, dense.values, rtol=1e-8, atol=0)
    # stopping a neuron's ascent early (a looser tol) is cheaper and never below the best axis
    early = optimized_directions(operator, spectrum, 4, tol=1e-3, solver="matrix_free")
    assert float(early.values[0]) >= spectrum.top * (1 - 1e-9)


def test_auto_goes_matrix_free_only_above_the_dense_width(monkeypatch):
    narrow = _wide_operator(torch.float64, q=60, tokens=90, outputs=5)
    spectrum = exact_spectrum(narrow, keep=4)
    dense = optimized_directions(narrow, spectrum, 2)
    auto = optimized_directions(narrow, spectrum, 2, solver="auto")
    assert torch.equal(auto.down, dense.down) and torch.equal(auto.up, dense.up)  # LAPACK below: the same run
    monkeypatch.setattr(directions_module, "DENSE_EIGH_MAX", 40)  # now the same position counts as wide
    monkeypatch.setattr(TokenPairs, "mixture", lambda *_: pytest.fail("auto formed a mixture above the width"))
    wide = optimized_directions(narrow, spectrum, 2, solver="auto")
    assert torch.allclose(wide.values, dense.values, rtol=1e-8, atol=0)


def test_mixture_products_are_the_mixture():
    operator = _wide_operator(torch.float64, q=25, tokens=40, outputs=4)
    u = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mixture = operator.mixture(u)
    assert torch.allclose(operator.mixture_products(u)(x), x @ mixture, atol=1e-12)
    rows = torch.tensor([3, 1])
    restricted = operator.restrict(rows)
    assert restricted.matrix_free
    v = u[:2]
    assert torch.allclose(restricted.mixture_products(v)(x), x @ restricted.mixture(v), atol=1e-12)
    from hf_topoadapt.sensitivity.operators import _Rows

    view = _Rows(operator, rows)  # the generic view forwards to its parent's products
    assert view.matrix_free and torch.allclose(view.mixture_products(v)(x), x @ view.mixture(v), atol=1e-12)
