"""benchmarks/transfer_epochs.py on synthetic runs (no training): which runs count as cut short, and the training
length chosen on validation (the shortest within a point of the best, over every method)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.transfer_epochs import SEEDS, alone, choose_length, truncation  # noqa: E402
from recipes.experiment import RunResult  # noqa: E402


def run(method, seed, epochs, validation, best_epoch, lr=0.01) -> RunResult:
    return RunResult(method, 10, seed, 0.0, 100, 0.0, lr, epochs, 0.1, 1.0, 0.01, "", [], validation=validation,
                     best_epoch=best_epoch)  # fmt: skip


def test_runs_peaking_in_the_last_tenth_count_as_cut_short():
    runs = [run("lora", 0, 10, 0.5, 10), run("lora", 1, 10, 0.5, 9), run("topo", 0, 10, 0.5, 5)]
    t = truncation(runs + [run("topo", 1, 10, 0.5, 8)])
    assert t["late_share"] == pytest.approx(0.5) and t["median_best_epoch"] == 8.5 and t["epochs"] == [10]


def test_the_shortest_length_within_a_point_of_the_best_is_chosen():
    plan = {"epochs": [10, 30, 50], "rates": {"lora": 0.01, "topo": 0.01}}
    accuracy = {10: (0.70, 0.60), 30: (0.83, 0.85), 50: (0.86, 0.83)}  # means 0.65, 0.84, 0.845
    runs = [
        run(method, seed, epochs, accuracy[epochs][i] + 0.01 * (seed - 1), epochs)
        for epochs in accuracy for i, method in enumerate(plan["rates"]) for seed in SEEDS
    ]  # fmt: skip
    runs.append(run("lora", 0, 30, 0.0, 30, lr=0.1))  # another rate: not a candidate
    chosen = choose_length(runs, plan)
    assert chosen["rows"][30]["mean"] == pytest.approx(0.84)
    assert chosen["chosen"] == 30  # 50 is better by half a point: within the tie
    assert alone(chosen) == "lora 50, topo 30"  # LoRA alone gains 3 points at 50
    accuracy[50] = (0.88, 0.86)
    runs = [r for r in runs if r.epochs != 50] + [
        run(m, s, 50, accuracy[50][i], 50) for i, m in enumerate(plan["rates"]) for s in SEEDS
    ]  # fmt: skip
    assert choose_length(runs, plan)["chosen"] == 50


def test_a_length_without_every_seed_of_every_method_is_not_a_candidate():
    plan = {"epochs": [10, 30], "rates": {"lora": 0.01, "topo": 0.01}}
    runs = [run(m, s, 10, 0.7, 10) for m in plan["rates"] for s in SEEDS] + [run("lora", 0, 30, 0.99, 30)]
    assert choose_length(runs, plan)["chosen"] == 10 and 30 not in choose_length(runs, plan)["rows"]
