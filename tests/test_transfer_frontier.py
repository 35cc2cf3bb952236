"""benchmarks/transfer_frontier.py's bookkeeping, on synthetic runs (no training): baseline runs of the lr grid and
the lever selection are reused only at the chosen rates (topo runs never), the summary keeps the chosen rate, the
goal of issue 9 is judged per rank, and the report and plots are written."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import transfer_frontier as tf  # noqa: E402
from recipes.experiment import RunResult, load_runs  # noqa: E402
from recipes.methods import DEFAULT_LEVERS, lr_for  # noqa: E402

RECIPE = "vit_digits"
SIZE = tf.SMALLEST[RECIPE]


@pytest.fixture()
def lrs():
    _, _, args = tf.recipe_task(RECIPE, 1, load=False)
    from recipes.cli import recipe_lrs

    return recipe_lrs(args)


def run(method, seed, rank, accuracy, lr, trainable=1000, setup=1.0, epoch=1.0) -> RunResult:
    return RunResult(
        method, SIZE, seed, accuracy, trainable, 0.0, lr, 10, epoch, setup, 0.01, "", [], lora_rank=rank,
        validation=accuracy,
    )  # fmt: skip


def write(path, runs) -> None:
    with open(path, "w") as f:
        for r in runs:
            f.write(json.dumps(asdict(r)) + "\n")


def test_reuse_takes_baseline_runs_at_the_chosen_rates_and_never_topo_runs(tmp_path, lrs):
    topo_lr, lora_lr, head_lr = lr_for("topo", lrs), lr_for("lora", lrs), lr_for("head", lrs)
    write(
        tmp_path / f"transfer_lr_grid_{RECIPE}_runs.jsonl",
        [run("lora", 0, 2, 0.6, lora_lr), run("lora", 0, 2, 0.1, lora_lr * 10), run("head", 0, 2, 0.5, head_lr)],
    )
    default = "topo+" + "+".join(sorted(DEFAULT_LEVERS))
    write(tmp_path / f"transfer_levers_{RECIPE}_runs.jsonl",
          [run(default, 0, 2, 0.7, topo_lr), run("topo+", 0, 2, 0.5, topo_lr), run("topo", 1, 2, 0.5, topo_lr),
           run("bottleneck_at_topo", 1, 2, 0.5, topo_lr)])  # fmt: skip

    runs_file = tmp_path / f"transfer_frontier_{RECIPE}_runs.jsonl"
    added = tf.reuse_earlier_runs(RECIPE, str(tmp_path), str(runs_file), lrs)
    methods = sorted((r.method, r.lr) for r in load_runs(str(runs_file)).values())
    expected = sorted([("lora", lora_lr), ("head", head_lr)])
    assert methods == expected and added == len(expected)
    assert tf.reuse_earlier_runs(RECIPE, str(tmp_path), str(runs_file), lrs) == 0  # nothing twice
    shorter = run("lora", 1, 2, 0.6, lora_lr)
    shorter.epochs = 3
    write(tmp_path / f"transfer_lr_grid_{RECIPE}_runs.jsonl", [shorter])
    assert tf.reuse_earlier_runs(RECIPE, str(tmp_path), str(runs_file), lrs, epochs=10) == 0  # another length


def test_goal_and_report(tmp_path, lrs):
    runs = []
    for seed in range(3):
        for rank in tf.RANKS:
            runs.append(run("lora", seed, rank, 0.60 + 0.01 * rank + 0.01 * seed, lr_for("lora", lrs), 500 * rank))
            runs.append(run("topo", seed, rank, 0.65 + 0.01 * rank, lr_for("topo", lrs), 510 * rank, setup=1.5))
            runs[-1].test_metrics = {"loss": 0.5 + 0.1 * seed}
            runs.append(run("topo", seed, rank, 0.1, lr_for("topo", lrs) / 10))  # another rate: not the frontier's
        runs.append(run("head", seed, 1, 0.5, lr_for("head", lrs), 100))
    write(tmp_path / f"transfer_frontier_{RECIPE}_runs.jsonl", runs)
    summary = tf.summarise(RECIPE, str(tmp_path))
    rows = summary["rows"]
    assert rows["topo@2"]["accuracy_mean"] == pytest.approx(0.67) and rows["topo@2"]["seeds"] == [0, 1, 2]
    assert rows["lora@2"]["accuracy_mean"] == pytest.approx(0.63) and rows["head@0"]["trainable"] == 100
    goal = summary["goal"]["topo"]
    assert goal["margin_by_rank"][2] == pytest.approx(0.04) and goal["margin_at_r2_met"]
    # paired by seed: 0.05, 0.04, 0.03 at every rank; their standard error is 0.01 / sqrt(3)
    assert goal["paired_by_rank"][2]["mean"] == pytest.approx(0.04)
    assert goal["paired_by_rank"][2]["error"] == pytest.approx(0.01 / 3**0.5)
    assert goal["pooled"]["n"] == 3 * len(goal["margin_by_rank"]) and goal["pooled"]["mean"] == pytest.approx(0.04)
    assert goal["above_lora_everywhere"] and goal["never_worse_than_1_point"]
    assert goal["spread_no_larger"]  # 0 against LoRA's 0.01
    assert goal["setup_in_epochs_max"] == pytest.approx(1.5) and goal["setup_within_2_epochs"]
    tf.report([RECIPE], str(tmp_path))
    text = (tmp_path / "transfer_frontier.md").read_text()
    assert "| topo | 0.660 ± 0.000 (510) |" in text and "head (reference)" in text
    assert rows["topo@2"]["test_loss"] == pytest.approx((0.6, 0.1)) and rows["lora@2"]["test_loss"] is None
    assert "| topo | 0.600 ± 0.100 | 0.600 ± 0.100 |" in text and "| lora | - | - |" in text  # no loss recorded: -
    pooled = f"pooled over the ranks {tf.points(goal['pooled'])} ({goal['pooled']['n']} pairs)"
    assert "r=2 +4.0 ± 0.6" in text and pooled in text and tf.points(goal["pooled"]).startswith("+4.0 ± ")
    assert (tmp_path / f"transfer_frontier_{RECIPE}.png").stat().st_size > 0
    assert json.loads((tmp_path / "transfer_frontier.json").read_text())[RECIPE]["per_class"] == SIZE


def test_a_rank_with_its_own_rate_is_summarised_at_that_rate(tmp_path, lrs, monkeypatch):
    import recipes.cli

    lora_lr = lr_for("lora", lrs)
    ranked = {**lrs, "lora@r8": lora_lr / 10}
    monkeypatch.setattr(recipes.cli, "recipe_lrs", lambda args: ranked)
    runs = [run("lora", seed, 8, 0.1, lora_lr) for seed in range(2)]  # the recipe's-rank rate diverged at r=8
    runs += [run("lora", seed, 8, 0.7, lora_lr / 10) for seed in range(2)]
    runs += [run("lora", seed, 2, 0.6, lora_lr) for seed in range(2)]
    write(tmp_path / f"transfer_frontier_{RECIPE}_runs.jsonl", runs)
    rows = tf.summarise(RECIPE, str(tmp_path))["rows"]
    assert rows["lora@8"]["accuracy_mean"] == pytest.approx(0.7) and rows["lora@8"]["lr"] == pytest.approx(lora_lr / 10)
    assert rows["lora@2"]["lr"] == pytest.approx(lora_lr)
    assert tf.rates_line(rows).startswith(f"lora -, {lora_lr:g}, -, {lora_lr / 10:g}; adalora -, -, -, -")


def test_runs_of_another_training_length_are_left_out(tmp_path, lrs):
    epochs = tf.recipe_task(RECIPE, 1, load=False)[2].epochs
    same = [run("lora", seed, 2, 0.6, lr_for("lora", lrs)) for seed in range(2)]
    longer = [run("lora", seed, 2, 0.9, lr_for("lora", lrs)) for seed in range(3)]
    for r in same:
        r.epochs = epochs
    for r in longer:
        r.epochs = epochs * 3
    write(tmp_path / f"transfer_frontier_{RECIPE}_runs.jsonl", same + longer)
    summary = tf.summarise(RECIPE, str(tmp_path))
    assert summary["rows"]["lora@2"]["seeds"] == [0, 1] and summary["rows"]["lora@2"]["accuracy_mean"] == 0.6
    assert summary["epochs"] == epochs
    tf.report([RECIPE], str(tmp_path))
    assert f"({SIZE} per class, {epochs} epochs, seeds [0, 1])" in (tmp_path / "transfer_frontier.md").read_text()


def test_rows_with_more_seeds_say_so_and_pair_on_every_shared_seed(tmp_path, lrs):
    """topo and LoRA at 4 seeds beside AdaLoRA at 2: the header names the seeds most rows ran, the cells that ran
    another count say how many, and the paired margin uses all 4 shared seeds."""
    epochs = tf.recipe_task(RECIPE, 1, load=False)[2].epochs
    topo_lr, lora_lr, ada_lr = (lr_for(m, lrs, 2) for m in ("topo", "lora", "adalora"))
    runs = [run("topo", seed, 2, 0.6 + 0.02 * seed, topo_lr) for seed in range(4)]
    runs += [run("lora", seed, 2, 0.6, lora_lr) for seed in range(4)]
    runs += [run("adalora", seed, 2, 0.5, ada_lr) for seed in range(2)]
    runs += [run(m, seed, 0, 0.4, lr_for(m, lrs)) for m in ("head", "full") for seed in range(2)]
    for r in runs:
        r.epochs = epochs
    write(tmp_path / f"transfer_frontier_{RECIPE}_runs.jsonl", runs)
    summary = tf.report([RECIPE], str(tmp_path))[RECIPE]
    assert summary["goal"]["topo"]["paired_by_rank"][2]["n"] == 4
    assert summary["goal"]["topo"]["paired_by_rank"][2]["mean"] == pytest.approx(0.03)
    text = (tmp_path / "transfer_frontier.md").read_text()
    assert "seeds [0, 1])" in text
    assert "(1,000; 4 seeds)" in text and "0.500 ± 0.000 (1,000) |" in text


def test_one_shot_topo_variants_train_at_topos_rate_for_the_rank_and_growth_at_its_own():
    """A rank with its own topo rate (topo@r8) is every one-shot variant's there, a default's candidate named by its
    levers included; topo_grown keeps the recipe's topo rate, at which its runs were made."""
    lrs = {"peft": 1e-2, "topo@r8": 3e-3}
    candidate = "topo+" + "+".join(DEFAULT_LEVERS) + "+attention"
    assert [lr_for(m, lrs, 8) for m in ("topo", "topo_no_spend", candidate)] == [3e-3] * 3
    assert lr_for("topo_grown", lrs, 8) == lr_for(candidate, lrs, 2) == 1e-2


def test_at_the_recipes_own_rank_every_one_shot_variant_trains_at_topos_rate():
    """MiniLM's topo rate (0.02) differs from its family's (0.01): the ablations at the recipe's own rank, the
    bottleneck at topo's positions included, train at topo's; growth and a variant with its own rate keep theirs."""
    lrs = {"peft": 1e-2, "topo": 2e-2, "topo_grown": 1e-2, "topo_full_step": 1e-2}
    one_shot = ("topo", "topo_paper", "topo_random_positions", "bottleneck_at_topo", "topo+no_embeddings")
    assert [lr_for(m, lrs, 2) for m in one_shot] == [2e-2] * len(one_shot)
    assert lr_for("topo_grown", lrs, 2) == lr_for("topo_full_step", lrs, 2) == lr_for("lora", lrs, 2) == 1e-2
