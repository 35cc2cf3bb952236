"""Shared pieces of the transfer-learning recipes: few-shot splits, method builders at a matched
trainable-parameter budget, a plain PyTorch training loop, accuracy and timing, and result tables.

Every method is built on a freshly loaded pretrained model (seeded, so the randomly initialised
classifier is the same for every method of one seed) and trained with the same AdamW budget.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

TOPO_FAMILY = ("topo", "topo_optimized", "bottleneck_at_topo", "topo_random_positions", "topo_last_blocks")
METHODS = ("head", "full", "lora", "adalora", *TOPO_FAMILY)
# One learning rate per method family, the best of a grid on seed 0 at 8 per class, 10 epochs (40 steps):
# adapters {5e-4, 2e-3, 5e-3, 1e-2, 2e-2} (best mean over lora, adalora, topo, topo_optimized), head
# {2e-3, 5e-3, 1e-2, 2e-2}, full {5e-5, 1e-4, 2e-4, 5e-4}. Every adapter method (ablations too) shares one value,
# so the comparison between them is only about where and how the parameters are placed.
DEFAULT_LRS = {"head": 2e-2, "full": 2e-4, "peft": 1e-2}
HEAD_NAMES = ("classifier", "score", "head")


# ----------------------------------------------------------------------------------------------------- data
def few_shot_split(
    labels: Sequence[int], per_class: int, seed: int, test_per_class: int | None = None
) -> tuple[list[int], list[int]]:
    """Stratified, seeded split: `per_class` training indices per class, the rest (at most `test_per_class`
    per class, also seeded) for testing. Training sets of one seed are nested: the first 8 of a class are
    also the first 8 of its 16."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_class):
        indices = list(by_class[label])
        if len(indices) <= per_class:
            raise ValueError(f"class {label} has {len(indices)} examples: not enough for {per_class} per class + test")
        rng.shuffle(indices)
        train += indices[:per_class]
        rest = indices[per_class:]
        test += rest if test_per_class is None else rest[:test_per_class]
    return sorted(train), sorted(test)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int = 64) -> dict[str, torch.Tensor]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    batch = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


def batches_of(data: dict[str, torch.Tensor], batch_size: int, shuffle_seed: int | None = None) -> list[dict]:
    """Splits an encoded dataset into dict batches (trimmed to their longest sequence)."""
    n = len(data["labels"])
    order = list(range(n))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    out = []
    for start in range(0, n, batch_size):
        index = torch.as_tensor(order[start : start + batch_size])
        batch = {k: v[index] for k, v in data.items()}
        if "attention_mask" in batch:
            length = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------- parameter budget
def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_name(model: nn.Module) -> str:
    names = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in names:
            return name
    raise ValueError(f"no classification head found among {HEAD_NAMES}; children are {list(names)}")


