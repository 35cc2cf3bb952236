"""TopoAdapterConfig(neuron_budget=...): positions and neurons chosen by value per trainable parameter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from models import BUILDERS, hf_bert

import hf_topoadapt as hta
from hf_topoadapt.model import neuron_plan
from hf_topoadapt.sensitivity.crossfit import CrossFitted


def fake_score(name, q, width, values, rows=None, crossfit=None):
    rows = rows if rows is not None else list(range(len(values)))
    spectrum = SimpleNamespace(rows=torch.tensor(rows), eigenvalues=torch.tensor(values, dtype=torch.float64))
    return SimpleNamespace(name=name, num_features=q, width=width, spectrum=spectrum, crossfit=crossfit)


def config(**overrides):
    return hta.TopoAdapterConfig(**{"num_adapters": 2, "neuron_budget": 100, "max_neurons": 16, **overrides})


def test_neurons_go_where_they_buy_the_most_per_parameter():
    wide = fake_score("wide", q=50, width=49, values=[5.0, 4.0, 1.0])  # 0.1, 0.08, 0.02 per parameter
    narrow = fake_score("narrow", q=10, width=9, values=[0.9, 0.5, 0.3, 0.2, -1.0])  # 0.09, 0.05, 0.03, 0.02
    plan = neuron_plan([wide, narrow], config(neuron_budget=100))
    # 0.1 wide (50), 0.09 narrow (10), 0.08 wide does not fit (110), 0.05 and 0.03 narrow fit (70, 80), 0.02 both
    assert plan == [("wide", 1), ("narrow", 4)]
    assert neuron_plan([wide, narrow], config(neuron_budget=100, num_adapters=1)) == [("wide", 2)]
    assert neuron_plan([wide, narrow], config(neuron_budget=100, max_neurons=2)) == [("wide", 1), ("narrow", 2)]
    # train_up: a neuron also trains its output direction, width more numbers: a wide one costs 99, a narrow one 19;
    # the wide one still buys the most per parameter (0.051 against 0.047) and then nothing else fits
    assert neuron_plan([wide, narrow], config(neuron_budget=100, train_up=True)) == [("wide", 1)]
    assert neuron_plan([wide, narrow], config(neuron_budget=98, train_up=True)) == [("narrow", 4)]


def test_the_top_eigenvalue_of_each_row_or_its_cross_fitted_value_counts():
    rows_twice = fake_score("a", q=10, width=9, values=[3.0, 2.0, 1.0], rows=[0, 0, 1])  # rows 0 and 1
    assert neuron_plan([rows_twice], config(neuron_budget=1000)) == [("a", 2)]
    fitted = CrossFitted(rows=[1, 0], values=[0.5, -0.1])  # only row 1 generalises
    crossed = fake_score("a", q=10, width=9, values=[3.0, 2.0, 1.0], rows=[0, 0, 1], crossfit=fitted)
    assert neuron_plan([crossed], config(neuron_budget=1000)) == [("a", 1)]


@pytest.mark.parametrize(("family", "head"), [("hf_bert", "classifier"), ("residual_cnn", "fc")])
@pytest.mark.parametrize("crossfit", [False, True])
def test_get_topo_model_keeps_within_the_budget(family, head, crossfit):
    model, batches, loss_fn, _, _ = BUILDERS[family]()
    budget = 60
    topo = hta.get_topo_model(
        model,
        hta.TopoAdapterConfig(num_adapters=2, neuron_budget=budget, crossfit=crossfit, modules_to_save=[head]),
        calibration_data=batches,
        loss_fn=loss_fn,
    )
    spent = sum(p.numel() for n, p in topo.named_parameters() if p.requires_grad and "topo_" in n)
    assert 0 < spent <= budget and len(topo.peft_config["default"].adapter_shapes) <= 2


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_a_fixed_neuron_count_above_max_neurons_is_honoured(solver):
    """neurons=24 with the default max_neurons=16: the Lanczos spectrum used to keep 16 rows, so the layer silently
    got 16 neurons (the recipes' topo rows at LoRA r=4 and r=8 stayed at the r=2 budget)."""
    model, batches, *_ = hf_bert(0, width=48)
    config = hta.TopoAdapterConfig(neurons=24, solver=solver, line_search_steps=4, modules_to_save=["classifier"])
    assert config.max_neurons == 16
    hta.get_topo_model(model, config, calibration_data=batches)
    assert [shape["neurons"] for shape in config.adapter_shapes.values()] == [24]


def test_fill_budget_opens_further_positions_for_what_full_ones_leave():
    narrow = fake_score("narrow", q=10, width=2, values=[0.9, 0.8])  # the best per parameter, 2 neurons at most
    small = fake_score("small", q=10, width=1, values=[0.7])
    wide = fake_score("wide", q=50, width=49, values=[2.0, 1.5])  # 0.04 and 0.03 per parameter
    scores = [narrow, small, wide]
    # two positions: narrow and small are full at 30 of 100 and wide cannot open
    assert neuron_plan(scores, config(neuron_budget=100)) == [("narrow", 2), ("small", 1)]
    # filled: wide opens for one neuron (80); its second would take 130
    filled = neuron_plan(scores, config(neuron_budget=100, fill_budget=True))
    assert filled == [("narrow", 2), ("small", 1), ("wide", 1)]
    # a budget the first positions spend leaves nothing to fill
    assert neuron_plan(scores, config(neuron_budget=30, fill_budget=True)) == [("narrow", 2), ("small", 1)]


def test_fill_budget_needs_a_budget_and_a_bool():
    with pytest.raises(ValueError, match="set neuron_budget too"):
        hta.TopoAdapterConfig(fill_budget=True)
    with pytest.raises(ValueError, match="fill_budget must be True or False"):
        hta.TopoAdapterConfig(neuron_budget=100, fill_budget="yes")
