"""One recipe's experiment: for every (seed, examples per class) a few-shot DatasetDict, then for every method a
freshly loaded pretrained classifier, built at the matched budget and trained with the Trainer. Each finished run
is appended to a JSON-lines file at once, so an interrupted experiment resumes where it stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .budget import count_trainable, head_name, match_budget
from .data import few_shot_splits
from .methods import METHODS, Built, build_method, is_matched, is_method, lr_for, topo_variant
from .training import TrainingSetup, checkpoint_dir, fit


@dataclass
class Task:
    """What a recipe fine-tunes: the labelled examples (`label` a ClassLabel), how a split becomes model inputs, the
    collator, a factory of fresh pretrained classifiers (called under torch.manual_seed(seed), so a seed's new head
    starts the same for every method) and the LoRA targets that set the budget."""

    name: str
    source: Dataset
    preprocess: Callable[[DatasetDict], DatasetDict]
    collator: Callable
    model_factory: Callable[[], nn.Module]
    lora_targets: Sequence[str]


@dataclass
class RunResult:
    method: str
    per_class: int
    seed: int
    accuracy: float  # test accuracy of the checkpoint chosen on validation, computed once
    trainable: int
    budget_gap: float | None  # (trainable - target) / target for the matched methods, None otherwise
    lr: float
    epochs: int
    train_seconds_per_epoch: float
    setup_seconds: float
    inference_seconds_per_batch: float
    note: str
    positions: list[str]
    budget_target: int | None = None
    lora_rank: int = 0
    validation: float = math.nan  # the selection metric on validation at the chosen epoch
    best_epoch: float = math.nan
    test_metrics: dict = field(default_factory=dict)
    curves: list[dict] = field(default_factory=list)
    gradient_norms: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # Where a one-shot topo setup's time went (TopoReport.seconds: warmup, capture, eigen_solves, directions,
    # line_search); empty otherwise.
    setup_phases: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.method, self.per_class, self.seed, self.epochs, self.lr, self.lora_rank)


def main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def default_device(setup: TrainingSetup) -> torch.device:
    """The device this process trains on: the one asked for, else accelerate's (CUDA rank under accelerate launch)."""
    if setup.device:
        return torch.device(setup.device)
    from accelerate import PartialState

    return PartialState().device


def calibration_batches(train: Dataset, collator, batch_size: int, seed: int, device) -> list[dict]:
    """The training split as collated batches (seeded order) on `device`: what topo scoring and insertion use."""
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(seed)
    )
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


