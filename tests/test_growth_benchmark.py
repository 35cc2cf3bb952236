"""The growth benchmark's data generators and an end-to-end run of its quick preset (benchmarks/growth.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

growth_tasks = pytest.importorskip("growth_tasks")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def manufactured_error(n: int, k: float = 2.5) -> float:
    h = 1.0 / (n + 1)
    x, y = np.meshgrid(h * np.arange(1, n + 1), h * np.arange(1, n + 1), indexing="ij")
    u = growth_tasks.solve_heat(
        lambda x, y: np.full_like(x, k), lambda x, y: 2 * np.pi**2 * k * np.sin(np.pi * x) * np.sin(np.pi * y), n
    )
    return float(np.abs(u - np.sin(np.pi * x) * np.sin(np.pi * y)).max())


def test_heat_solver_is_second_order():
    errors = [manufactured_error(n) for n in (15, 31, 63)]  # h = 1/16, 1/32, 1/64
    assert errors[0] < 1e-2
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        assert 3.5 < coarse / fine < 4.5


def test_heat_solver_positive_source_gives_positive_temperature():
    # Symmetric positive definite operator for any positive k: the solution of a positive source is positive.
    u = growth_tasks.solve_heat(lambda x, y: np.exp(np.sin(3 * x) * y), lambda x, y: np.ones_like(x), 12)
    assert u.shape == (12, 12) and (u > 0).all()


def test_heat_generator_is_deterministic_and_shaped():
    problem = growth_tasks.HeatProblem()
    x1, y1 = problem.generate(6, seed=3)
    x2, y2 = problem.generate(6, seed=3)
    x3, _ = problem.generate(6, seed=4)
    assert x1.shape == (6, problem.sensors_per_side**2) and y1.shape == (6, problem.num_params)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert np.isfinite(x1).all()


def test_heat_splits_are_deterministic_and_shaped():
    task = growth_tasks.TASKS["heat"]
    train, val, test = task.splits(seed=1, train_size=100)
    again, _, _ = task.splits(seed=1, train_size=100)
    other, _, _ = task.splits(seed=2, train_size=100)
    xs = torch.cat([x for x, _ in train])
    assert xs.shape == (100, 25) and torch.cat([y for _, y in train]).shape == (100, 5)
    assert torch.equal(xs, torch.cat([x for x, _ in again])) and not torch.equal(xs, torch.cat([x for x, _ in other]))
    assert sum(len(x) for x, _ in val) == 250 and sum(len(x) for x, _ in test) == 750
    assert xs.mean(0).abs().max() < 1e-10  # standardised with the training statistics


def test_mnist_splits_are_deterministic_and_shaped():
    task = growth_tasks.TASKS["mnist_cnn"]
    train, val, test = task.splits(seed=0, train_size=500)
    again, _, _ = task.splits(seed=0, train_size=500)
    xs = torch.cat([x for x, _ in train])
    assert xs.shape == (500, 1, 14, 14) and torch.equal(xs, torch.cat([x for x, _ in again]))
    assert sum(len(x) for x, _ in val) == 500 and sum(len(x) for x, _ in test) == 2000
    assert set(torch.cat([y for _, y in test]).tolist()) == set(range(10))


def test_quick_benchmark_end_to_end(tmp_path):
    growth = pytest.importorskip("growth")
    result = growth.main(["--quick", "--workers", "1", "--output-dir", str(tmp_path)])
    for name in ("growth_quick.md", "growth_quick.json", "growth_poc.md", "growth_poc.json", "growth_poc.png"):
        assert (tmp_path / name).exists(), name
    data = json.loads((tmp_path / "growth_quick.json").read_text())
    tasks = {t for t in growth.PRESETS["quick"]["tasks"] if not growth.TASKS[t].available()}
    assert {r["task"] for r in data["summary"]} == tasks
    for task in tasks:
        assert (tmp_path / f"growth_quick_curves_{task}.png").exists()
        assert (tmp_path / f"growth_quick_scores_{task}.png").exists()
        methods = {r["method"] for r in data["summary"] if r["task"] == task}
        assert methods == set(growth.QUICK_METHODS)
    for row in data["summary"]:
        for key in ("test_error", "test_error_at_best_val", "depth", "params", "seconds", "growth_fraction"):
            assert all(math.isfinite(v) for v in row[key]), (row["task"], row["method"], key)
    md = (tmp_path / "growth_quick.md").read_text()
    assert all(m in md for m in growth.QUICK_METHODS) and "Lowest mean" in md
    # the topological run of every task grew, and fixed has its final architecture
    for task in tasks:
        rows = {r["method"]: r for r in data["summary"] if r["task"] == task}
        assert rows["topological"]["depth"][0] > growth.TASKS[task].start_depth
        assert rows["fixed"]["params"] == rows["topological"]["params"]
    assert len(result["runs"]) == len(data["runs"])
    poc = json.loads((tmp_path / "growth_poc.json").read_text())
    assert poc["spearman"] > 0.5
    assert all(0.8 < r["ratio_small_eps"] < 1.2 for r in poc["positions"] if r["eigenvalue"] > 0)
