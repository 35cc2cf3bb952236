"""Progressive growth of a TopoModel during fine-tuning: from the head (or k0 layers) the adapter gets one
eigenvector-initialised layer per growth decision, as a TopoLayer of its peft adapter, with the optimizer extended in
place; it saves and reloads with both loaders, resumes from a Trainer checkpoint taken between two insertions, stops at
its budget or score threshold, and grows identically on 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import hf_topoadapt as hta
from hf_topoadapt.growth import (
    GrowthConfig,
    TopoGrowthCallback,
    TopoModelGrower,
    grow,
    head_only_topo_model,
    make_grower,
)
from hf_topoadapt.growth import topo_model as topo_growth
from hf_topoadapt.sensitivity.objective import mean_loss
from hf_topoadapt.tuner import TopoLayer

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models

SCRIPT = Path(__file__).parent / "scripts" / "distributed_topo_growth.py"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def head_only(family: str = "hf_vit", seed: int = 0, float32: bool = False, **settings) -> hta.TopoModel:
    base = getattr(models, family)(seed)[0]
    base = base.float() if float32 else base
    return head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"], **settings))


def with_k0_layers(family: str = "hf_vit", seed: int = 0, k0: int = 1) -> hta.TopoModel:
    base, batches, *_ = getattr(models, family)(seed)
    config = hta.TopoAdapterConfig(num_adapters=k0, modules_to_save=["classifier"], line_search_steps=4)
    return hta.get_topo_model(base, config, calibration_data=batches)


def topo_layers(model) -> dict[str, TopoLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TopoLayer)}


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**batch).logits for batch in batches])


def adam_step(model, optimizer, batches) -> None:
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def plain(log: list[dict]) -> list[dict]:
    """The growth log as JSON would have it, without the timings."""
    return json.loads(json.dumps([{k: v for k, v in e.items() if k != "seconds"} for e in log]))


# 1. the starting point: the head alone


def test_head_only_model_trains_the_head_and_saves_and_loads_with_both_loaders(tmp_path):
    model = head_only()
    _, batches, *_ = models.hf_vit(0)
    assert not topo_layers(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a "trained" head
    expected = logits(model, batches)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["adapter_shapes"] == {} and saved["target_modules"] is None
    for loaded in (
        hta.TopoModel.from_pretrained(models.hf_vit(0)[0], str(tmp_path)),
        peft.PeftModel.from_pretrained(models.hf_vit(0)[0], str(tmp_path)),
    ):
        assert not topo_layers(loaded)
        assert torch.equal(logits(loaded, batches), expected)
    # A config without shapes still needs get_topo_model (or this constructor): an empty model is asked for explicitly.
    with pytest.raises(ValueError, match="head_only_topo_model"):
        hta.TopoModel(models.hf_vit(0)[0], hta.TopoAdapterConfig(modules_to_save=["classifier"]))


# 2. one growth step: the layer joins the adapter, the optimizer keeps its state


@pytest.mark.parametrize("k0", [0, 1])
def test_growth_adds_topo_layers_to_the_adapter_and_extends_the_optimizer(tmp_path, k0):
    model = head_only("hf_bert") if k0 == 0 else with_k0_layers("hf_bert", k0=k0)
    _, batches, *_ = models.hf_bert(0)
    start_positions = list(model.peft_config["default"].adapter_shapes)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adam_step(model, optimizer, batches)  # Adam state to keep
    old = {p: (s["exp_avg"], s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for p, s in optimizer.state.items()}
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1]), optimizer=optimizer)
    optimizer.zero_grad(set_to_none=True)

    # Until no position is left: those of a 2-block BERT are the blocks' outputs and the classifier's input (the
    # embedding output does not compete by default: TopoAdapterConfig.include_embeddings).
    for _ in range(5):
        before = {id(p) for g in optimizer.param_groups for p in g["params"]}
        entry = grower.grow_now(batches, epoch=1.0)
        if not entry["accepted"]:
            break
        # The adapter holds the layer: the loss is the line search's, so the eigen weights arrived and the layers
        # already there (possibly on the same block) kept theirs.
        assert mean_loss(model.eval(), batches, None) == pytest.approx(entry["loss_after"], rel=1e-9)
        new = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in before]
        assert len(new) == 2 and all(p.requires_grad for p in new)  # D and b (U stays fixed: train_up=False)
        assert new[0].shape == (entry["neurons"], 8)
    assert "every candidate position carries a layer" in grower.stopped  # a position with a layer is no candidate
    assert all(p.grad is None for p in model.parameters())  # scoring left no gradient for the next step to add to

    config = model.peft_config["default"]
    grown = [e["position"] for e in grower.log if e["accepted"]]
    assert len(grown) >= 2 and list(config.adapter_shapes) == start_positions + grown
    assert config.target_modules == list(config.adapter_shapes)
    assert {"bert.encoder.layer.0", "bert.encoder.layer.1"} <= set(grown + start_positions)
    assert "embeddings" not in grown + start_positions
    layers = len(config.adapter_shapes)
    assert len(topo_layers(model)) == layers
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(".topo_down.default." in n for n in trainable_names) == 2 * layers
    # Adam's state of the old parameters: the same tensors, with the same values; a step then trains them all.
    for parameter, (exp_avg, value, value_sq) in old.items():
        assert optimizer.state[parameter]["exp_avg"] is exp_avg
        assert torch.equal(exp_avg, value) and torch.equal(optimizer.state[parameter]["exp_avg_sq"], value_sq)
    adam_step(model, optimizer, batches)
    assert all("exp_avg" in optimizer.state[p] for g in optimizer.param_groups for p in g["params"])

    # The grown model saves and loads back with both loaders, and its report lists the grown layers.
    expected = logits(model, batches)
    model.save_pretrained(tmp_path)
    for loaded in (
        hta.TopoModel.from_pretrained(models.hf_bert(0)[0], str(tmp_path)),
        peft.PeftModel.from_pretrained(models.hf_bert(0)[0], str(tmp_path)),
    ):
        assert len(topo_layers(loaded)) == layers
        assert torch.equal(logits(loaded, batches), expected)
    report = json.loads((tmp_path / "topo_report.json").read_text())
    assert [i["position"] for i in report["insertions"] if i["accepted"]] == start_positions + grown
    # load_adapter (a second adapter next to the first) sees every grown layer too.
    other = hta.TopoModel.from_pretrained(models.hf_bert(0)[0], str(tmp_path), adapter_name="first")
    other.load_adapter(str(tmp_path), "second")
    other.set_adapter("second")
    assert torch.equal(logits(other, batches), expected)


def test_a_named_adapter_grows_trainable_layers_of_its_own():
    base, batches, *_ = models.hf_bert(0)
    model = head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"]), adapter_name="task")
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1]))
    entry = grower.grow_now(batches)
    assert entry["accepted"] and entry["adapter"] == "task"
    (layer,) = topo_layers(model).values()
    assert set(layer.topo_down) == {"task"} and layer.active_adapters == ["task"]
    assert layer.topo_down["task"].weight.requires_grad and not layer.topo_up["task"].requires_grad  # train_up=False
    assert list(model.peft_config["task"].adapter_shapes) == [entry["position"]]
    assert model.topo_reports["task"].chosen == [entry["position"]]


# 3. under the Trainer


def image_rows(batches: int = 4, seed: int = 0) -> list[dict]:
    return [
        {"pixel_values": b["pixel_values"][i].float(), "labels": b["labels"][i]}
        for b in models._image_batches(seed, batches)
        for i in range(len(b["labels"]))
    ]


def arguments(folder, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(folder), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **overrides})


class AdamProbe(TrainerCallback):
    """Placed before the growth callback it records the Adam state at each epoch end; after it, it checks that state."""

    def __init__(self, record: dict, check: bool):
        self.record, self.check = record, check

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        held = [list(map(id, group["params"])) for group in optimizer.param_groups]
        if not self.check:
            self.record.update(
                held=held, state={p: (s["exp_avg"], s["exp_avg"].clone()) for p, s in optimizer.state.items()}
            )
            return
        self.record.setdefault("grown", []).append(sum(map(len, held)) - sum(map(len, self.record["held"])))
        assert len(held) == len(self.record["held"])  # no new param group: the LR scheduler carries on
        for now, before in zip(held, self.record["held"], strict=True):
            assert now[: len(before)] == before  # the old parameters, in the same order (new ones appended)
        for parameter, (exp_avg, value) in self.record["state"].items():
            assert optimizer.state[parameter]["exp_avg"] is exp_avg and torch.equal(exp_avg, value)


class AdamCheck(AdamProbe):
    """A class of its own: the Trainer warns about a second callback of one class."""


def test_trainer_grows_the_topo_model_at_the_scheduled_epochs_and_the_loss_goes_down(tmp_path):
    torch.manual_seed(0)
    model = head_only("hf_vit", float32=True)
    rows = image_rows()
    batches = [torch.utils.data.default_collate(rows[i : i + 4]) for i in range(0, len(rows), 4)]
    loss_at_start = mean_loss(model.eval(), batches, None)
    record = {}
    growth = TopoGrowthCallback(GrowthConfig(schedule=[1], max_insertions=2, calibration_batches=2))
    callbacks = [AdamProbe(record, check=False), growth, AdamCheck(record, check=True)]
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=rows, callbacks=callbacks)
    trainer.train()

    log = growth.grower.log
    assert [(e["epoch"], e["accepted"]) for e in log] == [(1.0, True), (2.0, True)]
    assert "max_insertions" in growth.grower.stopped  # the epoch-3 decision
    assert record["grown"] == [2, 2, 0]  # D and b of one layer at epochs 1 and 2, nothing at epoch 3
    assert list(model.peft_config["default"].adapter_shapes) == [e["position"] for e in log]
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    for layer in topo_layers(model).values():
        assert "exp_avg" in trainer.optimizer.state[layer.topo_down["default"].weight]  # the new layers trained
    assert len(trainer.lr_scheduler.get_last_lr()) == len(trainer.optimizer.param_groups)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end
    assert mean_loss(model.eval(), batches, None) < loss_at_start - 0.05
    assert all(e["loss_after"] < e["loss_before"] for e in log)


def test_trainer_resume_between_two_insertions_continues_exactly(tmp_path):
    rows = image_rows()
    config = {"schedule": [1], "max_insertions": 2, "calibration_batches": 2}

    def run(folder, checkpoint=None):
        torch.manual_seed(0)
        model = head_only("hf_vit", float32=True)
        callback = TopoGrowthCallback(config)
        args = arguments(tmp_path / folder, save_strategy="epoch")
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
        if checkpoint is not None:
            callback.restore(trainer, checkpoint)
            assert len(topo_layers(model)) == 1  # the first grown layer is back (zero until the checkpoint loads)
        trainer.train(resume_from_checkpoint=checkpoint)
        return model, callback

    full, full_callback = run("full")
    checkpoint = tmp_path / "full" / "checkpoint-3"  # end of epoch 1: after the first insertion, before the second
    saved = json.loads((checkpoint / "topo_growth.json").read_text())
    assert [i["position"] for i in saved["insertions"]] == [full_callback.grower.log[0]["position"]]
    assert len(json.loads((checkpoint / "adapter_config.json").read_text())["adapter_shapes"]) == 1

    resumed, callback = run("resumed", str(checkpoint))
    assert plain(callback.grower.log) == plain(full_callback.grower.log)
    assert len(callback.grower.log) == 2 and callback.grower.log[1]["epoch"] == 2.0
    ours, theirs = trainable(resumed), trainable(full)
    assert ours.keys() == theirs.keys() and sum("topo_down" in n for n in ours) == 4
    for name, value in theirs.items():
        assert (ours[name] - value).abs().max() <= 1e-6, name
    assert json.dumps(resumed.topo_report.as_dict()) == json.dumps(full.topo_report.as_dict())


def test_resuming_without_restore_and_unsupported_trainer_settings_are_clear_errors(tmp_path):
    callback = TopoGrowthCallback({"schedule": [1]})
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match=r"call callback\.restore\(trainer, checkpoint\)"):
        callback.on_train_begin(args, TrainerState(global_step=3), TrainerControl(), model=head_only())
    # What the Trainer's resume does without restore: the checkpoint's grown layers would be dropped silently.
    grown = head_only("hf_bert")
    TopoModelGrower(grown, GrowthConfig(schedule=[1])).grow_now(models.hf_bert(0)[1])
    grown.save_pretrained(tmp_path / "grown")
    with pytest.raises(ValueError, match="holds topo layers this adapter does not have.*TopoGrowthCallback.restore"):
        head_only("hf_bert").load_adapter(str(tmp_path / "grown"), "default", is_trainable=True)
    with pytest.raises(ValueError, match="load_best_model_at_end is not supported"):
        best = arguments(tmp_path, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)
        callback.on_train_begin(best, TrainerState(), TrainerControl(), model=head_only())
    # Patience decides on evaluation losses: a Trainer that never evaluates would never grow.
    patience = TopoGrowthCallback({"patience": 1})
    trainer = Trainer(model=head_only(), args=args, train_dataset=image_rows(1), callbacks=[patience])
    with pytest.raises(ValueError, match="never evaluates: set eval_strategy='epoch'"):
        trainer.train()


# 4. the plain loop


def test_plain_loop_grows_a_topo_model_and_resumes_from_its_checkpoint(tmp_path):
    _, batches, *_ = models.hf_bert(0)

    def run(epochs, resume=False):
        torch.manual_seed(0)
        model = head_only("hf_bert")
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        config = GrowthConfig(schedule=[1], max_insertions=2)
        path = str(tmp_path / "loop.pt")
        grower, history = grow(model, batches, batches, None, optimizer, None, config, epochs, checkpoint_path=path,
                               resume=resume)  # fmt: skip
        return model, grower, history

    full, full_grower, history = run(3)
    assert isinstance(full_grower, TopoModelGrower)
    assert [h["depth"] for h in history] == [1, 2, 2] and history[-1]["train_loss"] < history[0]["train_loss"]
    run(1)  # its checkpoint: after epoch 1 and the first insertion; the second comes after the resume
    resumed, grower, _ = run(3, resume=True)
    assert plain(grower.log) == plain(full_grower.log)
    assert list(resumed.peft_config["default"].adapter_shapes) == list(full.peft_config["default"].adapter_shapes)
    ours, theirs = trainable(resumed), trainable(full)
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, rtol=0, atol=1e-10), name
    assert resumed.topo_report.chosen == full.topo_report.chosen


# 5. stop rules


def test_budget_gives_fewer_neurons_then_stops_and_is_never_exceeded():
    model = head_only("hf_bert", neurons=4)
    _, batches, *_ = models.hf_bert(0)
    head = 8 * 3 + 3
    budget = head + 9 + 5  # room for one neuron (8 weights + a bias: U is fixed), not for two
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1], max_trainable=budget))
    first = grower.grow_now(batches)
    assert first["accepted"] and first["budget_neurons"] == 1 and first["neurons"] == 1
    assert topo_growth.trainable_parameters(model) == head + 9 <= budget
    second = grower.grow_now(batches)
    assert not second["accepted"] and "would exceed the parameter budget (max_trainable=" in second["reason"]
    assert grower.stopped and topo_growth.trainable_parameters(model) == head + 9
    assert grower.maybe_grow(2.0, calibration_data=batches) is None  # stopped for good


def test_growth_stops_when_no_position_scores_above_the_threshold():
    model = head_only("hf_bert", threshold=1e6)
    _, batches, *_ = models.hf_bert(0)
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1]))
    entry = grower.grow_now(batches)
    assert not entry["accepted"] and "threshold" in grower.stopped
    assert not topo_layers(model) and model.peft_config["default"].adapter_shapes == {}


def test_a_cross_fitted_gain_decides_the_stop_rule_when_the_record_has_one(monkeypatch):
    original = topo_growth.insert_layer

    def with_crossfit(*args, **kwargs):
        record = original(*args, **kwargs)
        record.crossfit_gain = -0.01  # the best layer fits noise: its value on held-out examples is negative
        return record

    monkeypatch.setattr(topo_growth, "insert_layer", with_crossfit)
    model = head_only("hf_bert")
    _, batches, *_ = models.hf_bert(0)
    before = logits(model, batches)
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1]))
    entry = grower.grow_now(batches)
    assert entry["eigenvalue"] > 0 and entry["crossfit_gain"] == -0.01
    assert not entry["accepted"] and "cross-fitted gain" in grower.stopped
    assert not topo_layers(model) and torch.equal(logits(model, batches), before)


# 6. what is refused


def test_growth_settings_and_models_that_cannot_work_are_refused():
    lora = peft.get_peft_model(models.hf_bert(0)[0], peft.LoraConfig(target_modules=["query"]))
    with pytest.raises(TypeError, match="LoraModel adapter: the new layers would not be part of its adapter"):
        make_grower(lora, GrowthConfig(schedule=[1]))
    with pytest.raises(ValueError, match="max_trainable is for growing a TopoModel"):
        make_grower(models.residual_mlp()[0], GrowthConfig(schedule=[1], max_trainable=100))
    with pytest.raises(ValueError, match="supports method='topological'"):
        make_grower(head_only(), GrowthConfig(method="random", schedule=[1]))
    with pytest.raises(ValueError, match="max_trainable must be >= 1"):
        GrowthConfig(schedule=[1], max_trainable=0)
    with pytest.raises(ValueError, match="name the new head there"):
        head_only_topo_model(models.hf_vit(0)[0], hta.TopoAdapterConfig())
    with pytest.raises(ValueError, match="positions=\\[...\\]"):
        head_only_topo_model(models.hf_vit(0)[0], hta.TopoAdapterConfig(target_modules=["vit.layers.0"]))
    grown = with_k0_layers("hf_vit")
    state = {"insertions": [{"position": grown.topo_report.chosen[0], "adapter_name": "default", "shape": {}}]}
    with pytest.raises(ValueError, match="already carries the grown layer"):
        topo_growth.rebuild_topo_model(grown, state)


# 7. two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_grow_identically_in_a_plain_loop_and_under_the_trainer(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # --multi_gpu goes through torch.distributed.run; the script's use_cpu / Accelerator(cpu=True) then runs gloo.
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("loop", "trainer"):
        ranks = [json.loads((tmp_path / f"{mode}{r}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2]
        assert [r["wrapped"] for r in ranks] == ["DistributedDataParallel"] * 2
        assert ranks[0]["positions"] == ranks[1]["positions"] and len(ranks[0]["positions"]) == 2, mode
        assert ranks[0]["eps"] == ranks[1]["eps"], mode
        assert ranks[0]["parameters"].keys() == ranks[1]["parameters"].keys()
        assert sum("topo_down" in name for name in ranks[0]["parameters"]) == 4  # D and b of both grown layers
        for name, values in ranks[0]["parameters"].items():
            assert values == pytest.approx(ranks[1]["parameters"][name], abs=1e-7), (mode, name)
        assert ranks[0]["head"] != pytest.approx(ranks[0]["head_at_start"], abs=1e-4), mode  # it trained


@pytest.mark.parametrize("precision", ["bf16 weights", "fp32 under autocast"])
def test_growth_of_a_topo_model_in_bf16_and_under_autocast(precision):
    """A grown layer of a bf16 TopoModel computes and returns bf16 (its weights stay in the adapter's dtype), and an
    fp32 model grows under CPU autocast: the grown model trains (a step lowers the loss) in both."""
    base, batches, *_ = models.hf_bert(0)
    base = base.to(torch.bfloat16) if precision == "bf16 weights" else base.float()
    model = head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"], line_search_steps=4))
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1], max_insertions=1, calibration_batches=None))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "bf16 weights")
    with autocast:
        entry = grower.grow_now(batches)
    assert entry["accepted"], entry["reason"]
    (layer,) = [m for m in model.modules() if isinstance(m, TopoLayer)]
    assert layer.topo_down["default"].weight.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        with autocast:
            out = model(**batches[0])
        assert out.logits.dtype == torch.bfloat16
        losses.append(float(out.loss))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[1] < losses[0]


def test_a_grown_layer_takes_growths_step_not_the_one_shot_default():
    """TopoAdapterConfig's tenth of the step is for adapters inserted once before training; growth takes
    GrowthConfig.step_scale (1, the paper's, by default: a tenth lost on validation in growth). Same position and
    directions, a tenth of the eps when asked; a value outside (0, 1] is refused."""
    import copy

    base, batches, *_ = models.hf_bert(0)
    start = head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"], line_search_steps=4))
    assert start.peft_config["default"].step_scale == 0.1
    grown = {}
    for scale in (None, 0.1):
        model = copy.deepcopy(start)
        options = {} if scale is None else {"step_scale": scale}
        config = GrowthConfig(schedule=[1], max_insertions=1, calibration_batches=None, **options)
        entry = TopoModelGrower(model, config).grow_now(batches)
        assert entry["accepted"], entry["reason"]
        grown[scale] = entry
    assert GrowthConfig(schedule=[1]).step_scale == 1.0
    assert grown[0.1]["position"] == grown[None]["position"]
    assert grown[0.1]["eps"] == pytest.approx(0.1 * grown[None]["eps"], rel=1e-9)
    for bad, message in ((0.0, r"step_scale must be > 0"), (2.0, r"step_scale must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            GrowthConfig(schedule=[1], step_scale=bad)
