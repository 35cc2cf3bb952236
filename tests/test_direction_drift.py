"""benchmarks/direction_drift.py: the rows' cosine and norm ratio after each step on a tiny TopoModel, and the report
from synthetic runs (no training)."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import hf_topoadapt as hta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import direction_drift as dd  # noqa: E402

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models


def test_row_drift_starts_at_one_and_follows_a_turned_row():
    base, batches, *_ = models.hf_bert(0)
    config = hta.TopoAdapterConfig(num_adapters=1, modules_to_save=["classifier"], line_search_steps=4)
    model = hta.get_topo_model(base, config, calibration_data=batches)
    drift = dd.RowDrift()
    drift.on_train_begin(None, None, None, model=model)
    drift.on_step_end(None, SimpleNamespace(global_step=1), None, model=model)
    assert drift.log[0]["cosine"] == pytest.approx(1.0) and drift.log[0]["norm_ratio"] == pytest.approx(1.0)
    (weight,) = [m.weight for n, m in model.named_modules() if n.endswith("topo_down.default")]
    with torch.no_grad():
        weight[0] = -2 * weight[0]  # the first row reversed and doubled, the others unchanged
    drift.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)
    rows = weight.shape[0]
    assert drift.log[1]["min_cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert drift.log[1]["cosine"] == pytest.approx((rows - 2) / rows, abs=1e-5)
    assert drift.log[1]["norm_ratio"] == pytest.approx((rows + 1) / rows, abs=1e-5)
    assert drift.log[1]["along"] == pytest.approx((rows - 3) / rows, abs=1e-5)  # -2 for the first row, 1 elsewhere


def test_report_reads_the_step_or_the_last_one_of_a_shorter_run(tmp_path):
    def record(recipe, seed, cosines):
        drift = [
            {"step": i + 1, "cosine": c, "min_cosine": c - 0.1, "norm_ratio": 1 + i, "along": 1.0}
            for i, c in enumerate(cosines)
        ]
        return {"key": dd.run_key(recipe, seed, dd.METHOD), "recipe": recipe, "seed": seed, "drift": drift}

    with open(tmp_path / "direction_drift_runs.jsonl", "w") as f:
        for r in (record("vit_digits", 0, [1.0, 0.8, 0.6]), record("vit_digits", 1, [1.0, 0.6, 0.4, 0.2])):
            f.write(json.dumps(r) + "\n")
    summary = dd.report(["vit_digits"], str(tmp_path))
    assert summary["vit_digits"][2]["cosine"] == pytest.approx(0.7)
    assert summary["vit_digits"][40]["cosine"] == pytest.approx(0.4)  # each run's last step: 0.6 and 0.2
    assert (tmp_path / "direction_drift.png").exists() and "| vit_digits | 2 | 3 |" in (
        tmp_path / "direction_drift.md"
    ).read_text()
