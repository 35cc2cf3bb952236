"""Training and evaluation through `transformers.Trainer`: the arguments every recipe run shares, the callbacks
the methods need (AdaLoRA's rank allocation, epoch timing, adapter gradient norms for the diagnostics), and one
`fit` that trains, keeps the best checkpoint by the validation metric and reports the test metrics once."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .metrics import DEFAULT_METRICS, classification_metrics


@dataclass
class TrainingSetup:
    """What every method of a recipe trains with (the learning rate is per method family)."""

    epochs: int = 10
    batch_size: int = 8
    eval_batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    select_metric: str = "accuracy"  # on the validation split: picks the checkpoint that is tested
    metrics: Sequence[str] = DEFAULT_METRICS
    bf16: bool = False
    device: str | None = None  # None: the Trainer's choice (CUDA when present, or what accelerate launch set)
    progress: bool = True
    diagnostics: bool = False  # also evaluate the training split each epoch and record adapter gradient norms


def training_arguments(output_dir: str, lr: float, seed: int, setup: TrainingSetup, **overrides) -> TrainingArguments:
    """AdamW with a linear warm-up and decay, evaluation on the validation split every epoch; the best epoch by
    `metric_for_best_model` is restored at the end by `BestEpoch` (see there why not load_best_model_at_end)."""
    select = f"validation_{setup.select_metric}" if setup.diagnostics else setup.select_metric
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch_size,
        per_device_eval_batch_size=setup.eval_batch_size,
        num_train_epochs=setup.epochs,
        learning_rate=lr,
        weight_decay=setup.weight_decay,
        warmup_steps=setup.warmup,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        metric_for_best_model=select,
        greater_is_better=True,
        seed=seed,
        data_seed=seed,
        bf16=setup.bf16,
        use_cpu=setup.device == "cpu",
        label_names=["labels"],  # a PeftModel's forward signature does not show them
        remove_unused_columns=False,  # the datasets hold model inputs only
        report_to="none",
        disable_tqdm=not setup.progress,
        dataloader_pin_memory=False,
    )
    return TrainingArguments(**{**settings, **overrides})


def unwrap(model):
    return getattr(model, "module", model)


class AdaLoraAllocation(TrainerCallback):
    """AdaLoRA reallocates its ranks only when `update_and_allocate` runs after every optimizer step, with the
    gradients still in place; the Trainer does not call it (without this, AdaLoRA trains as plain LoRA)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        unwrap(model).base_model.update_and_allocate(state.global_step + 1)


class BestEpoch(TrainerCallback):
    """Keeps the trainable tensors of the epoch with the best validation metric (`metric_for_best_model`) in memory
    and puts them back when training ends: the Trainer's best checkpoint, without writing checkpoints.

    Trainer's own load_best_model_at_end reloads from disk and is wrong twice here: peft resizes an AdaLoRA
    checkpoint to the final rank pattern (an earlier epoch's then fails to load), and transformers 5 saves renamed
    models (ViT) under their old key names but reloads without converting them, silently keeping the last epoch.
    Parameters added after the best epoch (growth) have no saved value: their layer is switched off (zero input
    weights make a topo layer the identity) so the restored model computes what it did then.
    """

    def __init__(self):
        self.best: dict[str, torch.Tensor] | None = None
        self.value, self.epoch = -math.inf, None
        self.reported: set[str] = set()

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        key = args.metric_for_best_model
        value = (metrics or {}).get(key if key.startswith("eval_") else f"eval_{key}")
        self.reported |= set(metrics or {})
        if value is None:  # another evaluation set (the training split, in the diagnostics)
            return
        value = value if args.greater_is_better else -value
        if value > self.value:  # strictly: on a tie the earlier epoch stays
            self.value, self.epoch = value, state.epoch
            self.best = {name: p.detach().clone() for name, p in unwrap(model).named_parameters() if p.requires_grad}

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best is None:
            if self.reported:
                raise ValueError(
                    f"no evaluation reported {args.metric_for_best_model}; the reported ones: {sorted(self.reported)}"
                )
            return
        for name, parameter in unwrap(model).named_parameters():
            if name in self.best:
                parameter.copy_(self.best[name])
            elif parameter.requires_grad and "topo_down" in name:
                parameter.zero_()


