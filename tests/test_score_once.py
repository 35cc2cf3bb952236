"""TopoAdapterConfig(score_once=True): every layer from one scoring round instead of a round per insertion."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from models import BUILDERS

import hf_topoadapt as hta
import hf_topoadapt.insertion as insertion
import hf_topoadapt.model as topo_model
from hf_topoadapt.scoring import score_round


def counted_rounds(monkeypatch) -> list:
    """Every scoring round get_topo_model makes."""
    rounds = []

    def counting(model, data, config=None, loss_fn=None):
        scored = score_round(model, data, config, loss_fn)
        rounds.append(scored)
        return scored

    monkeypatch.setattr(topo_model, "score_round", counting)
    monkeypatch.setattr(insertion, "score_round", counting)
    return rounds


def build(family, monkeypatch, **settings):
    model, batches, loss_fn, _, _ = BUILDERS[family]()
    rounds = counted_rounds(monkeypatch)
    config = hta.TopoAdapterConfig(line_search_steps=6, **settings)
    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=loss_fn)
    return topo, rounds, batches, loss_fn


@pytest.mark.parametrize("family", ["hf_bert", "residual_cnn"])
def test_one_round_places_the_best_positions_of_that_round(family, monkeypatch):
    topo, rounds, *_ = build(family, monkeypatch, num_adapters=2, score_once=True)
    report = topo.topo_report
    assert len(rounds) == 1
    ranked = sorted(rounds[0].scores, key=lambda s: -s.ranking_value)
    assert report.chosen == [s.name for s in ranked[:2]]
    first, second = report.insertions
    # the second line search had to beat the loss with the first layer in place, not the loss before it
    assert second["loss_before"] == pytest.approx(first["loss_after"])
    assert second["loss_after"] < first["loss_after"]
    # the round's capture and eigen-solves are counted once
    assert report.seconds["capture"] == rounds[0].seconds["capture"]
    assert report.seconds["eigen_solves"] == rounds[0].seconds["eigen_solves"]


def test_the_greedy_rule_scores_again_after_each_insertion(monkeypatch):
    topo, rounds, *_ = build("hf_bert", monkeypatch, num_adapters=2, score_once=False)
    assert len(rounds) == 2 and len(rounds[1].scores) == len(rounds[0].scores) - 1
    assert len(topo.topo_report.chosen) == 2


def test_one_adapter_is_the_same_either_way(monkeypatch):
    model, batches, loss_fn, _, _ = BUILDERS["hf_bert"]()
    twin = copy.deepcopy(model)
    greedy = hta.get_topo_model(
        model, hta.TopoAdapterConfig(line_search_steps=6, score_once=False), calibration_data=batches
    )
    once = hta.get_topo_model(
        twin, hta.TopoAdapterConfig(line_search_steps=6, score_once=True), calibration_data=batches
    )
    assert once.topo_report.chosen == greedy.topo_report.chosen
    for (name, a), (_, b) in zip(greedy.named_parameters(), once.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("neuron_budget", [None, 60])
def test_a_layer_the_first_rounds_directions_fail_is_scored_again(monkeypatch, neuron_budget):
    """Stale directions: when a later layer from the first round lowers no loss (here the loss it must beat is made
    unbeatable), that position is scored again on the current model, and both attempts are in the report; with a
    neuron budget too."""
    model, batches, loss_fn, _, _ = BUILDERS["hf_bert"]()
    rounds = counted_rounds(monkeypatch)
    monkeypatch.setattr(topo_model, "_reused", lambda scored, records: dataclasses.replace(scored, loss=-1e9))
    config = hta.TopoAdapterConfig(num_adapters=2, line_search_steps=6, neuron_budget=neuron_budget)
    topo = hta.get_topo_model(model, config, calibration_data=batches)
    first, stale, again = topo.topo_report.insertions
    assert first["accepted"] and not stale["accepted"] and again["accepted"]
    assert stale["position"] == again["position"] and "scored again" in stale["reason"]
    assert [len(r.scores) for r in rounds] == [len(rounds[0].scores), 1]  # the retry scores that position alone
    assert topo.topo_report.chosen == [first["position"], again["position"]]


def test_with_a_neuron_budget_one_round_serves_every_position(monkeypatch):
    topo, rounds, *_ = build("hf_bert", monkeypatch, num_adapters=2, neuron_budget=60, score_once=True)
    assert len(rounds) == 1
    spent = sum(p.numel() for n, p in topo.named_parameters() if p.requires_grad and "topo_" in n)
    assert 0 < spent <= 60


def test_the_setting_is_saved_and_loaded(tmp_path, monkeypatch):
    topo, _, batches, _ = build("hf_bert", monkeypatch, num_adapters=2, score_once=True)
    topo.save_pretrained(tmp_path)
    loaded = hta.TopoAdapterConfig.from_pretrained(tmp_path)
    assert loaded.score_once is True


def test_one_round_is_the_default_of_adapters_and_of_the_recipes():
    """score_once joined the default (transfer_training.md, round 15): TopoAdapterConfig and the recipes' `topo` agree;
    `topo_greedy` switches only it off; growth and the paper's layer keep the greedy rule."""
    from recipes.methods import DEFAULT_LEVERS, GROWN, TOPO_VARIANTS, lever_off

    assert hta.TopoAdapterConfig().score_once is True and "score_once" in DEFAULT_LEVERS
    assert lever_off("score_once") == "topo_greedy" and TOPO_VARIANTS["topo"]["score_once"] is True
    assert TOPO_VARIANTS["topo_greedy"] == {**TOPO_VARIANTS["topo"], "score_once": False}
    assert TOPO_VARIANTS["topo_paper"]["score_once"] is False and GROWN["topo_grown"]["score_once"] is False


def test_a_non_boolean_is_refused():
    with pytest.raises(ValueError, match="score_once must be True or False"):
        hta.TopoAdapterConfig(score_once="yes")
