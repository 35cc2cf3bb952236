"""benchmarks/setup_cost.py's bookkeeping on synthetic runs (no recipe is built): phases and the epoch averaged per
recipe, each as epochs of its own run, the time outside the phases kept as `other`, the report and the plot written;
and its epoch timer trains the model it is given."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import setup_cost as sc  # noqa: E402


def row(recipe, seed, epoch, **phases):
    values = {phase: phases.get(phase, 0.0) for phase in sc.PHASES}
    return {
        "recipe": recipe, "seed": seed, "per_class": 8, "lora_rank": 2, "setup_seconds": sum(values.values()) + 0.5,
        "phases": values, "epoch_seconds": epoch, "insertions": 3, "batches": 4,
    }  # fmt: skip


def test_phases_are_averaged_per_recipe_as_epochs_of_their_own_run(tmp_path):
    rows = [
        row("minilm_topics", 0, 1.0, capture=2.0, eigen_solves=1.0, directions=4.0, line_search=3.0),
        row("minilm_topics", 1, 2.0, capture=2.0, eigen_solves=1.0, directions=4.0, line_search=3.0),
        row("vit_digits", 0, 0.1, capture=0.3, line_search=0.2),
    ]
    table = sc.summary(rows)
    minilm = table["minilm_topics"]
    assert minilm["seeds"] == [0, 1] and minilm["epoch_seconds"] == pytest.approx(1.5)
    assert minilm["setup_epochs"] == pytest.approx((10.5 / 1.0 + 10.5 / 2.0) / 2)  # per-seed ratios, averaged
    assert minilm["phase_epochs"]["directions"] == pytest.approx((4.0 + 2.0) / 2)
    assert minilm["phase_seconds"]["other"] == pytest.approx(0.5)  # setup outside the timed phases
    assert table["vit_digits"]["phase_epochs"]["capture"] == pytest.approx(3.0)
    text = sc.report(table, threads=1)
    assert "| minilm_topics | [0, 1] | 1.50 | 10.50 | 7.9 |" in text
    assert "4.00 s (3.0)" in text  # directions: seconds and epochs
    sc.plot(table, str(tmp_path / "setup_cost.png"))
    assert (tmp_path / "setup_cost.png").stat().st_size > 0


def test_the_epoch_timer_trains_the_trainable_parameters():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [{"input_ids": torch.randint(0, 50, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]
    assert sc.epoch_seconds(model, batches, lr=1e-2) > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
