"""benchmarks/transfer_training.py's bookkeeping, on synthetic runs (no training): paired differences to the default
on shared seeds, their standard errors, the adoption rule and the report."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import transfer_training as tt  # noqa: E402


def write_runs(folder, recipe: str, validations: dict[str, list[float]], runs: str | None = None) -> None:
    with open(tt.runs_path(str(folder), recipe, runs), "w") as f:
        for method, values in validations.items():
            for seed, value in enumerate(values):
                curves = [{"epoch": 1.0, "loss": 1.3 - value}, {"epoch": 2.0, "loss": 1.0 - value}]
                record = {"method": method, "seed": seed, "validation": value, "accuracy": 0.0, "curves": curves}
                f.write(json.dumps(record) + "\n")


def test_paired_differences_use_shared_seeds_only():
    gain, se, n = tt.paired({0: 0.6, 1: 0.7, 2: 0.9}, {0: 0.5, 1: 0.5})
    assert n == 2 and gain == pytest.approx(0.15) and se == pytest.approx(math.sqrt(0.005) / math.sqrt(2))
    assert math.isnan(tt.paired({3: 1.0}, {0: 0.5})[0])


def test_a_lever_is_adopted_only_when_its_gain_exceeds_its_standard_error(tmp_path):
    base, steady, noisy = tt.default_method(), tt.with_lever("step=0.5"), tt.with_lever("adapter_lr=0.3")
    for recipe in tt.RECIPES:
        write_runs(tmp_path, recipe, {
            "lora": [0.7, 0.7, 0.7],
            base: [0.50, 0.60, 0.70],
            steady: [0.52, 0.63, 0.71],  # +0.02 on average, every seed up
            noisy: [0.70, 0.40, 0.90],  # +0.067 on average, but one seed far down
        })  # fmt: skip
    result = tt.report(list(tt.RECIPES), str(tmp_path))
    assert result["adopt"] == ["step=0.5"]
    rows = {row["lever"]: row for row in result["rows"]}
    assert rows["step=0.5"]["mean_gain"] == pytest.approx(0.02)
    assert rows["adapter_lr=0.3"]["mean_gain"] > 0  # positive, yet
    assert rows["adapter_lr=0.3"]["mean_gain"] < rows["adapter_lr=0.3"]["mean_gain_se"]  # within its error
    assert "mean_gain" not in rows["lora"] and "x_tanh" in rows and not rows["x_tanh"]["recipes"]
    text = (tmp_path / "transfer_training.md").read_text()
    assert "**Adopted: step=0.5.**" in text and "+0.0200" in text
    assert json.loads((tmp_path / "transfer_training.json").read_text())["adopt"] == ["step=0.5"]
    # the loss table reads each run's lowest validation loss (here 1 - accuracy): the same gains with the sign flipped
    losses = {row["lever"]: row for row in result["loss_rows"]}
    assert losses["step=0.5"]["mean_gain"] == pytest.approx(-0.02)
    assert losses["(default)"]["recipes"]["vit_digits"]["mean"] == pytest.approx(1.0 - 0.6)
    assert "## The lowest validation loss" in text and "-0.020 ± 0.003" in text


def test_round_two_measures_its_levers_against_the_adopted_default(tmp_path):
    base, prefix = tt.ROUNDS[2]["base"], tt.ROUNDS[2]["prefix"]
    assert prefix == tt.with_lever("no_embeddings")  # round 1's adopted lever on round 1's default
    assert base != prefix and sorted(base.split("+")) == sorted(prefix.split("+"))  # the same levers, run again
    warm, cross = tt.with_lever("warmup", prefix), tt.with_lever("crossfit", prefix)
    for recipe in tt.RECIPES:
        write_runs(tmp_path, recipe, {
            tt.default_method(): [0.9, 0.9, 0.9],  # round 1's base: not round 2's reference
            prefix: [0.2, 0.2, 0.2],  # round 1's no_embeddings runs: not round 2's reference either
            base: [0.50, 0.60, 0.70],
            warm: [0.53, 0.63, 0.72],
            cross: [0.40, 0.55, 0.70],
        })  # fmt: skip
    result = tt.report(list(tt.RECIPES), str(tmp_path))
    round2 = {row["lever"]: row for row in result["round2"]["rows"]}
    assert result["round2"]["adopt"] == ["warmup"]
    assert round2["warmup"]["mean_gain"] == pytest.approx(0.0267, abs=1e-4)
    assert round2["crossfit"]["mean_gain"] == pytest.approx(-0.05)
    assert round2["(default)"]["recipes"]["minilm_topics"]["mean"] == pytest.approx(0.6)
    text = (tmp_path / "transfer_training.md").read_text()
    assert "## Round 2: on top of the adopted default" in text and "**Adopted: warmup.**" in text
    # round 1 reads its own no_embeddings runs
    assert {row["lever"]: row for row in result["rows"]}["no_embeddings"]["mean_gain"] == pytest.approx(-0.7)


def test_each_round_reads_only_the_topo_runs_at_its_own_rate(tmp_path):
    base, lever = tt.ROUND2_BASE, tt.with_lever("per_token", tt.ROUND2_BASE)
    then, now = tt.RATES_THEN["effnet_mnist"], tt.RATES_ROUND3["effnet_mnist"]
    assert then != now
    records = [("lora", 0.7, 1e-2), (base, 0.5, then), (base, 0.6, now), (lever, 0.65, now), (lever, 0.1, then)]
    with open(tt.runs_path(str(tmp_path), "effnet_mnist"), "w") as f:
        for method, value, lr in records:
            curves = [{"epoch": 1.0, "loss": 1.0 - value}]
            f.write(json.dumps({"method": method, "seed": 0, "validation": value, "lr": lr, "curves": curves}) + "\n")
    path = tt.runs_path(str(tmp_path), "effnet_mnist")
    assert tt.read_runs(path, topo_lr=then)[base] == {0: 0.5}  # not overwritten by the later run at the new rate
    assert tt.read_runs(path, topo_lr=now)[lever] == {0: 0.65}
    assert tt.read_runs(path, topo_lr=now)["lora"] == {0: 0.7}  # LoRA keeps its own rate
    assert tt.read_runs(path)[base] == {0: 0.6}  # no rate given: the last record wins
    third = tt.measure_round(3, ["effnet_mnist"], str(tmp_path))
    cell = {row["lever"]: row for row in third["rows"]}["per_token"]["recipes"]["effnet_mnist"]
    assert cell["gain"] == pytest.approx(0.05) and third["rates"] == {"effnet_mnist": now}


def before_shrink(variant: dict) -> dict:
    """A topo variant as it was before `shrink` joined the default (after round 23): 3 x 3 convs everywhere."""
    return {**variant, "shrink_kernel": False}


def before_round_15(variant: dict) -> dict:
    """A topo variant as it was before rounds 15 and 17: the greedy rule, neurons spread evenly (the recipes' trim),
    no `spend` (which joined the default after round 21) and no `shrink` (after round 23)."""
    dropped = ("neuron_budget", "max_neurons", "spend_budget")
    return {**{k: v for k, v in variant.items() if k not in dropped}, "score_once": False, "shrink_kernel": False}


def test_a_round_runs_its_topo_methods_at_its_own_rate():
    lrs = {"lora": 1e-2, "peft": 1e-2, "head": 1e-1}
    methods = ["lora", tt.ROUNDS[1]["base"], tt.with_lever("step=0.5")]
    then = tt.round_lrs(lrs, methods, "effnet_mnist", 1)
    assert then["lora"] == 1e-2 and then["head"] == 1e-1  # the baselines keep the recipe's rates
    assert then[methods[1]] == then[methods[2]] == tt.RATES_THEN["effnet_mnist"] == 3e-3
    assert tt.round_lrs(lrs, methods, "effnet_mnist", 3)[methods[2]] == tt.RATES_ROUND3["effnet_mnist"]


def test_round_four_measures_the_recipes_default_at_the_recipes_current_rates():
    """Round 4's reference is the default of the time (its prefix with the full step), at the rates the recipes train
    topo at today (a rate change in a recipe must come with a new round); its adopted step=0.1 makes today's `topo`."""
    import importlib

    from recipes.methods import TOPO_VARIANTS, lever_method

    spec = tt.ROUNDS[4]
    assert lever_method(spec["base"]) == lever_method(spec["prefix"]) and lever_method(spec["base"])["step_scale"] == 1
    assert before_round_15(TOPO_VARIANTS["topo_formed_matrix"]) == lever_method(
        tt.with_lever("step=0.1", spec["prefix"])
    )
    now = {recipe: importlib.import_module(f"recipes.{recipe}").DEFAULTS["lrs"]["peft"] for recipe in tt.RECIPES}
    # a recipe whose length changed since (transfer_epochs.md) chose its rates again; the rounds keep theirs
    changed = set(tt.EPOCHS_THEN)
    assert {r: v for r, v in spec["rates"].items() if r not in changed} == {r: now[r] for r in now if r not in changed}
    assert all(lever.startswith("step=") for lever in spec["levers"])


def test_round_six_measures_the_matrix_free_ascent_on_round_fours_default_for_time_without_loss():
    """Round 6's reference is round 4's adopted row (the default of its time); its adopted wide_matrix_free makes
    today's `topo`; a lever that saves time is adopted on no loss, not on a gain."""
    from recipes.methods import TOPO_VARIANTS, lever_method

    spec = tt.ROUNDS[6]
    assert spec["base"] == tt.with_lever("step=0.1", tt.ROUNDS[4]["prefix"]) and spec["rates"] == tt.ROUNDS[4]["rates"]
    assert lever_method(spec["base"]) == before_round_15(TOPO_VARIANTS["topo_formed_matrix"])
    assert lever_method(tt.with_lever("wide_matrix_free", spec["prefix"])) == before_round_15(TOPO_VARIANTS["topo"])
    assert spec["rule"] == "no_loss"
    assert tt.adopted({"mean_gain": -0.001, "mean_gain_se": 0.004}, "no_loss")
    assert not tt.adopted({"mean_gain": -0.012, "mean_gain_se": 0.006}, "no_loss")
    assert not tt.adopted({"mean_gain": -0.001, "mean_gain_se": 0.004})  # the gain rule would not take it


def test_round_five_measures_a_tenth_of_the_step_on_growth():
    from recipes.methods import GROWN, grown_variant

    spec = tt.ROUNDS[5]
    assert spec["base"] == "topo_grown" and spec["rates"] == tt.ROUNDS[4]["rates"]
    (lever,) = spec["levers"]
    method = tt.with_lever(lever, spec["prefix"])
    assert grown_variant(method) == {**GROWN["topo_grown"], "step_scale": 0.1}


def test_round_nineteen_measures_growths_interval_at_the_recipes_lengths_of_today():
    from recipes.methods import GROWN, grown_variant

    spec = tt.ROUNDS[19]
    assert spec["base"] == spec["prefix"] == "topo_grown" and spec["runs"] == "round19"
    assert grown_variant(tt.with_lever("grow_every=1", spec["prefix"])) == {**GROWN["topo_grown"], "grow_every": 1}
    assert tt.round_epochs("effnet_mnist", 19, 30) == 30 and spec["rates"]["effnet_mnist"] == 1e-2
    later = tt.ROUNDS[20]
    assert later["base"] == "topo_grown" and later["runs"] == "round19" and later["rates"] == spec["rates"]
    assert grown_variant(tt.with_lever("grow_every=3", later["prefix"]))["grow_every"] == 3


def test_round_twenty_two_measures_dropout_against_the_recipes_default_of_today():
    from recipes.methods import TOPO_VARIANTS, lever_method

    spec = tt.ROUNDS[22]
    assert spec["base"] == spec["prefix"] and spec["runs"] == "round22"
    # the reference is `topo` of its time, spend included (shrink joined after round 23)
    assert lever_method(spec["base"]) == before_shrink(TOPO_VARIANTS["topo"])
    for lever in spec["levers"]:
        options = lever_method(tt.with_lever(lever, spec["prefix"]))
        assert options == {**before_shrink(TOPO_VARIANTS["topo"]), "topo_dropout": float(lever.partition("=")[2])}
    assert tt.round_epochs("effnet_mnist", 22, 30) == 30 and set(spec["rates"].values()) == {1e-2}


def test_rounds_from_seven_measure_on_todays_default_and_only_where_their_lever_applies(tmp_path):
    """Rounds from 7 on measure against today's `topo`; a round with its own recipes (attention outputs exist only in
    the transformers) averages over those alone, and an ablation round adopts nothing whatever its gain."""
    from recipes.methods import TOPO_VARIANTS, lever_method

    for number in range(7, 16):  # the default of their time: the greedy rule until round 15 adopted score_once
        assert lever_method(tt.ROUNDS[number]["base"]) == before_round_15(TOPO_VARIANTS["topo"]), number
    # round 15 adopted score_once; round 17's `budget+max_neurons=64` passed the rule and was vetoed (its reason)
    # `spend` joined the default after round 21 (it changes only runs that left the budget unspent)
    before_spend = {k: v for k, v in before_shrink(TOPO_VARIANTS["topo"]).items() if k != "spend_budget"}
    assert lever_method(tt.with_lever("score_once", tt.ROUNDS[15]["prefix"])) == before_spend
    for number in range(16, 19):  # round 19 measures growth
        assert lever_method(tt.ROUNDS[number]["base"]) == before_spend, number
    assert "budget+max_neurons=64" in tt.ROUNDS[17]["vetoed"]
    assert tt.ROUNDS[8]["recipes"] == tt.ROUNDS[11]["recipes"] == ("minilm_topics", "vit_digits")
    base, attention = tt.ROUNDS[8]["base"], tt.with_lever("attention", tt.ROUNDS[8]["prefix"])
    for recipe in tt.RECIPES:
        write_runs(tmp_path, recipe, {base: [0.5, 0.6, 0.7], attention: [0.6, 0.7, 0.8]})
    eighth = tt.measure_round(8, list(tt.RECIPES), str(tmp_path))
    row = {row["lever"]: row for row in eighth["rows"]}["attention"]
    assert set(row["recipes"]) == {"minilm_topics", "vit_digits"} and row["mean_gain"] == pytest.approx(0.1)
    assert eighth["adopt"] == ["attention"]
    assert tt.measure_round(11, list(tt.RECIPES), str(tmp_path))["adopt"] == []
    assert not tt.adopted({"mean_gain": 0.1, "mean_gain_se": 0.01}, "ablation")


def test_a_round_with_its_own_runs_file_reads_it_and_a_vetoed_lever_is_not_adopted(tmp_path):
    """Round 17 reads round 15's runs file (its reference ran there); `budget+max_neurons=64` passes the gain rule on
    these runs and is still not adopted, with its reason in the report."""
    spec = tt.ROUNDS[17]
    base, lever = spec["base"], tt.with_lever("budget+max_neurons=64", spec["prefix"])
    for recipe in tt.RECIPES:
        write_runs(tmp_path, recipe, {base: [0.5, 0.6, 0.7], lever: [0.6, 0.72, 0.8]}, runs="round15")
    measured = tt.measure_round(17, list(tt.RECIPES), str(tmp_path))
    row = {row["lever"]: row for row in measured["rows"]}["budget+max_neurons=64"]
    assert row["mean_gain"] == pytest.approx(0.1067, abs=1e-4) and tt.adopted(row)
    assert measured["adopt"] == [] and "unspent" in measured["vetoed"]["budget+max_neurons=64"]
    assert any("passed the rule and is not adopted" in line for line in tt.round_section(measured, list(tt.RECIPES)))
    assert tt.measure_round(16, list(tt.RECIPES), str(tmp_path))["vetoed"] == {}


def test_rounds_measured_at_an_earlier_length_rerun_at_it():
    """EfficientNet trained 10 epochs until transfer_epochs.md; rounds 1-18 were measured there and rerun there (their
    stored runs are 10-epoch runs), a new round trains at the recipe's length."""
    import importlib

    epochs = importlib.import_module("recipes.effnet_mnist").DEFAULTS["epochs"]
    assert epochs != tt.EPOCHS_THEN["effnet_mnist"]
    assert tt.round_epochs("effnet_mnist", 4, epochs) == tt.round_epochs("effnet_mnist", 18, epochs) == 10
    assert tt.round_epochs("effnet_mnist", tt.LAST_ROUND_AT_EPOCHS_THEN + 1, epochs) == epochs
    assert tt.round_epochs("vit_digits", 4, 10) == 10
    with open(tt.runs_path(os.path.join(ROOT, "benchmarks", "results"), "effnet_mnist")) as f:
        assert {json.loads(line)["epochs"] for line in f if line.strip()} == {10}


def test_round_twenty_three_ranks_over_head_draws_against_the_default_of_its_time():
    from recipes.methods import TOPO_VARIANTS, lever_method

    spec = tt.ROUNDS[23]
    assert spec["base"] == spec["prefix"] == tt.ROUND22_BASE and spec["runs"] == "round23"
    assert lever_method(spec["base"]) == before_shrink(TOPO_VARIANTS["topo"])
    for lever in spec["levers"]:
        options = lever_method(tt.with_lever(lever, spec["prefix"]))
        assert options == {**before_shrink(TOPO_VARIANTS["topo"]), "head_draws": int(lever.partition("=")[2])}
    # MiniLM's topo rate rose to 0.02 when the rates were chosen again; round 23 runs at the recipes' rates of today
    assert spec["rates"] == {"minilm_topics": 2e-2, "effnet_mnist": 1e-2, "vit_digits": 1e-2}
