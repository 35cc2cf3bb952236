"""benchmarks/transfer_lr_grid.py's choice, on synthetic runs (no training): the chosen rate has the best mean
validation accuracy, and each rate's lowest validation loss is summarised beside it."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.transfer_lr_grid import choose  # noqa: E402
from recipes.experiment import RunResult  # noqa: E402


def run(method, seed, lr, accuracy, losses) -> RunResult:
    curves = [{"epoch": float(e + 1), "loss": loss, "accuracy": accuracy} for e, loss in enumerate(losses)]
    return RunResult(method, 10, seed, accuracy, 100, 0.0, lr, len(losses), 0.1, 1.0, 0.01, "", [],
                     validation=accuracy, curves=curves)  # fmt: skip


def test_the_best_mean_validation_accuracy_chooses_and_the_lowest_loss_is_reported():
    runs = [
        # 0.03: more accuracy, though its loss rises from the first epoch (the loss column shows it)
        run("topo", 0, 0.03, 0.66, [1.2, 1.4, 1.6]), run("topo", 1, 0.03, 0.64, [1.3, 1.5, 1.7]),
        run("topo", 0, 0.01, 0.64, [1.3, 1.1, 1.2]), run("topo", 1, 0.01, 0.64, [1.2, 1.0, 1.1]),
        run("lora", 0, 0.01, 0.70, [1.0, 0.9]),
    ]  # fmt: skip
    table = choose(runs, ["topo", "lora", "head"])
    assert table["topo"]["best"] == 0.03
    assert table["lora"]["best"] == 0.01
    assert "head" not in table  # no runs: no row
    row = table["topo"]["rows"][0.01]
    assert row["loss"] == pytest.approx(1.05) and row["accuracy"] == pytest.approx(0.64) and row["seeds"] == 2
    assert table["topo"]["rows"][0.03]["accuracy"] > row["accuracy"]
    assert table["topo"]["rows"][0.03]["loss_std"] == pytest.approx(0.0707, abs=1e-4)


def test_a_tie_on_accuracy_goes_to_the_lower_validation_loss_not_the_lower_rate():
    # MiniLM's r=8 grid: 0.005, 0.01 and 0.02 all at 31/32 on every seed, lowest losses 0.47, 0.20 and 0.17
    runs = [
        run("topo", seed, lr, 0.96875, [loss + 0.1 * seed, loss])
        for seed in (0, 1, 2)
        for lr, loss in ((0.005, 0.47), (0.01, 0.20), (0.02, 0.17))
    ]
    runs += [run("topo", seed, 0.002, 0.9166, [0.05]) for seed in (0, 1, 2)]  # the lowest loss, less accuracy
    assert choose(runs, ["topo"])["topo"]["best"] == 0.02
    # the same accuracies in another order (float sums differ in the last bits) still tie
    mixed = [run("lora", 0, 0.01, 0.7, [0.9]), run("lora", 1, 0.01, 0.1 + 0.2, [0.9])]
    mixed += [run("lora", 0, 0.02, 0.1 + 0.2, [0.5]), run("lora", 1, 0.02, 0.7, [0.5])]
    assert choose(mixed, ["lora"])["lora"]["best"] == 0.02


def test_the_choice_uses_every_seed_of_the_grid_already_run(tmp_path):
    import argparse
    import json
    from dataclasses import asdict

    from benchmarks.transfer_lr_grid import grid_runs

    path = tmp_path / "runs.jsonl"
    earlier = [run("topo", 3, 0.003, 0.9, [0.8]), run("topo", 4, 0.003, 0.9, [0.8]), run("lora", 3, 0.01, 0.1, [2.0]),
               run("topo", 3, 0.5, 1.0, [0.1])]  # fmt: skip  (0.5: not a rate of the grid)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in earlier))
    now = [run("topo", 0, 0.003, 0.75, [1.0]), run("topo", 0, 0.01, 0.7, [1.0])]
    args = argparse.Namespace(methods=["topo"], recipe="vit_digits", lrs=None)
    runs = grid_runs(now, str(path), args)
    assert sorted((r.seed, r.lr) for r in runs) == [(0, 0.003), (0, 0.01), (3, 0.003), (4, 0.003)]
    table = choose(runs, ["topo"])
    row = table["topo"]["rows"][0.003]
    assert row["seeds"] == 3 and row["accuracy"] == pytest.approx(0.85)
    assert table["topo"]["best"] == 0.003  # 0.75 against 0.7 on seed 0, the one both ran


def test_rates_are_compared_on_the_seeds_both_ran():
    """Seeds 3 and 4 (harder: 0.90 at every rate) added to two rates must not hand the choice to a rate that ran only
    the easier seeds 0-2, nor the other way round."""
    easy = {0.005: 0.95, 0.01: 0.97, 0.02: 0.96}
    runs = [run("lora", seed, lr, acc, [0.3]) for lr, acc in easy.items() for seed in (0, 1, 2)]
    runs += [run("lora", seed, lr, 0.90, [0.3]) for lr in (0.01, 0.02) for seed in (3, 4)]
    table = choose(runs, ["lora"])
    assert table["lora"]["rows"][0.005]["accuracy"] > table["lora"]["rows"][0.01]["accuracy"]  # 0.95 against 0.942
    assert table["lora"]["best"] == 0.01  # it beats 0.005 on seeds 0-2 and 0.02 on seeds 0-4
    # no rate beats every other (a cycle on different shared seeds): the best on the seeds all of them ran
    cycle = [run("topo", 0, 0.1, 0.9, [0.3]), run("topo", 0, 0.2, 0.8, [0.3]), run("topo", 0, 0.3, 0.7, [0.3])]
    cycle += [run("topo", 1, 0.2, 0.9, [0.3]), run("topo", 1, 0.3, 0.7, [0.3])]
    cycle += [run("topo", 2, 0.1, 0.5, [0.3]), run("topo", 2, 0.3, 0.99, [0.3])]
    # shared seeds: 0.1-0.2 {0}: 0.1 wins; 0.2-0.3 {0, 1}: 0.2 wins; 0.1-0.3 {0, 2}: 0.3 wins (0.845 > 0.7)
    assert choose(cycle, ["topo"])["topo"]["best"] == 0.1  # on seed 0, the only one all ran


def test_a_call_that_runs_a_few_rates_still_chooses_among_the_whole_grid(tmp_path):
    """More seeds at two tied rates (`--lrs 0.01 0.03 --seeds 3 4`) must not rewrite the report as if the grid were
    those two rates: a rate of the grid that did best on its seeds stays in the choice."""
    import argparse
    import json
    from dataclasses import asdict

    from benchmarks.transfer_lr_grid import grid_runs

    path = tmp_path / "runs.jsonl"
    earlier = [run("topo", seed, 0.01, 0.97, [0.3]) for seed in (0, 1, 2)]
    earlier += [run("topo", seed, 0.03, 0.90, [0.3]) for seed in (0, 1, 2)]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in earlier))
    now = [run("topo", seed, 0.03, 0.95, [0.2]) for seed in (3, 4)] + [run("topo", 3, 0.7, 0.99, [0.1])]
    args = argparse.Namespace(methods=["topo"], recipe="vit_digits", lrs=[0.03, 0.7])
    runs = grid_runs(now, str(path), args)
    assert sorted({r.lr for r in runs}) == [0.01, 0.03, 0.7]  # the grid's rates and the ones this call named
    assert choose([r for r in runs if r.lr != 0.7], ["topo"])["topo"]["best"] == 0.01
    assert grid_runs([], str(path), args) == []  # no rank given and none run: nothing to report
    assert len(grid_runs([], str(path), args, rank=now[0].lora_rank)) == 6  # --report-only names the rank


def ranked(method, seed, lr, accuracy, rank) -> RunResult:
    result = run(method, seed, lr, accuracy, [1.0])
    result.lora_rank = rank
    return result


def test_rates_are_chosen_per_rank_and_keyed_as_the_recipes_take_them(tmp_path):
    import json
    from dataclasses import asdict

    from benchmarks.transfer_lr_grid import other_rank_runs, write_report

    path = tmp_path / "runs.jsonl"
    runs = [
        ranked("lora", 0, 0.03, 0.70, 2), ranked("lora", 0, 0.01, 0.60, 2),  # the recipe's own rank: not here
        ranked("lora", 0, 0.03, 0.10, 8), ranked("lora", 0, 0.003, 0.65, 8),  # 0.03 diverges at rank 8
        ranked("lora", 0, 0.03, 0.66, 4), ranked("lora", 0, 0.01, 0.64, 4),
        ranked("lora", 0, 0.5, 0.99, 4),  # not a rate of the grid
    ]  # fmt: skip
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in runs))
    others = other_rank_runs(str(path), "vit_digits", own_rank=2)
    assert sorted((r.lora_rank, r.lr) for r in others) == [(4, 0.01), (4, 0.03), (8, 0.003), (8, 0.03)]
    tables = {rank: choose(others, ["lora"], rank) for rank in (4, 8)}
    chosen = write_report(str(tmp_path / "grid_ranks"), tables, "vit_digits", 10, " --ranks 4 8")
    assert chosen == {"lora@r4": 0.03, "lora@r8": 0.003}
    assert json.loads((tmp_path / "grid_ranks.json").read_text())["chosen"] == chosen
    report = (tmp_path / "grid_ranks.md").read_text()
    assert "| 8 | lora | 0.003 | 0.6500" in report and "--ranks 4 8" in report


def test_a_rate_chosen_at_a_rank_is_that_methods_alone():
    from recipes.methods import lr_for

    lrs = {"peft": 0.02, "lora": 0.03, "topo": 0.01, "lora@r8": 0.003, "topo@r4": 0.001}
    assert lr_for("lora", lrs, 8) == 0.003 and lr_for("lora", lrs, 2) == 0.03 and lr_for("lora", lrs) == 0.03
    assert lr_for("topo", lrs, 4) == 0.001 and lr_for("topo", lrs, 8) == 0.01
    assert lr_for("topo_grown", lrs, 4) == 0.01  # variants train at the topo method's own rate
    assert lr_for("adalora", lrs, 8) == 0.02


@pytest.mark.parametrize("recipe", ["minilm_topics", "effnet_mnist", "vit_digits"])
def test_the_recipes_train_each_rank_at_the_rate_its_grid_chose(recipe):
    import json

    from benchmarks.transfer_lr_grid import recipe_task
    from recipes.cli import recipe_lrs
    from recipes.methods import lr_for

    path = os.path.join(ROOT, "benchmarks", "results", f"transfer_lr_grid_{recipe}_ranks.json")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run benchmarks/transfer_lr_grid.py --recipe {recipe} --ranks ...")
    _, _, args = recipe_task(recipe, 1, load=False)
    lrs = recipe_lrs(args)
    with open(path) as f:
        chosen = json.load(f)["chosen"]
    for key, rate in chosen.items():
        method, _, rank = key.partition("@r")
        assert lr_for(method, lrs, int(rank)) == pytest.approx(rate), key


@pytest.mark.parametrize("recipe", ["minilm_topics", "effnet_mnist", "vit_digits"])
def test_the_recipes_train_at_the_rates_their_own_rank_chose(recipe):
    import json

    from benchmarks.transfer_lr_grid import recipe_task
    from recipes.cli import recipe_lrs
    from recipes.methods import lr_for

    _, _, args = recipe_task(recipe, 1, load=False)
    lrs = recipe_lrs(args)
    with open(os.path.join(ROOT, "benchmarks", "results", f"transfer_lr_grid_{recipe}.json")) as f:
        chosen = json.load(f)["chosen"]
    for method in ("head", "full", "lora", "adalora", "topo"):
        assert lr_for(method, lrs, args.lora_rank) == pytest.approx(chosen[method]), method


def test_a_call_for_one_method_keeps_the_others_rows_in_the_recipes_report():
    from benchmarks.transfer_lr_grid import report_methods

    earlier = {"head", "lora", "topo", "topo_full_step"}
    assert report_methods(["topo"], earlier) == ["head", "lora", "topo", "topo_full_step"]
    assert report_methods(["topo+optimized"], {"lora"}) == ["lora", "topo+optimized"]


def test_runs_of_another_training_length_are_another_grid(tmp_path):
    import argparse
    import json
    from dataclasses import asdict

    from benchmarks.transfer_lr_grid import grid_runs, other_rank_runs

    path = tmp_path / "runs.jsonl"
    short = [run("topo", 3, 0.003, 0.9, [0.8]), ranked("lora", 0, 0.03, 0.7, 4)]  # 1 epoch
    long = [run("topo", 4, 0.003, 0.5, [0.8, 0.7, 0.6]), ranked("lora", 1, 0.01, 0.6, 4)]
    long[1].epochs = 3
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in short + long))
    args = argparse.Namespace(methods=["topo"], recipe="vit_digits", lrs=None)
    now = [run("topo", 0, 0.003, 0.6, [1.0, 0.9, 0.8])]
    assert sorted(r.seed for r in grid_runs(now, str(path), args, epochs=3)) == [0, 4]
    assert sorted(r.seed for r in grid_runs(now, str(path), args)) == [0, 3, 4]  # no length given: every run
    assert [r.seed for r in other_rank_runs(str(path), "vit_digits", own_rank=0, epochs=3)] == [1]