def lora_params_per_rank(model: nn.Module, target_modules: Sequence[str]) -> int:
    """Trainable LoRA parameters per unit of rank: sum of in + out features of the targeted Linear layers."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules:
            total += module.in_features + module.out_features
    if total == 0:
        raise ValueError(f"no nn.Linear named {list(target_modules)} in the model: set lora_targets")
    return total


@dataclass
class Budget:
    """The matched budget: LoRA rank r sets the target, topo neurons are chosen to meet it."""

    lora_rank: int
    num_adapters: int
    topo_neurons: int
    head_params: int
    target: int  # trainable parameters of LoRA rank r (adapters + head)
    topo_expected: int

    def relative_gap(self, count: int) -> float:
        return (count - self.target) / self.target


def match_budget(model: nn.Module, lora_rank: int, num_adapters: int, lora_targets: Sequence[str]) -> Budget:
    """Neurons per topo adapter so that num_adapters * neurons * (width + 1) + head ~= LoRA rank r + head.

    A topo adapter with m neurons on a width-d stream trains D (m x d) and b (m): m (d + 1) parameters.
    """
    head_params = sum(p.numel() for p in model.get_submodule(head_name(model)).parameters())
    width = int(model.config.hidden_size)
    target = lora_rank * lora_params_per_rank(model, lora_targets) + head_params
    neurons = max(1, round((target - head_params) / (num_adapters * (width + 1))))
    expected = num_adapters * neurons * (width + 1) + head_params
    return Budget(lora_rank, num_adapters, neurons, head_params, target, expected)


# ------------------------------------------------------------------------------------------------- methods
@dataclass
class Built:
    model: nn.Module
    trainable: int
    note: str = ""
    positions: list[str] = field(default_factory=list)
    on_step: Callable[[int], None] | None = None  # called after every optimizer step (AdaLoRA's allocator)
    setup_seconds: float = 0.0


def topo_candidates(model: nn.Module) -> list[str]:
    from hf_topoadapt.locate import find_positions

    return [p.name for p in find_positions(model)]


def build_method(
    method: str,
    model: nn.Module,
    train_batches: list[dict],
    budget: Budget,
    total_steps: int,
    seed: int,
    lora_targets: Sequence[str] = ("query", "value"),
    topo_positions: list[str] | None = None,
) -> Built:
    """Wraps a fresh pretrained classifier for one method. `topo_positions` (the positions `topo` chose for this
    seed) is needed by `bottleneck_at_topo`."""
    start = time.perf_counter()
    head = head_name(model)
    built = _build(method, model, train_batches, budget, total_steps, seed, list(lora_targets), head, topo_positions)
    built.setup_seconds = time.perf_counter() - start
    built.trainable = count_trainable(built.model)
    return built


def _build(method, model, train_batches, budget, total_steps, seed, lora_targets, head, topo_positions) -> Built:
    import peft

    import hf_topoadapt as hta

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Built(model, 0, "every weight")
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] == head)
        return Built(model, 0, f"{head} only")
    if method == "lora":
        config = peft.LoraConfig(
            r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, lora_dropout=0.0, target_modules=lora_targets,
            modules_to_save=[head],
        )  # fmt: skip
        return Built(peft.get_peft_model(model, config), 0, f"r={budget.lora_rank} on {'/'.join(lora_targets)}")
    if method == "adalora":
        tinit, tfinal = max(1, total_steps // 10), max(1, total_steps // 5)
        if total_steps - tinit - tfinal <= 0:
            tinit = tfinal = 0
        target_r = max(1, budget.lora_rank // 2)
        config = peft.AdaLoraConfig(
            init_r=budget.lora_rank, target_r=target_r, total_step=total_steps, tinit=tinit, tfinal=tfinal,
            deltaT=max(1, total_steps // 20), lora_alpha=2 * budget.lora_rank, lora_dropout=0.0,
            target_modules=lora_targets, modules_to_save=[head],
        )  # fmt: skip
        wrapped = peft.get_peft_model(model, config)
        return Built(
            wrapped,
            0,
            f"init_r={budget.lora_rank} -> target_r={target_r}, {total_steps} steps",
            on_step=lambda step: wrapped.base_model.update_and_allocate(step),
        )
    if method not in TOPO_FAMILY:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")

    common = dict(neurons=budget.topo_neurons, modules_to_save=[head], seed=seed)
    if method in ("topo", "topo_optimized"):
        directions = "optimized" if method == "topo_optimized" else "coordinate"
        config = hta.TopoAdapterConfig(num_adapters=budget.num_adapters, directions=directions, **common)
    else:
        candidates = topo_candidates(model)
        if method == "bottleneck_at_topo":
            if not topo_positions:
                raise ValueError("bottleneck_at_topo needs the positions chosen by topo (run topo first)")
            positions, init = topo_positions, "random"
        elif method == "topo_random_positions":
            positions, init = random.Random(1000 + seed).sample(candidates, budget.num_adapters), "eigen"
        else:  # topo_last_blocks
            positions, init = candidates[-budget.num_adapters :], "eigen"
        config = hta.TopoAdapterConfig(num_adapters=len(positions), target_modules=list(positions), init=init, **common)
    wrapped = hta.get_topo_model(model, config, calibration_data=train_batches)
    chosen = list(wrapped.topo_report.chosen) if wrapped.topo_report else list(config.target_modules)
    neurons = [shape["neurons"] for shape in (config.adapter_shapes or {}).values()]
    note = f"{config.init} init, neurons {neurons}"
    if wrapped.topo_report and config.init == "eigen":
        accepted = [i for i in wrapped.topo_report.insertions if i["accepted"]]
        note += ", eps " + " ".join(f"{i['eps']:.3g}" for i in accepted)
        note += f", calibration loss {accepted[0]['loss_before']:.3f} -> {accepted[-1]['loss_after']:.3f}"
    return Built(wrapped, 0, note, positions=chosen)


# ------------------------------------------------------------------------------------------- train / evaluate
def train(
    model: nn.Module,
    batches: list[dict],
    epochs: int,
    lr: float,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    weight_decay: float = 0.01,
    desc: str = "train",
) -> float:
    """AdamW with linear warm-up (10%) and decay; returns seconds per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches)
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    torch.manual_seed(seed)
    model.train()
    step = 0
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for epoch in range(epochs):
            order = list(range(len(batches)))
            random.Random(seed * 1000 + epoch).shuffle(order)
            for i in order:
                loss = model(**batches[i]).loss
                loss.backward()
                optimizer.step()
                step += 1
                if on_step is not None:
                    on_step(step)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    _synchronize()
    model.eval()
    return (time.perf_counter() - start) / max(1, epochs)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """(accuracy, seconds per batch)."""
    model.eval()
    predictions, labels = [], []
    start = time.perf_counter()
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        predictions.append(model(**inputs).logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    _synchronize()
    seconds = (time.perf_counter() - start) / max(1, len(batches))
    return accuracy(torch.cat(labels).numpy(), torch.cat(predictions).numpy()), seconds


def accuracy(labels, predictions) -> float:
    try:
        from sklearn.metrics import accuracy_score
    except ImportError:  # a bare GPU image: the same number without scikit-learn
        return float((labels == predictions).mean())
    return float(accuracy_score(labels, predictions))


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lr_for(method: str, lrs: dict[str, float]) -> float:
    return lrs.get(method, lrs["peft"] if method not in ("head", "full") else DEFAULT_LRS[method])


# ------------------------------------------------------------------------------------------------ experiment
@dataclass
class RunResult:
    method: str
    per_class: int
    seed: int
    accuracy: float
    trainable: int
    budget_gap: float | None  # (trainable - target) / target for the matched methods, None otherwise
    lr: float
    epochs: int
    train_seconds_per_epoch: float
    setup_seconds: float
    inference_seconds_per_batch: float
    note: str
    positions: list[str]


MATCHED = ("lora", "adalora", *TOPO_FAMILY)


def run_experiment(
    model_factory: Callable[[], nn.Module],
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    methods: Sequence[str],
    per_class: Sequence[int],
    seeds: Sequence[int],
    epochs: int,
    batch_size: int = 8,
    eval_batch_size: int = 32,
    test_per_class: int | None = None,
    lora_rank: int = 2,
    num_adapters: int = 3,
    lora_targets: Sequence[str] = ("query", "value"),
    lrs: dict[str, float] | None = None,
    max_length: int = 64,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    results_path: str | None = None,
) -> list[RunResult]:
    """Every (per_class, seed, method): fresh model, build, train, evaluate. `model_factory()` returns a
    freshly loaded pretrained classifier; it is called under torch.manual_seed(seed) so the new head's
    initialisation is the same for every method of a seed. Each result is also appended to `results_path`
    (JSON lines) as soon as it exists, so an interrupted run keeps what it finished."""
    lrs = {**DEFAULT_LRS, **(lrs or {})}
    methods = list(methods)
    if "bottleneck_at_topo" in methods and "topo" not in methods:
        methods.insert(0, "topo")
    # topo first: bottleneck_at_topo reuses its positions
    methods.sort(key=lambda m: 0 if m == "topo" else 1)
    results: list[RunResult] = []
    for seed in seeds:
        for k in per_class:
            train_idx, test_idx = few_shot_split(labels, k, seed, test_per_class)
            train_data = encode(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], max_length)
            test_data = encode(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], max_length)
            train_batches = _to(batches_of(train_data, batch_size, shuffle_seed=seed), device)
            test_batches = _to(batches_of(test_data, eval_batch_size), device)
            total_steps = epochs * len(train_batches)
            topo_positions: list[str] | None = None
            for method in methods:
                torch.manual_seed(seed)
                model = model_factory().to(device)
                budget = match_budget(model, lora_rank, num_adapters, lora_targets)
                built = build_method(
                    method, model, train_batches, budget, total_steps, seed, lora_targets, topo_positions
                )
                if method == "topo":
                    topo_positions = built.positions
                gap = budget.relative_gap(built.trainable) if method in MATCHED else None
                lr = lr_for(method, lrs)
                per_epoch = train(
                    built.model, train_batches, epochs, lr, seed, built.on_step, desc=f"{method} k={k} s={seed}"
                )
                accuracy, infer = evaluate(built.model, test_batches)
                result = RunResult(
                    method, k, seed, accuracy, built.trainable, gap, lr, epochs, per_epoch, built.setup_seconds,
                    infer, built.note, built.positions,
                )  # fmt: skip
                results.append(result)
                if results_path:
                    with open(results_path, "a") as f:
                        f.write(json.dumps(asdict(result)) + "\n")
                gap_text = f" ({gap:+.1%} vs target {budget.target:,})" if gap is not None else ""
                log(
                    f"{method:22s} k={k:<3d} seed={seed} acc={accuracy:.4f} trainable={built.trainable:,}{gap_text} "
                    f"train/epoch={per_epoch:.2f}s setup={built.setup_seconds:.1f}s {built.note}"
                )
                del built, model
    return results


