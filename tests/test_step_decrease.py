"""ScoringConfig(step_decrease=F): the step from the gain (its predicted decrease is F of the loss) instead of a line
search."""

from __future__ import annotations

import pytest
from models import BUILDERS

import hf_topoadapt as hta
from hf_topoadapt.sensitivity.line_search import fixed_step


def test_one_step_in_both_signs_keeps_the_lower_loss_unless_it_rises():
    curve = {0.1: 0.9, -0.1: 0.8}
    kept = fixed_step(curve.__getitem__, 1.0, 0.1)
    assert (kept.accepted, kept.eps, kept.loss, kept.trials) == (True, -0.1, 0.8, [(0.1, 0.9), (-0.1, 0.8)])
    level = fixed_step(lambda eps: 1.0, 1.0, 0.1)  # an equal loss is kept: a small decrease can round away in bf16
    assert level.accepted and level.eps == 0.1
    worse = fixed_step(lambda eps: 1.1, 1.0, 0.1)
    assert (worse.accepted, worse.eps, worse.loss, worse.step) == (False, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="must be > 0"):
        fixed_step(lambda eps: 1.0, 1.0, 0.0)


@pytest.mark.parametrize("family", ["hf_bert", "residual_cnn"])
def test_the_layers_step_predicts_the_asked_fraction_of_the_loss(family):
    model, batches, loss_fn, _, _ = BUILDERS[family]()
    config = hta.TopoAdapterConfig(num_adapters=2, step_decrease=0.01)
    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=loss_fn)
    accepted = [i for i in topo.topo_report.insertions if i["accepted"]]
    assert accepted
    for insertion in accepted:  # step_scale (0.1 by default) does not apply on top of it
        assert insertion["predicted_decrease"] == pytest.approx(0.01 * insertion["loss_before"], rel=1e-9)
        assert insertion["loss_after"] <= insertion["loss_before"]


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), "1%"])
def test_a_step_decrease_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(ValueError, match="step_decrease must be"):
        hta.TopoAdapterConfig(step_decrease=bad)
