"""Initial directions of a new layer T(h) = h + U sigma(D z): which neurons, and along what.

Coordinate directions are the paper's layer: output columns of U are axes e_r and row r of D is the
sum of the kept eigenvectors of block r (METHOD.md section 4). Optimised directions let each output
column be any unit vector u and maximise F(u, w) = c sum (u . p)(w . z)^2 by alternating ascent
(METHOD.md section 5). Either way the predicted loss decrease at step eps is (eps^2 / 2) * sum(values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .operators import BlockOperator
from .precision import full_precision
from .solvers import Spectrum, lanczos


@dataclass
class Directions:
    down: torch.Tensor  # (m, q): rows of [D | b]
    up: torch.Tensor  # (d_out, m): unit output columns
    values: torch.Tensor  # (m,): second-order gain of each neuron, phi_i^T Q phi_i (or F(u_i, w_i))
    kind: str  # "coordinate" or "optimized"

    @property
    def num_neurons(self) -> int:
        return self.down.shape[0]

    @property
    def rows(self) -> list[int]:
        """The output neuron of each neuron (its column's axis); meaningful for coordinate directions."""
        return self.up.abs().argmax(dim=0).tolist()

    @property
    def value(self) -> float:
        """phi^T Q phi of the whole initialisation: the loss falls by (eps^2 / 2) * value to second order."""
        return self.values.sum().tolist()


def kept_eigenpairs(spectrum: Spectrum, eps_s: float, max_neurons: int | None) -> torch.Tensor:
    """Indices into the spectrum of the eigenpairs with lambda_i >= (1 - eps_s) * lambda_1 and lambda_i > 0, in
    descending order, skipping those that would need a neuron (output row) beyond the first max_neurons.

    Bookkeeping on a few dozen numbers, done on host lists (one read of the spectrum, no device round trips)."""
    values, rows = spectrum.eigenvalues.tolist(), spectrum.rows.tolist()
    kept: list[int] = []
    if values and values[0] > 0:
        rows_seen: set[int] = set()
        for index, (value, row) in enumerate(zip(values, rows, strict=True)):
            if not (value >= (1.0 - eps_s) * values[0] and value > 0):
                continue
            if row not in rows_seen and max_neurons is not None and len(rows_seen) >= max_neurons:
                continue
            rows_seen.add(row)
            kept.append(index)
    return torch.tensor(kept, dtype=torch.long, device=spectrum.eigenvalues.device)


@full_precision
def coordinate_directions(
    spectrum: Spectrum, num_outputs: int, eps_s: float = 0.5, max_neurons: int | None = None
) -> Directions:
    """The paper's layer: one neuron per output row r that owns a kept eigenvector (at most max_neurons rows).

    Kept eigenvectors of the same block are summed into that row; being orthogonal, their gains add.
    """
    kept = kept_eigenpairs(spectrum, eps_s, max_neurons)
    if kept.numel() == 0:
        raise ValueError(
            f"no direction lowers the loss to second order here: the largest eigenvalue is {spectrum.top:.4g} <= 0"
        )
    # Rows in order of first appearance in the descending spectrum, so neuron 0 is the strongest.
    row_of_neuron: dict[int, int] = {}
    kept_rows = spectrum.rows[kept].tolist()
    for r in kept_rows:
        row_of_neuron.setdefault(r, len(row_of_neuron))
    device = spectrum.vectors.device
    neuron = torch.tensor([row_of_neuron[r] for r in kept_rows], device=device)
    m, q = len(row_of_neuron), spectrum.vectors.shape[1]
    down = spectrum.vectors.new_zeros(m, q).index_add_(0, neuron, spectrum.vectors[kept])
    values = spectrum.eigenvalues.new_zeros(m).index_add_(0, neuron, spectrum.eigenvalues[kept])
    up = spectrum.vectors.new_zeros(num_outputs, m)
    up[torch.tensor(list(row_of_neuron), device=device), torch.arange(m, device=device)] = 1.0
    return Directions(down, up, values, "coordinate")


@full_precision
@torch.no_grad()
def optimized_directions(
    operator: BlockOperator,
    spectrum: Spectrum,
    num_neurons: int,
    iterations: int = 20,
    tol: float = 1e-10,
    solver: str = "dense",
) -> Directions:
    """Greedy alternating ascent on F(u, w) = c sum_n (u . p_n)(w . z_n)^2 with |u| = |w| = 1.

    Neuron j starts from the j-th best axis (the coordinate solution), keeps u orthogonal to the earlier
    columns, and alternates: w = top eigenvector of sum_r u_r Q^(r); u = normalise(projected
    (w^T Q^(r) w)_r). Each step cannot lower F, so the result is >= the best axis value.

    `solver`: "dense" forms sum_r u_r Q^(r) at every step and solves it (LAPACK up to DENSE_EIGH_MAX features,
    Lanczos above); "matrix_free" runs Lanczos warm-started from the previous w on products with the token pairs
    (`mixture_products`), never forming the matrix; an operator kept as dense blocks is solved densely either way
    (its mixture is cheap to form and LAPACK beats Lanczos there); "auto" runs matrix-free only above DENSE_EIGH_MAX
    features, where the dense path runs the same Lanczos on a formed matrix, and LAPACK below. All stay monotone. A
    neuron's ascent stops once a step gains less than `tol` (relative).
    """
    if solver not in OPTIMIZE_SOLVERS:
        raise ValueError(f"solver must be one of {OPTIMIZE_SOLVERS}, got {solver!r}")
    d_out, q = operator.num_outputs, operator.num_features
    vectors = spectrum.vectors.to(operator.device)  # the spectrum lives on the host, the operator maybe not
    wide_enough = solver == "matrix_free" or (solver == "auto" and q > DENSE_EIGH_MAX)
    matrix_free = wide_enough and operator.matrix_free
    spectrum_rows = spectrum.rows.tolist()
    start_rows = list(dict.fromkeys(spectrum_rows))
    ups, downs, values = [], [], []
    for j in range(num_neurons):
        u = vectors.new_zeros(d_out)
        if j < len(start_rows):
            u[start_rows[j]] = 1.0
            w = vectors[spectrum_rows.index(start_rows[j])].clone()
        else:
            u = torch.randn(d_out, dtype=u.dtype).to(u.device)
            w = torch.randn(q, dtype=u.dtype).to(u.device)
        u = _orthogonalise(u, ups)
        w = w / w.norm()
        value = float(u @ operator.quadratic_per_row(w))
        for _ in range(iterations):
            gains = operator.quadratic_per_row(w)
            u_new = _orthogonalise(gains, ups)
            if not torch.isfinite(u_new).all():
                break
            if matrix_free:
                top = _top_eigenpair_products(operator.mixture_products(u_new), w)
            else:
                mixture = operator.mixture(u_new)
                top = _top_eigenpair(0.5 * (mixture + mixture.T), start=w)
            if top is None:  # LAPACK gave up even in float64: keep the best pair found so far
                break
            new_value, w_new = top
            if new_value <= value + tol * max(1.0, abs(value)):
                if new_value > value:
                    u, w, value = u_new, w_new, new_value
                break
            u, w, value = u_new, w_new, new_value
        ups.append(u)
        downs.append(w)
        values.append(value)
    return Directions(
        torch.stack(downs),
        torch.stack(ups, dim=1),
        torch.tensor(values, dtype=vectors.dtype, device=vectors.device),
        "optimized",
    )


# Above this width the top eigenpair comes from warm-started Lanczos: a full eigh of a (q x q) mixture per ascent
# step dominated adapting EfficientNet (3x3 convs over hundreds of channels: q in the thousands, 0.2 s a call).
DENSE_EIGH_MAX = 512
LANCZOS_STEPS = 40
LANCZOS_RESTARTS = 10
OPTIMIZE_SOLVERS = ("dense", "matrix_free", "auto")


def _top_eigenpair(matrix: torch.Tensor, start: torch.Tensor | None = None) -> tuple[float, torch.Tensor] | None:
    """Largest eigenvalue and its unit vector of a symmetric matrix.

    Small matrices: LAPACK's eigh, retried in float64 when it fails to converge (it can on a badly scaled float32
    matrix). Wide ones with a `start` vector (the previous ascent step's w): restarted Lanczos from it. Its Krylov
    space contains `start`, so the returned value is never below start's Rayleigh quotient, which is all the
    alternating ascent needs to stay monotone; it stops once the residual is below a dtype-scaled tolerance."""
    if matrix.shape[0] > DENSE_EIGH_MAX and start is not None:
        return _top_eigenpair_lanczos(matrix, start)
    for dtype in (matrix.dtype, torch.float64):
        try:
            values, vectors = torch.linalg.eigh(matrix.to(dtype))
        except torch.linalg.LinAlgError:
            continue
        return float(values[-1]), _canonical_sign(vectors[:, -1].to(matrix.dtype))
    return None


def _canonical_sign(w: torch.Tensor) -> torch.Tensor:
    """w with its largest-magnitude entry positive. F(u, w) does not depend on w's sign, but the layer's third-order
    terms do (the line search's eps sign follows them), so both solvers must hand out the same sign."""
    return w if float(w[int(w.abs().argmax())]) >= 0 else -w


def _top_eigenpair_lanczos(matrix: torch.Tensor, start: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    w = _lanczos_top(lambda x: x @ matrix, start)
    return None if w is None else (float(w @ matrix @ w), w)


def _top_eigenpair_products(
    products: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor
) -> tuple[float, torch.Tensor] | None:
    """`_top_eigenpair_lanczos` of the symmetric matrix behind `products` (x -> x M for rows x)."""
    w = _lanczos_top(products, start)
    return None if w is None else (float(products(w[None])[0] @ w), w)


def _lanczos_tol(dtype: torch.dtype) -> float:
    """The relative residual at which a top Ritz pair counts as converged."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _lanczos_top(products: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> torch.Tensor | None:
    """The top eigenvector (canonical sign) by restarted Lanczos from `start`; None when it breaks down."""
    # A private generator: Lanczos draws a spare direction each step, which must not move the caller's RNG stream
    # (training that follows insertion would otherwise change with the solver).
    generator = torch.Generator(device=start.device).manual_seed(0)
    tol = _lanczos_tol(start.dtype)
    v = start[None]
    for _ in range(LANCZOS_RESTARTS):
        values, vectors, residuals = lanczos(products, v, LANCZOS_STEPS, generator, tol=tol)
        v = vectors[:, -1]
        if not torch.isfinite(v).all():
            return None
        if float(residuals[0, -1]) <= tol * max(abs(float(values[0, -1])), torch.finfo(start.dtype).tiny):
            break
    return _canonical_sign(v[0] / v[0].norm())


def _orthogonalise(vector: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """The unit vector along `vector` minus its components along the orthonormal `basis`: Gram-Schmidt twice, which
    keeps it orthogonal to rounding also when `vector` lies almost in the basis' span (few tokens, many neurons).

    When nothing of `vector` is left (it lies in the span: all the tokens' adjoints are used up), the axis least
    covered by the basis is used instead, so the new column is still orthogonal to the others."""
    scale = vector.norm()
    for _ in range(2):
        for b in basis:
            vector = vector - (vector @ b) * b
    if basis and vector.norm() <= 1e-6 * scale:
        covered = torch.stack(basis).pow(2).sum(dim=0)  # squared length of each axis inside the span
        vector = torch.zeros_like(vector)
        vector[int(torch.argmin(covered))] = 1.0
        for _ in range(2):
            for b in basis:
                vector = vector - (vector @ b) * b
    return vector / vector.norm()
