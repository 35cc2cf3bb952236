"""TopoGrowthCallback grows a model during transformers.Trainer.train()."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from hf_topoadapt.growth import GrowthConfig, ResidualMLP, TopoGrowthCallback


class Regression(Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, :1] * self.x[:, 1:2] + torch.sin(self.x[:, 2:3])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def test_callback_grows_the_model_during_training_and_new_layers_train(tmp_path):
    torch.manual_seed(0)
    model = ResidualMLP(4, 1, width=6, depth=1)
    callback = TopoGrowthCallback(GrowthConfig(schedule=[1], calibration_batches=2, max_insertions=2))
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Regression(), callbacks=[callback])
    trainer.train()
    log = callback.grower.log
    assert [entry["accepted"] for entry in log] == [True, True]
    assert [entry["epoch"] for entry in log] == pytest.approx([1.0, 2.0])
    assert model.depth == 3
    # The Trainer's optimizer holds every parameter of the grown model, new ones with Adam state.
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in model.parameters())
    first = model.blocks[callback.grower.insertions[0]["index"]]
    assert "exp_avg" in trainer.optimizer.state[first.down.weight]
    assert ((first.up != 0) & (first.up != 1)).any()  # U started on coordinate axes and has trained since
    assert len(trainer.lr_scheduler.get_last_lr()) == len(trainer.optimizer.param_groups)


def test_callback_with_patience_decides_on_the_evaluation_loss(tmp_path):
    torch.manual_seed(0)
    model = ResidualMLP(4, 1, width=6, depth=1)
    callback = TopoGrowthCallback({"patience": 1, "min_delta": 1e-3, "method": "net2deeper", "calibration_batches": 1})
    args = arguments(tmp_path, eval_strategy="epoch", num_train_epochs=3, learning_rate=1e-6)
    trainer = Trainer(
        model=model, args=args, train_dataset=Regression(), eval_dataset=Regression(16, seed=1), callbacks=[callback]
    )
    trainer.train()
    # With a tiny learning rate the validation loss moves by less than min_delta: every round after the first
    # exhausts the patience of 1, so the model grows at epochs 2 and 3.
    assert callback.grower.log and all(entry["val_loss"] is not None for entry in callback.grower.log)
    assert [entry["epoch"] for entry in callback.grower.log] == pytest.approx([2.0, 3.0])
    assert model.depth == 3


def test_trainer_checkpoint_resume_rebuilds_the_grown_model_and_matches(tmp_path):
    def trainer_for(folder, epochs, callback, **overrides):
        torch.manual_seed(0)
        model = ResidualMLP(4, 1, width=6, depth=1)
        args = arguments(folder, num_train_epochs=epochs, save_strategy="epoch", **overrides)
        return Trainer(model=model, args=args, train_dataset=Regression(), callbacks=[callback]), model

    config = {"schedule": [1], "calibration_batches": 2, "max_insertions": 2}
    full_callback = TopoGrowthCallback(config)
    full, full_model = trainer_for(tmp_path / "full", 3, full_callback)
    full.train()

    first_callback = TopoGrowthCallback(config)
    first, _ = trainer_for(tmp_path / "part", 3, first_callback)
    first.train()  # same run; its epoch-2 checkpoint is the resume point
    checkpoint = str(tmp_path / "part" / "checkpoint-8")
    callback = TopoGrowthCallback(config)
    resumed, model = trainer_for(tmp_path / "resumed", 3, callback)
    callback.restore(resumed, checkpoint)
    assert model.depth == 3  # grown at epochs 1 and 2 before the checkpoint
    resumed.train(resume_from_checkpoint=checkpoint)
    assert model.depth == full_model.depth == 3
    log, full_log = callback.grower.log, full_callback.grower.log
    assert [(e["epoch"], e["position"], e["accepted"]) for e in log] == [
        (e["epoch"], e["position"], e["accepted"]) for e in full_log
    ]
    assert len(log) == 2 and "max_insertions" in callback.grower.stopped  # the epoch-3 decision stopped growth
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