def run_experiment(
    task: Task,
    methods: Sequence[str],
    per_class: Sequence[int],
    seeds: Sequence[int],
    setup: TrainingSetup,
    lrs: dict[str, float] | None = None,
    lora_rank: int = 2,
    num_adapters: int = 3,
    validation_per_class: int | None = None,
    test_per_class: int | None = None,
    output_dir: str = "outputs",
    results_path: str | None = None,
    resume: bool = False,
    after_run: Callable[[RunResult, Built], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Every (seed, per_class, method): split, fresh model, build, train with the Trainer, test once.

    `results_path`: each result is appended to this JSON-lines file as soon as it exists; with `resume`, runs
    already there (same method, size, seed, epochs, lr and LoRA rank) are read back instead of rerun.
    """
    methods = list(methods)
    unknown = [m for m in methods if not is_method(m)]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)} or topo+<levers>")
    needs_topo = [m for m in methods if (topo_variant(m) or {}).get("positions") == "topo"]
    if needs_topo and "topo" not in methods:
        methods.insert(0, "topo")
    methods.sort(key=lambda m: 0 if m == "topo" else 1)  # its positions are reused by the methods above
    done = load_runs(results_path) if resume and results_path else {}
    device = default_device(setup)
    results: list[RunResult] = []
    plan = [(seed, k) for seed in seeds for k in per_class]
    bar = tqdm(total=len(plan) * len(methods), desc=f"{task.name} runs", unit="run", disable=not setup.progress)
    for seed, k in plan:
        splits: DatasetDict | None = None
        topo_positions: list[str] | None = None
        for method in methods:
            lr = lr_for(method, lrs or {}, lora_rank)
            key = (method, k, seed, setup.epochs, lr, lora_rank)
            if key in done:
                result = done[key]
                results.append(result)
                topo_positions = result.positions if method == "topo" else topo_positions
                log(f"{method:22s} k={k:<3d} seed={seed} acc={result.accuracy:.4f} (already in {results_path})")
                bar.update()
                continue
            if splits is None:
                splits = task.preprocess(few_shot_splits(task.source, k, seed, validation_per_class, test_per_class))
                calibration = calibration_batches(splits["train"], task.collator, setup.batch_size, seed, device)
            result, built = run_one(
                task, method, splits, calibration, setup, lr, seed, k, lora_rank, num_adapters, topo_positions,
                device, output_dir, lr_for("head", lrs or {}),
            )  # fmt: skip
            topo_positions = result.positions if method == "topo" else topo_positions
            results.append(result)
            if results_path and main_process():
                with open(results_path, "a") as f:
                    f.write(json.dumps(asdict(result)) + "\n")
            if after_run is not None and main_process():
                after_run(result, built)
            gap = f" budget gap {result.budget_gap:+.1%}" if result.budget_gap is not None else ""
            log(
                f"{method:22s} k={k:<3d} seed={seed} test acc={result.accuracy:.4f} (validation {result.validation:.4f}"
                f", epoch {result.best_epoch:g}) trainable={result.trainable:,}{gap} "
                f"train/epoch={result.train_seconds_per_epoch:.2f}s setup={result.setup_seconds:.1f}s {result.note}"
            )
            bar.update()
            del built
    bar.close()
    with contextlib.suppress(OSError):  # the runs' checkpoint folders are gone; their parent too when empty
        os.rmdir(os.path.join(output_dir, "checkpoints"))
    return results


def run_one(
    task, method, splits, calibration, setup, lr, seed, per_class, lora_rank, num_adapters, topo_positions, device,
    output_dir, head_lr,
) -> tuple[RunResult, Built]:  # fmt: skip
    steps = setup.epochs * math.ceil(len(splits["train"]) / setup.batch_size)
    torch.manual_seed(seed)
    model = task.model_factory().to(device)
    budget = match_budget(model, lora_rank, num_adapters, task.lora_targets, batch=calibration[0])
    built = build_method(method, model, calibration, budget, steps, seed, task.lora_targets, topo_positions, head_lr)
    run_dir = checkpoint_dir(output_dir, task.name, method, f"k{per_class}", f"s{seed}", f"r{lora_rank}")
    # With its own head rate, the optimizer's base rate is the head's and the topo layers' is the method's times
    # adapter_lr_ratio, expressed as a multiple of it.
    base_lr = built.head_lr or lr * built.head_lr_ratio
    outcome = fit(
        built.model, splits, task.collator, base_lr, seed, setup, run_dir, built.callbacks, head_name(model),
        adapter_lr_ratio=built.adapter_lr_ratio * lr / base_lr,
    )  # fmt: skip
    if built.after_fit is not None:
        built.after_fit(built)
        built.trainable = count_trainable(built.model)
    gap = budget.relative_gap(built.trainable) if is_matched(method) else None
    result = RunResult(
        method, per_class, seed, float(outcome.test.get("accuracy", math.nan)), built.trainable, gap, lr,
        setup.epochs, outcome.seconds_per_epoch, built.setup_seconds, outcome.inference_seconds_per_batch,
        built.note, built.positions, budget.target, lora_rank, outcome.validation, outcome.best_epoch, outcome.test,
        outcome.curves, outcome.gradient_norms, setup_phases=built.setup_phases,
    )  # fmt: skip
    return result, built


def load_runs(path: str) -> dict[tuple, RunResult]:
    """The runs already in a JSON-lines results file, by (method, per_class, seed, epochs, lr, lora_rank)."""
    done: dict[tuple, RunResult] = {}
    if not os.path.exists(path):
        return done
    names = {f.name for f in fields(RunResult)}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            result = RunResult(**{k: v for k, v in record.items() if k in names})
            done[result.key] = result
    return done
