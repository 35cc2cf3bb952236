"""benchmarks/setup_stability.py: how two builds of one setup are compared, and the report over synthetic pairs (no
model is built)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import setup_stability as ss  # noqa: E402


def build(positions, neurons, eps):
    return {"positions": positions, "neurons": neurons, "eps": eps, "loss_after": 1.0}


def pair(method, seed, a, b):
    return {"key": ss.run_key("effnet_mnist", seed, method), "recipe": "effnet_mnist", "method": method, "seed": seed,
            "as_loaded": a, "perturbed": b}  # fmt: skip


def test_positions_compare_as_sets_and_steps_by_their_largest_ratio():
    a = build(["x", "y"], [4, 2], [0.01, -0.002])
    same_order = pair("greedy", 0, a, build(["y", "x"], [2, 4], [-0.008, 0.0025]))
    assert ss.compare(same_order) == {"same_positions": True, "same_neurons": True, "eps_ratio": pytest.approx(4.0)}
    other_neurons = pair("greedy", 0, a, build(["x", "y"], [4, 3], [0.01, -0.002]))
    assert ss.compare(other_neurons) == {"same_positions": True, "same_neurons": False, "eps_ratio": 1.0}
    moved = ss.compare(pair("greedy", 0, a, build(["x", "z"], [4, 2], [0.02, 0.1])))
    assert not moved["same_positions"] and not moved["same_neurons"] and moved["eps_ratio"] == pytest.approx(2.0)
    assert ss.compare(pair("greedy", 0, a, build(["z"], [1], [0.1])))["eps_ratio"] is None


def test_report_counts_seeds_that_kept_their_choices(tmp_path):
    a = build(["x", "y"], [4, 2], [0.01, 0.002])
    records = [
        pair("greedy", 0, a, build(["x", "z"], [4, 2], [0.04, 0.002])),
        pair("greedy", 1, a, a),
        pair("score_once", 0, a, build(["x", "y"], [4, 2], [0.01, 0.003])),
    ]
    with open(tmp_path / "setup_stability_runs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = ss.report(["effnet_mnist"], str(tmp_path))
    greedy = summary["effnet_mnist"]["greedy"]
    assert (greedy["seeds"], greedy["same_positions"], greedy["same_neurons"]) == (2, 1, 1)
    assert greedy["median_eps_ratio"] == pytest.approx(2.5) and greedy["largest_eps_ratio"] == pytest.approx(4.0)
    assert summary["effnet_mnist"]["score_once"]["largest_eps_ratio"] == pytest.approx(1.5)
    assert "| effnet_mnist | `greedy` | 2 | 1 | 1 | 2.50 | 4.00 |" in (tmp_path / "setup_stability.md").read_text()
