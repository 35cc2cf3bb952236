"""Head warm-up before scoring: only the head trains, the loss goes down, everything else comes back as it was, and
the cheap path (the head trained on its captured inputs) takes exactly the steps that training through the whole
model takes."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS
from torch.nn import functional as F

from hf_topoadapt import warmup


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("family", "head"), [("hf_bert", "classifier"), ("hf_vit", "classifier"), ("residual_cnn", "fc")]
)
def test_only_the_head_trains_and_the_loss_goes_down(family, head):
    model, batches, loss_fn, _, _ = BUILDERS[family]()
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = snapshot(model)
    record = warmup.warm_up_head(model, batches, [head], steps=30, lr=5e-2, loss_fn=loss_fn)
    assert record.cached and record.loss_after < record.loss_before
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(head + ".") for name in changed)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())  # the modes come back too


@pytest.mark.parametrize("family", ["hf_bert", "residual_cnn"])
def test_the_cached_path_takes_the_same_steps_as_the_whole_model(family, monkeypatch):
    head = {"hf_bert": "classifier", "residual_cnn": "fc"}[family]
    fast, batches, loss_fn, _, _ = BUILDERS[family]()
    slow, _, _, _, _ = BUILDERS[family]()
    assert warmup.warm_up_head(fast, batches, [head], steps=12, lr=1e-2, loss_fn=loss_fn).cached
    monkeypatch.setattr(warmup, "_shortcut_matches", lambda *args: False)
    assert not warmup.warm_up_head(slow, batches, [head], steps=12, lr=1e-2, loss_fn=loss_fn).cached
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_a_loss_of_the_whole_output_trains_through_the_model():
    """loss_fn(outputs, batch) of dict batches cannot be computed from the head's output: no shortcut."""
    model, batches, _, _, _ = BUILDERS["hf_bert"]()

    def loss_fn(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"])

    record = warmup.warm_up_head(model, batches, ["classifier"], steps=5, loss_fn=loss_fn)
    assert not record.cached and record.loss_after < record.loss_before


def test_bad_head_names_and_steps_are_clear_errors():
    model, batches, loss_fn, _, _ = BUILDERS["hf_bert"]()
    with pytest.raises(ValueError, match=r"no module of the model is named \['clasifier'\]"):
        warmup.warm_up_head(model, batches, ["clasifier"], steps=3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        warmup.warm_up_head(model, batches, ["classifier"], steps=0)


def test_get_topo_model_scores_with_the_warmed_head_and_leaves_the_base_model_as_it_was(tmp_path):
    import copy

    import hf_topoadapt as hta

    model, batches, _, _, _ = BUILDERS["hf_bert"]()
    untouched = copy.deepcopy(model)
    plain = hta.get_topo_model(copy.deepcopy(model), hta.TopoAdapterConfig(modules_to_save=["classifier"]), batches)
    config = hta.TopoAdapterConfig(modules_to_save=["classifier"], head_warmup_steps=25, head_warmup_lr=5e-2)
    warmed = hta.get_topo_model(model, config, calibration_data=batches)
    record = warmed.topo_report.warmup
    assert record["steps"] == 25 and record["cached"] and record["loss_after"] < record["loss_before"]
    assert list(warmed.topo_report.seconds)[0] == "warmup" and warmed.topo_report.seconds["warmup"] > 0
    assert [s["eigenvalue"] for s in warmed.topo_report.scores] != [s["eigenvalue"] for s in plain.topo_report.scores]
    head = warmed.get_base_model().classifier
    assert torch.equal(head.original_module.weight, untouched.classifier.weight)  # the user's head, unchanged
    assert not torch.equal(head.modules_to_save["default"].weight, untouched.classifier.weight)  # the warmed copy
    with torch.no_grad(), warmed.disable_adapter():
        assert torch.equal(warmed(**batches[0]).logits, untouched(**batches[0]).logits)
    warmed.save_pretrained(tmp_path)
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(tmp_path))
    assert loaded.topo_report.warmup == record
    with torch.no_grad():
        assert torch.allclose(loaded(**batches[0]).logits, warmed(**batches[0]).logits, atol=1e-12)


def test_warmup_needs_the_head_named():
    import hf_topoadapt as hta

    with pytest.raises(ValueError, match="head_warmup_steps needs the head to warm up: name it in modules_to_save"):
        hta.TopoAdapterConfig(head_warmup_steps=10)
    with pytest.raises(ValueError, match="head_warmup_lr must be > 0"):
        hta.TopoAdapterConfig(modules_to_save=["classifier"], head_warmup_steps=10, head_warmup_lr=0)
