"""benchmarks/run_sensitivity.py: the perturbation moves every trainable weight by about its relative scale and
leaves zeros and frozen weights alone; the report reads synthetic pairs of runs (no training)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import run_sensitivity as rs  # noqa: E402


def test_perturb_scales_trainable_weights_only_and_keeps_zeros():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    model[0].requires_grad_(False)
    with torch.no_grad():
        model[1].bias.zero_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert rs.perturb(model, 1e-3, seed=0) == 64 * 4 + 4
    after = dict(model.named_parameters())
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["1.bias"], before["1.bias"])
    relative = (after["1.weight"] / before["1.weight"] - 1).detach()
    assert 0.5e-3 < relative.std().item() < 2e-3
    again = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    again.load_state_dict(before)
    again[0].requires_grad_(False)
    rs.perturb(again, 1e-3, seed=0)  # the same seed draws the same noise
    assert torch.equal(again[1].weight, after["1.weight"])


def test_report_averages_absolute_changes_per_method(tmp_path):
    def record(method, seed, test, moved):
        runs = {
            "as_built": {"validation": 0.5, "test": test, "last_train_loss": 1.0},
            "perturbed": {"validation": 0.5 + moved, "test": test - moved, "last_train_loss": 1.0 + moved},
        }
        return {"key": rs.run_key("effnet_mnist", seed, method), "recipe": "effnet_mnist", "method": method, **runs}

    with open(tmp_path / "run_sensitivity_runs.jsonl", "w") as f:
        for r in (record("topo", 0, 0.7, 0.1), record("topo", 1, 0.5, 0.3), record("lora", 0, 0.7, 0.0)):
            f.write(json.dumps(r) + "\n")
    summary = rs.report(["effnet_mnist"], str(tmp_path))
    topo = summary["effnet_mnist"]["topo"]
    assert topo["test"] == pytest.approx(0.2) and topo["largest_test"] == pytest.approx(0.3)
    assert topo["test_std"] == pytest.approx(0.1414, abs=1e-4) and topo["seeds"] == 2
    assert summary["effnet_mnist"]["lora"]["validation"] == 0.0
    assert "| effnet_mnist | topo | 2 |" in (tmp_path / "run_sensitivity.md").read_text()
