"""Growing networks during training (METHOD.md section 7): where the new layer goes, the optimizer and
scheduler after growth, checkpoints and resume, the baselines and the settings' errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_topoadapt import ScoringConfig, TopoAdapter
from hf_topoadapt.growth import (
    Grower,
    GrowthConfig,
    ResidualCNN,
    ResidualMLP,
    SmallViT,
    grow,
    load_checkpoint,
    rebuild,
    save_checkpoint,
)
from hf_topoadapt.growth import state as growth_state
from hf_topoadapt.locate import find_positions
from hf_topoadapt.sensitivity.capture import transform_stream

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models


def regression_data(seed: int = 0, n: int = 48, batch: int = 12, features: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = (x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3])).double()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def mlp(depth: int = 1, seed: int = 0, width: int = 6) -> ResidualMLP:
    torch.manual_seed(seed)
    return ResidualMLP(4, 1, width=width, depth=depth).double()


def train_steps(model, optimizer, batches, scheduler=None) -> list[float]:
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def loss_of(model, batches) -> float:
    model.eval()
    return sum(float(F.mse_loss(model(x), y)) for x, y in batches) / len(batches)


def test_inserts_at_the_position_with_the_clearly_largest_eigenvalue():
    model, data = mlp(depth=2), regression_data()
    # Block 1 shifts the state by a large constant (D = 0, b = 3): the adjoint is unchanged but z = [h; 1] is
    # much longer after it, so the eigenvalue at "blocks.1" dominates.
    with torch.no_grad():
        model.blocks[1].down.weight.zero_()
        model.blocks[1].down.bias.fill_(3.0)
    grower = Grower(model, GrowthConfig(schedule=[1], calibration_batches=None), F.mse_loss)
    entry = grower.maybe_grow(1, calibration_data=data)
    others = [v for k, v in entry["scores"].items() if k != "blocks.1"]
    assert entry["accepted"] and entry["position"] == "blocks.1"
    assert entry["scores"]["blocks.1"] > 3 * max(others)
    assert entry["loss_after"] < entry["loss_before"]
    assert loss_of(model, data) == pytest.approx(entry["loss_after"], rel=1e-10)  # the model really holds it
    assert model.depth == 3 and isinstance(model.blocks[2], TopoAdapter) and entry["block_index"] == 2
    assert all(p.requires_grad for p in model.blocks[2].parameters())  # U trains too
    assert grower.insertions[0]["mode"] == "list" and not model.blocks[1]._forward_hooks  # no hook left


def test_optimizer_keeps_adam_state_and_gains_new_parameters_and_scheduler_continues():
    data = regression_data()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    train_steps(model, optimizer, data, scheduler)
    old = list(model.parameters())
    saved = {id(p): {k: v for k, v in optimizer.state[p].items()} for p in old}
    values = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in old}
    grower = Grower(model, GrowthConfig(schedule=[1]), F.mse_loss, optimizer)
    entry = grower.maybe_grow(1, calibration_data=data)
    assert entry["accepted"]
    new = [p for p in model.parameters() if all(p is not q for q in old)]
    assert len(new) == 3 and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]["params"]
    assert group[: len(old)] == old and all(any(p is q for q in group) for p in new)
    for p in old:  # the very same tensors, unchanged
        for key, tensor in saved[id(p)].items():
            assert optimizer.state[p][key] is tensor and torch.equal(tensor, values[id(p)][key])
    before = [p.detach().clone() for p in new]
    lrs = []
    for _ in range(2):
        train_steps(model, optimizer, data, scheduler)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(not torch.equal(a, p) for a, p in zip(before, new, strict=True))  # the new layer trains
    assert "exp_avg" in optimizer.state[new[0]]
    # StepLR(3, 0.5) after 4 + 4 + 4 steps: the schedule did not notice the growth.
    assert lrs == pytest.approx([1e-2 * 0.5**2, 1e-2 * 0.5**4])


def make_run(seed: int = 0):
    model = mlp(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
    grower = Grower(model, GrowthConfig(schedule=[1], method="topological"), F.mse_loss, optimizer)
    return model, optimizer, scheduler, grower


def test_resume_after_growth_gives_the_same_next_losses(tmp_path):
    data = regression_data()
    model, optimizer, scheduler, grower = make_run()
    for epoch in range(2):
        train_steps(model, optimizer, data, scheduler)
        grower.maybe_grow(epoch + 1, calibration_data=data)
    assert len(grower.insertions) == 2
    path = tmp_path / "run.pt"
    save_checkpoint(path, model, optimizer, scheduler, grower)
    continued = train_steps(model, optimizer, data, scheduler) + train_steps(model, optimizer, data, scheduler)

    fresh_model, fresh_optimizer, fresh_scheduler, fresh_grower = make_run(seed=123)  # other init: all comes from disk
    load_checkpoint(path, fresh_model, fresh_optimizer, fresh_scheduler, fresh_grower)
    assert fresh_grower.insertions == grower.insertions and fresh_grower.log == grower.log
    resumed = train_steps(fresh_model, fresh_optimizer, fresh_data := data, fresh_scheduler)
    resumed += train_steps(fresh_model, fresh_optimizer, fresh_data, fresh_scheduler)
    assert resumed == continued  # exactly


def test_grow_loop_resume_matches_an_uninterrupted_run(tmp_path):
    data, val = regression_data(), regression_data(seed=1, n=24)
    config = {"schedule": [2, 1], "max_insertions": 2}

    def run(epochs, resume=False, path=None):
        model = mlp(seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return grow(
            model, data, val, F.mse_loss, optimizer, None, config, epochs=epochs, checkpoint_path=path, resume=resume
        )

    _, full = run(6)
    path = str(tmp_path / "ckpt.pt")
    run(3, path=path)  # grew once at epoch 2
    grower, resumed = run(6, resume=True, path=path)
    assert [h["val_loss"] for h in resumed] == [h["val_loss"] for h in full]
    assert [h["depth"] for h in full] == [1, 2, 3, 3, 3, 3]
    assert grower.stopped == "" or "max_insertions" in grower.stopped


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    data = regression_data()
    model, optimizer, scheduler, grower = make_run()
    path = tmp_path / "run.pt"
    save_checkpoint(path, model, optimizer, scheduler, grower)
    grower.maybe_grow(1, calibration_data=data)

    def crash(obj, file):
        file.write(b"partial")
        raise RuntimeError("power cut")

    monkeypatch.setattr(growth_state.torch, "save", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(path, model, optimizer, scheduler, grower)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run.pt"]  # no temporary file left
    fresh, fresh_optimizer, fresh_scheduler, fresh_grower = make_run()
    load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, fresh_grower)
    assert fresh.depth == 1 and fresh_grower.insertions == []


def test_growth_log_is_written_as_json(tmp_path):
    data, log = regression_data(), tmp_path / "log.json"
    grower = Grower(mlp(), GrowthConfig(schedule=[1], log_path=str(log)), F.mse_loss)
    grower.maybe_grow(3, calibration_data=data, step=12)
    (entry,) = json.loads(log.read_text())
    assert entry["epoch"] == 3 and entry["step"] == 12 and set(entry["scores"]) == {"embeddings", "blocks.0"}
    for key in ("position", "neurons", "eps", "loss_before", "loss_after"):
        assert key in entry
    assert entry["loss_after"] < entry["loss_before"] and entry["eps"] != 0


@pytest.mark.parametrize("depth", [0, 1])
def test_grows_a_model_from_no_blocks_and_from_one(depth):
    model, data = mlp(depth=depth), regression_data()
    grower = Grower(model, GrowthConfig(schedule=[1]), F.mse_loss)
    entry = grower.maybe_grow(1, calibration_data=data)
    assert entry["accepted"] and model.depth == depth + 1
    assert set(entry["scores"]) == ({"stem"} if depth == 0 else {"embeddings", "blocks.0"})
    assert entry["position"] == max(entry["scores"], key=entry["scores"].get)  # the best-scored position


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_cnn_and_vit_grow_inside_their_block_list_and_rebuild(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    build = (lambda: ResidualCNN(1, 3, channels=4).double()) if kind == "cnn" else (lambda: SmallViT(1, 3).double())
    model = build()
    grower = Grower(model, GrowthConfig(schedule=[1], scoring={"kernel_size": 1}), F.cross_entropy)
    entry = grower.maybe_grow(1, calibration_data=data)
    assert entry["accepted"] and model.depth == 2
    assert grower.insertions[0]["layout"] == ("channels" if kind == "cnn" else "tokens")
    fresh = rebuild(build(), grower.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_a_model_that_is_not_ours_gets_the_layer_by_a_hook_and_rebuilds():
    model, data, loss_fn, _, _ = models.residual_mlp()
    base = copy.deepcopy(model)
    grower = Grower(model, GrowthConfig(schedule=[1]), loss_fn)
    entry = grower.maybe_grow(1, calibration_data=data)
    assert entry["accepted"] and grower.insertions[0]["mode"] == "hook"
    assert len(model.blocks) == 3  # the block list is not changed
    fresh = rebuild(copy.deepcopy(base), grower.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = data[0][0]
    assert torch.equal(fresh(x), model(x)) and not torch.equal(base(x), model(x))


# -- baselines -------------------------------------------------------------------------------------------


def grow_once(method: str, model=None, **settings):
    model = model if model is not None else mlp(depth=2)
    data = regression_data()
    before = copy.deepcopy(model)
    grower = Grower(model, GrowthConfig(method=method, schedule=[1], **settings), F.mse_loss)
    entry = grower.maybe_grow(1, calibration_data=data)
    return model, before, grower, entry, data


@pytest.mark.parametrize("method", ["net2deeper", "td_zero", "sensli"])
def test_function_preserving_inits_leave_outputs_unchanged_and_train(method):
    model, before, grower, entry, data = grow_once(method)
    x = data[0][0]
    assert entry["accepted"] and model.depth == 3
    assert torch.equal(model(x), before(x))
    new = model.blocks[grower.insertions[0]["index"]]
    assert torch.count_nonzero(new.up) == 0 and torch.count_nonzero(new.down.weight) > 0
    loss = F.mse_loss(model(x), data[0][1])
    loss.backward()
    assert new.up.grad.abs().sum() > 0  # gradients flow into U from the first step


def test_td_position_with_random_or_zero_init_uses_the_topological_position():
    *_, eigen, _ = grow_once("topological")
    *_, zero, _ = grow_once("td_zero")
    model, _, grower, random_entry, _ = grow_once("td_random")
    assert eigen["position"] == zero["position"] == random_entry["position"]
    assert random_entry["scores"] == pytest.approx(eigen["scores"])


def test_random_init_is_small_and_not_the_eigenvector():
    eigen_model, _, eigen_grower, eigen_entry, _ = grow_once("topological", neurons=1, scoring={"neurons": 1})
    model, _, grower, entry, _ = grow_once("td_random", neurons=1)
    eigen_row = eigen_model.blocks[eigen_grower.insertions[0]["index"]].down.weight.detach().flatten()
    random_row = model.blocks[grower.insertions[0]["index"]].down.weight.detach().flatten()
    cosine = float(eigen_row @ random_row / (eigen_row.norm() * random_row.norm()))
    assert abs(cosine) < 0.9
    assert random_row.abs().max() < 0.1  # init_scale = 1e-2
    assert abs(entry["loss_after"] - entry["loss_before"]) < 1e-3 * entry["loss_before"]


def test_random_insertion_is_seeded_and_can_pick_every_position():
    picks = {grow_once("random", seed=seed)[3]["position"] for seed in range(12)}
    assert picks == {"embeddings", "blocks.0", "blocks.1"}
    assert grow_once("random", seed=5)[3]["position"] == grow_once("random", seed=5)[3]["position"]


def test_sensli_picks_the_largest_gradient_norm_of_a_zero_tanh_layer():
    model, data = mlp(depth=2), regression_data()
    # Reference: one position at a time, a plain h + tanh(W h + b) with W = 0 and autograd.
    reference = {}
    for position in find_positions(model, "blocks"):
        layer = nn.Linear(6, 6).double()
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        with transform_stream(position, lambda h, layer=layer: h + torch.tanh(layer(h))):
            loss = sum(F.mse_loss(model(x), y) for x, y in data) / len(data)
            weight, bias = torch.autograd.grad(loss, [layer.weight, layer.bias])
        reference[position.name] = float(torch.sqrt(weight.pow(2).sum() + bias.pow(2).sum()))
    *_, entry, _ = grow_once("sensli", model=model)
    assert entry["scores"] == pytest.approx(reference, rel=1e-10)
    assert entry["position"] == max(reference, key=reference.get)


def test_fixed_method_never_grows():
    model, _, grower, entry, _ = grow_once("fixed")
    assert entry is None and model.depth == 2 and grower.log == []


# -- stop rules and schedules ----------------------------------------------------------------------------


def test_schedule_decides_after_e0_then_each_e_i_epochs():
    grower = Grower(mlp(), GrowthConfig(schedule=[3, 1, 2]), F.mse_loss)
    due = [grower.should_grow() for _ in range(9)]
    assert [i + 1 for i, d in enumerate(due) if d] == [3, 4, 6, 8]  # E(2) = 2 repeats


def test_patience_grows_after_n_rounds_without_improvement():
    grower = Grower(mlp(), GrowthConfig(patience=2), F.mse_loss)
    due = [grower.should_grow(v) for v in [1.0, 0.9, 0.95, 0.92, 0.8, 0.85, 0.81]]
    assert due == [False, False, False, True, False, False, True]


def test_stop_rules():
    data = regression_data()
    _, _, grower, entry, _ = grow_once("topological", scoring={"threshold": 1e6})
    assert not entry["accepted"] and "threshold" in grower.stopped
    assert grower.maybe_grow(2, calibration_data=data) is None  # stopped for good

    model = mlp(depth=1)
    grower = Grower(model, GrowthConfig(method="net2deeper", schedule=[1], max_depth=3), F.mse_loss)
    for epoch in range(5):
        grower.maybe_grow(epoch, calibration_data=data)
    assert model.depth == 3 and "max_depth" in grower.stopped

    grower = Grower(mlp(), GrowthConfig(method="net2deeper", schedule=[1], max_insertions=1), F.mse_loss)
    for epoch in range(3):
        grower.maybe_grow(epoch, calibration_data=data)
    assert len(grower.insertions) == 1 and "max_insertions" in grower.stopped

    model = mlp()
    budget = sum(p.numel() for p in model.parameters()) + 10  # smaller than any new layer
    grower = Grower(model, GrowthConfig(method="net2deeper", schedule=[1], max_params=budget), F.mse_loss)
    entry = grower.maybe_grow(1, calibration_data=data)
    assert not entry["accepted"] and model.depth == 1 and "max_params" in grower.stopped

    grower = Grower(mlp(), GrowthConfig(method="net2deeper", schedule=[1], stop_patience=2), F.mse_loss)
    decisions = [grower.maybe_grow(e, v, data) for e, v in enumerate([1.0, 0.5, 0.6, 0.7, 0.4])]
    # 0.6 is the first stage without improvement (grow on), 0.7 the second (stop).
    assert [d is not None for d in decisions] == [True, True, True, False, False]
    assert "no validation improvement" in grower.stopped


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "magic", "schedule": [1]}, "unknown growth method"),
        ({"patience": -1}, "patience must be >= 1"),
        ({"schedule": []}, "schedule is empty"),
        ({"schedule": [2, 0]}, "schedule entries"),
        ({}, "give schedule"),
        ({"schedule": [1], "patience": 2}, "not both"),
        ({"schedule": [1], "where": "middle"}, "where must be"),
        ({"schedule": [1], "init": "ones"}, "init must be"),
        ({"schedule": [1], "max_depth": -2}, "max_depth"),
        ({"schedule": [1], "scoring": {"eps_s": 2.0}}, "eps_s"),
        ({"schedule": [1], "neurons": 0}, "neurons must be"),
        ({"schedule": [1], "neurons": []}, "neurons must be"),
        ({"schedule": [1], "neurons": [3, 1.5]}, "neurons must be"),
        ({"schedule": [1], "neurons": float("nan")}, "neurons must be"),
        ({"schedule": [float("nan")]}, "schedule entries"),
        ({"schedule": ["2"]}, "schedule entries"),
        ({"schedule": [1], "max_insertions": 0}, "max_insertions must be >= 1 or None, got 0"),
        ({"schedule": [1], "stop_patience": 0}, "stop_patience must be >= 1 or None, got 0"),
        ({"schedule": [1], "calibration_batches": -1}, "calibration_batches must be >= 1 or None, got -1"),
        ({"schedule": [1], "max_params": 0}, "max_params must be >= 1 or None, got 0"),
        ({"schedule": [1], "max_depth": 1.5}, "max_depth must be a whole number"),
        ({"schedule": [1], "param_group": -1}, "param_group must be >= 0"),
        ({"schedule": [1], "init_scale": 0.0}, r"init_scale must be > 0\.0 .*never get a gradient"),
        ({"schedule": [1], "init_scale": -0.1}, "init_scale must be > 0"),
        ({"schedule": [1], "init_scale": float("nan")}, "init_scale must be a finite number"),
        ({"schedule": [1], "min_delta": -0.1}, "min_delta must be >= 0"),
        ({"schedule": [1], "min_delta": float("inf")}, "min_delta must be a finite number"),
        ({"schedule": [1], "seed": 0.5}, "seed must be a whole number"),
        ({"schedule": [1], "scoring": {"lanczos_screen_iterations": 0}}, "lanczos_screen_iterations must be >= 1"),
    ],
)
def test_bad_settings_give_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        GrowthConfig(**settings)


def test_usage_errors():
    grower = Grower(mlp(), GrowthConfig(patience=1), F.mse_loss)
    with pytest.raises(ValueError, match="pass val_loss"):
        grower.maybe_grow(1)
    grower = Grower(mlp(), GrowthConfig(schedule=[1]), F.mse_loss)
    with pytest.raises(ValueError, match="calibration_data"):
        grower.maybe_grow(1)
    data, model = regression_data(), mlp()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="scheduler_interval"):
        grow(model, data, None, F.mse_loss, optimizer, None, {"schedule": [1]}, scheduler_interval="batch")
    with pytest.raises(ValueError, match="checkpoint_path"):
        grow(model, data, None, F.mse_loss, optimizer, None, {"schedule": [1]}, resume=True)
    assert ScoringConfig is not None


@pytest.mark.parametrize("method", ["topological", "sensli"])
def test_a_hugging_face_model_grows_by_hooks_with_dict_batches(method):
    model, data, _, width, _ = models.hf_bert()
    base = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    grower = Grower(model, GrowthConfig(method=method, schedule=[1], max_depth=1), None, optimizer)
    entry = grower.maybe_grow(1, calibration_data=data)
    (spec,) = grower.insertions
    layout = "vector" if spec["position"] == "head_input" else "tokens"  # the classifier reads the pooled vector
    assert entry["accepted"] and spec["mode"] == "hook" and spec["width"] == width and spec["layout"] == layout
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
    assert grower.maybe_grow(2, calibration_data=data) is None and "max_depth" in grower.stopped
    fresh = rebuild(copy.deepcopy(base), grower.state_dict())
    fresh.load_state_dict(model.state_dict())
    batch = {k: v for k, v in data[0].items() if k != "labels"}
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    if method == "sensli":  # function-preserving: the base model's outputs
        assert torch.equal(base(**batch).logits, model(**batch).logits)


def test_baseline_neurons_per_insertion_follow_a_list_and_the_last_repeats():
    model = mlp(depth=1)
    data = regression_data()
    grower = Grower(model, GrowthConfig(method="random", schedule=[1], neurons=[2, 3]), F.mse_loss)
    sizes = [grower.maybe_grow(epoch, calibration_data=data)["neurons"] for epoch in (1, 2, 3)]
    assert sizes == [2, 3, 3]
    assert [spec["neurons"] for spec in grower.insertions] == [2, 3, 3]