class EpochTimer(TrainerCallback):
    """Seconds of every epoch's training steps (evaluation and checkpoints excluded)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


ADAPTER_MARKERS = ("topo_", "lora_")


class GradientNorms(TrainerCallback):
    """The norm of the adapter gradients (topo or LoRA parameters) and of the head's, before each of the first
    `steps` optimizer steps: shows whether the adapters train at all near their starting point."""

    def __init__(self, steps: int = 50, head: str | None = None):
        self.steps, self.head = steps, head
        self.log: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.steps:
            return
        squares = {"adapters": 0.0, "head": 0.0}
        for name, parameter in unwrap(model).named_parameters():
            if parameter.grad is None:
                continue
            kind = "adapters" if any(m in name for m in ADAPTER_MARKERS) else "head"
            if kind == "head" and self.head and f"{self.head}." not in name:
                continue
            squares[kind] += float(parameter.grad.detach().float().pow(2).sum())
        self.log.append({"step": state.global_step + 1, **{k: math.sqrt(v) for k, v in squares.items()}})


@dataclass
class FitResult:
    test: dict[str, float]  # test metrics of the best checkpoint, computed once
    validation: float  # the best validation value of the selection metric
    best_epoch: float
    curves: list[dict]  # per epoch: running train loss, validation (with diagnostics also training-split) metrics
    seconds_per_epoch: float
    inference_seconds_per_batch: float
    gradient_norms: list[dict] = field(default_factory=list)


def epoch_curves(log_history: list[dict]) -> list[dict]:
    """One row per epoch from the Trainer's log: train loss and every eval_* value, keys without the prefix."""
    rows: dict[float, dict] = {}
    for entry in log_history:
        epoch = entry.get("epoch")
        if epoch is None:
            continue
        row = rows.setdefault(round(epoch, 4), {"epoch": round(epoch, 4)})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                row[key.removeprefix("eval_")] = value
    return [rows[k] for k in sorted(rows)]


def fit(
    model,
    splits,
    collator,
    lr: float,
    seed: int,
    setup: TrainingSetup,
    run_dir: str,
    callbacks: Sequence[TrainerCallback] = (),
    head: str | None = None,
    trainer_hook: Callable[[Trainer], None] | None = None,
    adapter_lr_ratio: float = 1.0,
) -> FitResult:
    """Trains `model` on splits["train"] with the Trainer, evaluates on splits["validation"] each epoch, restores
    the best epoch (`BestEpoch`) and computes the test metrics on splits["test"] once. `adapter_lr_ratio` != 1 trains
    the topo layers of a TopoModel at that multiple of `lr` (hf_topoadapt's create_topo_optimizer), the rest at `lr`."""
    args = training_arguments(run_dir, lr, seed, setup)
    optimizers = (None, None)
    if adapter_lr_ratio != 1.0:
        from hf_topoadapt.optimizers import create_topo_optimizer

        optimizer = create_topo_optimizer(
            model, torch.optim.AdamW, lr=lr, adapter_lr_ratio=adapter_lr_ratio, weight_decay=setup.weight_decay
        )
        optimizers = (optimizer, None)
    timer, best = EpochTimer(), BestEpoch()
    extra: list[TrainerCallback] = [timer, *callbacks, best]
    norms = GradientNorms(head=head) if setup.diagnostics else None
    if norms is not None:
        extra.append(norms)
    evaluation = splits["validation"]
    if setup.diagnostics:
        evaluation = {"validation": splits["validation"], "training": splits["train"]}
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=classification_metrics(setup.metrics),
        callbacks=extra,
        optimizers=optimizers,
    )
    if not setup.progress:
        trainer.remove_callback(PrinterCallback)  # the run's one-line summary is enough
    if trainer_hook is not None:
        trainer_hook(trainer)
    try:
        trainer.train()
        start = time.perf_counter()
        prediction = trainer.predict(splits["test"], metric_key_prefix="test")
        inference = time.perf_counter() - start
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(run_dir, ignore_errors=True)  # logs only: checkpoints are never written
    curves = epoch_curves(trainer.state.log_history)
    batches = max(1, math.ceil(len(splits["test"]) / setup.eval_batch_size))
    test = {k.removeprefix("test_"): v for k, v in prediction.metrics.items() if not k.endswith(("_runtime", "second"))}
    return FitResult(
        test=test,
        validation=float(best.value if args.greater_is_better else -best.value),
        best_epoch=float(best.epoch if best.epoch is not None else math.nan),
        curves=curves,
        seconds_per_epoch=sum(timer.seconds) / max(1, len(timer.seconds)),
        inference_seconds_per_batch=inference / batches,
        gradient_norms=norms.log if norms is not None else [],
    )


def checkpoint_dir(output_dir: str, *parts) -> str:
    return os.path.join(output_dir, "checkpoints", "-".join(str(p) for p in parts))
