"""create_topo_optimizer: the topo layers at their own learning rate, the rest (the head) at the method's; the Trainer
schedules both groups alike and growth adds new layers to the adapters' group."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import hf_topoadapt as hta
from hf_topoadapt.growth import GrowthConfig, TopoModelGrower, head_only_topo_model
from hf_topoadapt.optimizers import ADAPTER_GROUP, create_topo_optimizer, is_adapter_parameter

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models


def adapted(seed: int = 0) -> tuple[hta.TopoModel, list[dict]]:
    base, batches, *_ = models.hf_bert(seed)
    config = hta.TopoAdapterConfig(num_adapters=2, modules_to_save=["classifier"], line_search_steps=4)
    return hta.get_topo_model(base, config, calibration_data=batches), batches


def names_by_group(model, optimizer) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def test_adapters_and_head_get_their_own_rates_and_the_trainers_decay_rule():
    model, _ = adapted()
    optimizer = create_topo_optimizer(model, torch.optim.AdamW, lr=1e-2, adapter_lr_ratio=0.25, weight_decay=0.1)
    groups = names_by_group(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*groups) == trainable and sum(map(len, groups)) == len(trainable)  # each one exactly once
    adapters, others = groups[0] | groups[1], groups[2] | groups[3]
    assert adapters == {n for n in trainable if ".topo_down." in n} and adapters
    assert others and all("classifier" in n for n in others)
    assert all(is_adapter_parameter(n) for n in adapters) and not any(is_adapter_parameter(n) for n in others)
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates == pytest.approx([2.5e-3, 2.5e-3, 1e-2, 1e-2])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert all(n.endswith("bias") for n in groups[1] | groups[3])
    assert not any(n.endswith("bias") for n in groups[0] | groups[2])


def test_the_trainer_schedules_both_groups_and_trains_the_adapters_slower(tmp_path):
    torch.manual_seed(0)
    model, batches = adapted()
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["labels"]))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = create_topo_optimizer(model, lr=1e-2, adapter_lr_ratio=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        warmup_steps=2, lr_scheduler_type="linear", report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), optimizers=(optimizer, None))
    trainer.train()
    rates = [g["lr"] for g in optimizer.param_groups]  # after the last step the schedule reached 0 for every group
    assert rates == pytest.approx([0.0] * 4, abs=1e-12)
    initial = [g["initial_lr"] for g in optimizer.param_groups]
    assert initial == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
    assert all(value > 0 for value in moved.values())
    # Adam moves every weight by about its rate per step: the adapters' largest move is well below the head's
    adapters = max(v for n, v in moved.items() if is_adapter_parameter(n))
    head = max(v for n, v in moved.items() if not is_adapter_parameter(n))
    assert adapters < 0.3 * head


def test_growth_puts_new_layers_into_the_adapter_group():
    base, batches, *_ = models.hf_bert(0)
    model = head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"]))
    optimizer = create_topo_optimizer(model, lr=1e-2, adapter_lr_ratio=0.5)
    assert not optimizer.param_groups[ADAPTER_GROUP]["params"]  # nothing to adapt yet: the head alone
    assert GrowthConfig(schedule=[1]).param_group == ADAPTER_GROUP
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1], max_insertions=1), optimizer=optimizer)
    entry = grower.grow_now(batches, epoch=1.0)
    assert entry["accepted"]
    grown = names_by_group(model, optimizer)[ADAPTER_GROUP]
    assert grown and all(".topo_down." in n for n in grown)
    assert optimizer.param_groups[ADAPTER_GROUP]["lr"] == pytest.approx(5e-3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"adapter_lr_ratio": 0.0}, r"adapter_lr_ratio must be > 0\.0 \(the adapters' lr is lr \* adapter_lr_ratio\)"),
        ({"adapter_lr_ratio": float("nan")}, "adapter_lr_ratio must be a finite number"),
        ({"lr": -1.0}, r"lr must be > 0\.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0\.0"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    model, _ = adapted()
    with pytest.raises(ValueError, match=message):
        create_topo_optimizer(model, **{"lr": 1e-2, **settings})


def test_a_model_with_nothing_to_train_is_refused():
    model, _ = adapted()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_topo_optimizer(model, lr=1e-2)


def test_a_bf16_model_with_a_scaled_step_trains_with_its_own_adapter_rate_in_bf16(tmp_path):
    """The paths a bf16 user takes: a bf16 base adapted with step_scale < 1, then the Trainer in bf16 with the
    adapters at half the head's rate: the insertions lowered the loss, training lowers it further, the base stays
    bf16."""
    import math

    base, batches, *_ = models.hf_bert(0)
    config = hta.TopoAdapterConfig(
        num_adapters=2, modules_to_save=["classifier"], line_search_steps=4, step_scale=0.5
    )  # fmt: skip
    model = hta.get_topo_model(base.to(torch.bfloat16), config, calibration_data=batches)
    insertions = [i for i in model.topo_report.insertions if i["accepted"]]
    # none raised the loss and together they lowered it (a small decrease can round away in bf16: an equal loss is kept)
    assert insertions and all(i["loss_after"] <= i["loss_before"] for i in insertions)
    assert insertions[-1]["loss_after"] < insertions[0]["loss_before"]
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["labels"]))]
    optimizer = create_topo_optimizer(model, lr=2e-2, adapter_lr_ratio=0.5)
    args = TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=10, per_device_train_batch_size=6,
        learning_rate=2e-2, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), optimizers=(optimizer, None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-2, 2e-2, 2e-2])
    # peft's convention: the base stays bf16, adapter weights are kept in float32 (autocast_adapter_dtype)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if is_adapter_parameter(name) else torch.bfloat16), name
