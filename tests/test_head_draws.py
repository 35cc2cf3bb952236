"""The `heads=K` lever of the recipes: positions ranked by their score averaged over K draws of the new head, the layers
then placed and initialised with the run's own head (recipes/head_draws.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from models import hf_bert

import hf_topoadapt as hta
from hf_topoadapt.scoring import score_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipes/ is not installed
from recipes.budget import match_budget  # noqa: E402
from recipes.head_draws import head_averaged_order, normalised, redraw_  # noqa: E402
from recipes.methods import build_method, topo_variant  # noqa: E402

DEFAULT = "topo+no_embeddings+optimized+step=0.1+wide_matrix_free+score_once+spend"


def bert(seed: int = 0, layers: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    model, batches, *_ = hf_bert(seed, width=8)
    torch.manual_seed(seed)
    config = BertConfig(**{**model.config.to_dict(), "num_hidden_layers": layers})
    return BertForSequenceClassification(config).eval(), [{k: v for k, v in b.items()} for b in batches]


def test_redraw_keeps_the_scale_and_a_zero_bias_and_depends_on_the_generator_alone():
    head = torch.nn.Linear(64, 10)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    first, second = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)
    state = torch.random.get_rng_state()
    for copy in (first, second):
        copy.load_state_dict(head.state_dict())
        redraw_(copy, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # training after it draws what it would have
    assert torch.equal(first.weight, second.weight) and not torch.equal(first.weight, head.weight)
    assert abs(first.weight.std().item() - 0.02) < 0.004
    assert torch.count_nonzero(first.bias) == 0


def test_each_draw_counts_by_its_scores_relative_to_its_best():
    assert normalised({"a": 4.0, "b": 1.0, "c": -2.0}) == {"a": 1.0, "b": 0.25, "c": -0.5}
    assert normalised({"a": -1.0, "b": -3.0}) == {"a": -1.0, "b": -3.0}  # nothing lowers the loss: left as it is


def test_one_draw_is_the_plain_ranking_and_the_model_comes_back_unchanged():
    model, batches = bert()
    config = hta.TopoAdapterConfig(modules_to_save=["classifier"], include_embeddings=False, score_once=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order, per_draw = head_averaged_order(model, batches, "classifier", config, 1, seed=0)
    scored = score_round(model, batches, config.scoring_config(positions=order))
    plain = sorted(scored.scores, key=lambda s: -s.ranking_value)
    assert order == [s.name for s in plain] and len(per_draw) == 1

    order4, per_draw4 = head_averaged_order(model, batches, "classifier", config, 4, seed=0)
    assert sorted(order4) == sorted(order) and len(per_draw4) == 4
    assert per_draw4[0] == pytest.approx(per_draw[0])  # the first draw is the run's own head
    assert per_draw4[1] != pytest.approx(per_draw[0])  # the others are other heads
    mean = {n: sum(normalised(d)[n] for d in per_draw4) / 4 for n in order4}
    assert order4 == sorted(mean, key=lambda n: -mean[n])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="head draws must be >= 1"):
        head_averaged_order(model, batches, "classifier", config, 0, seed=0)


def test_the_lever_places_the_layers_at_the_averaged_ranking_and_spends_the_budget():
    assert topo_variant(f"{DEFAULT}+heads=4")["head_draws"] == 4
    with pytest.raises(ValueError, match="whole number"):
        topo_variant(f"{DEFAULT}+heads=1.5")
    model, batches = bert()
    budget = match_budget(model, lora_rank=2, num_adapters=2, lora_targets=("query", "value"), batch=batches[0])
    options = {k: v for k, v in topo_variant(DEFAULT).items() if k != "spend_budget"}
    config = hta.TopoAdapterConfig(modules_to_save=["classifier"], seed=0, **options)
    order, _ = head_averaged_order(model, batches, "classifier", config, 4, seed=0)
    built = build_method(f"{DEFAULT}+heads=4", model, batches, budget, total_steps=10, seed=0)
    assert sorted(built.positions) == sorted(order[: len(built.positions)])
    assert len(built.positions) >= 2 and "ranked over 4 head draws" in built.note
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget.target)


def test_a_grown_method_refuses_head_draws():
    model, batches = bert()
    budget = match_budget(model, lora_rank=2, num_adapters=2, lora_targets=("query", "value"), batch=batches[0])
    with pytest.raises(ValueError, match="one-shot"):
        build_method("topo_grown+heads=4", model, batches, budget, total_steps=10, seed=0)