def _to(batches: list[dict], device) -> list[dict]:
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


# ------------------------------------------------------------------------------------------------- reporting
def summarise(results: Sequence[RunResult]) -> list[dict]:
    """One row per (method, per_class): mean and std over seeds."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.per_class), []).append(r)
    rows = []
    for (method, k), runs in groups.items():
        accuracies = [r.accuracy for r in runs]
        rows.append(
            {
                "method": method,
                "per_class": k,
                "seeds": len(runs),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                "trainable": round(statistics.fmean(r.trainable for r in runs)),
                "budget_gap": None if runs[0].budget_gap is None else statistics.fmean(r.budget_gap for r in runs),
                "lr": runs[0].lr,
                "train_seconds_per_epoch": statistics.fmean(r.train_seconds_per_epoch for r in runs),
                "setup_seconds": statistics.fmean(r.setup_seconds for r in runs),
                "inference_seconds_per_batch": statistics.fmean(r.inference_seconds_per_batch for r in runs),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| method | per class | seeds | accuracy (mean ± std) | trainable params | vs budget | lr | "
        "train s/epoch | setup s | inference s/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["per_class"], METHODS.index(r["method"]) if r["method"] in METHODS else 99)):
        gap = "" if r["budget_gap"] is None else f"{r['budget_gap']:+.1%}"
        lines.append(
            f"| {r['method']} | {r['per_class']} | {r['seeds']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
            f"{r['trainable']:,} | {gap} | {r['lr']:g} | {r['train_seconds_per_epoch']:.2f} | "
            f"{r['setup_seconds']:.1f} | {r['inference_seconds_per_batch']:.3f} |"
        )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}, key=lambda m: METHODS.index(m) if m in METHODS else 99):
        points = sorted((r["per_class"], r["accuracy_mean"], r["accuracy_std"]) for r in rows if r["method"] == method)
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: Sequence[RunResult], stem: str, title: str, settings: dict) -> list[dict]:
    """stem.json (settings, every run, the summary), stem.md (the table) and stem.png (the plot)."""
    rows = summarise(results)
    with open(f"{stem}.json", "w") as f:
        json.dump({"settings": settings, "summary": rows, "runs": [asdict(r) for r in results]}, f, indent=2)
    settings_text = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    with open(f"{stem}.md", "w") as f:
        f.write(f"# {title}\n\n{settings_text}\n\n{markdown_table(rows)}\n\n![accuracy]({stem.split('/')[-1]}.png)\n")
    plot_accuracy(rows, f"{stem}.png", title)
    return rows
