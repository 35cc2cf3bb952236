"""Shared pieces of the transfer-learning recipes: few-shot splits, method builders at a matched
trainable-parameter budget, a plain PyTorch training loop, accuracy and timing, and result tables.

Every method is built on a freshly loaded pretrained model (seeded, so the randomly initialised
classifier is the same for every method of one seed) and trained with the same AdamW budget.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

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
Encoder = Callable[[Sequence[int]], dict[str, torch.Tensor]]
HEAD_NAMES = ("classifier", "score", "head", "_fc", "fc")


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


def text_encoder(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int = 64) -> Encoder:
    """encode(indices) for a text data set: tokenised inputs (padded to the longest) and labels."""

    def encode_indices(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return encode(tokenizer, [texts[i] for i in indices], [labels[i] for i in indices], max_length)

    return encode_indices


def tensor_encoder(inputs: torch.Tensor, labels: Sequence[int], input_name: str = "pixel_values") -> Encoder:
    """encode(indices) for pre-encoded tensors (images): {input_name: inputs[indices], labels}."""
    targets = torch.as_tensor(list(labels), dtype=torch.long)

    def encode_indices(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return {input_name: inputs[index], "labels": targets[index]}

    return encode_indices


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
    """Path of the classification head: the model's `head_path` attribute (set by recipe wrappers), else the
    first child named like a head (classifier, score, head, _fc, fc)."""
    path = getattr(model, "head_path", None)
    if isinstance(path, str) and path:
        return path
    names = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in names:
            return name
    raise ValueError(
        f"no classification head found among {HEAD_NAMES}; children are {list(names)}. Set `model.head_path`"
    )


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params_per_rank(model: nn.Module, target_modules: Sequence[str]) -> int:
    """Trainable LoRA parameters per unit of rank over the targeted layers: in + out features for a Linear,
    in_channels * kh * kw + out_channels for a Conv2d (peft's lora_A is a conv with the layer's kernel, lora_B
    a 1x1 conv)."""
    total = 0
    for name, module in model.named_modules():
        if not _matches(name, target_modules):
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"{name} is a grouped conv (groups={module.groups}): target dense layers for LoRA")
            kh, kw = module.kernel_size
            total += module.in_channels * kh * kw + module.out_channels
    if total == 0:
        raise ValueError(f"no nn.Linear / nn.Conv2d named {list(target_modules)} in the model: set lora_targets")
    return total


def position_costs(
    model: nn.Module, batch: dict | None = None, kernel_size: int = 3
) -> tuple[dict[str, int], dict[str, int]]:
    """Trainable parameters per topo neuron at every candidate position: width + 1 on a token/vector stream
    (D is m x d, b is m), channels * k * k + 1 on an image stream (a k x k conv). Widths come from one forward
    pass on `batch`, or from `model.config.hidden_size` without one. Returns (costs, widths) by position."""
    from hf_topoadapt.locate import find_positions

    positions = find_positions(model)
    if batch is None:
        width = int(model.config.hidden_size)
        return {p.name: width + 1 for p in positions}, {p.name: width for p in positions}
    import contextlib

    from hf_topoadapt.sensitivity.capture import transform_stream
    from hf_topoadapt.sensitivity.features import layout_of

    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda h: seen.setdefault(name, h) if True else h

    with contextlib.ExitStack() as stack, torch.no_grad():
        for p in positions:
            stack.enter_context(transform_stream(p, lambda h, name=p.name: (seen.setdefault(name, h), h)[1]))
        was_training = model.training
        model.eval()
        model(**{k: v[:2] for k, v in batch.items()})
        model.train(was_training)
    costs, widths = {}, {}
    for p in positions:
        if p.name not in seen:
            continue
        h = seen[p.name]
        channels = layout_of(h) == "channels"
        widths[p.name] = h.shape[1] if channels else h.shape[-1]
        costs[p.name] = widths[p.name] * kernel_size**2 + 1 if channels else widths[p.name] + 1
    return costs, widths


@dataclass
class Budget:
    """The matched budget: LoRA rank r sets the target, topo neurons are chosen to meet it.

    `costs` holds the trainable parameters per neuron at every candidate position (they differ by position in
    a CNN), so the neurons of one set of positions are `neurons_for(positions)`.
    """

    lora_rank: int
    num_adapters: int
    topo_neurons: int  # first guess, for positions not known yet (exact when every position has the same width)
    head_params: int
    target: int  # trainable parameters of LoRA rank r (adapters + head)
    topo_expected: int
    costs: dict[str, int] = field(default_factory=dict, repr=False)
    widths: dict[str, int] = field(default_factory=dict, repr=False)

    def relative_gap(self, count: int) -> float:
        return (count - self.target) / self.target

    def neurons_for(self, positions: Sequence[str]) -> int:
        per_neuron = sum(self.costs[p] for p in positions)
        return max(1, round((self.target - self.head_params) / per_neuron))

    def expected(self, positions: Sequence[str], neurons: int) -> int:
        return neurons * sum(self.costs[p] for p in positions) + self.head_params

    def request(self, positions: Sequence[str] | None = None) -> int:
        """Neurons to ask each eigen-initialised adapter for: the matched count when every width is the same,
        otherwise enough for the narrowest candidate to carry its share (adapters are trimmed afterwards)."""
        if self.uniform:
            return self.topo_neurons
        costs = [self.costs[p] for p in positions] if positions else list(self.costs.values())
        return min(64, math.ceil((self.target - self.head_params) / (self.num_adapters * min(costs))))

    def allocate(self, available: dict[str, int]) -> dict[str, int]:
        """Neurons to keep per position (at most `available`): as even as the caps allow, then one neuron at a time
        wherever it brings the total closest to the target."""
        goal = self.target - self.head_params
        keep = {p: 0 for p in available}
        for level in range(1, max(available.values(), default=0) + 1):
            trial = {p: min(level, cap) for p, cap in available.items()}
            if sum(trial[p] * self.costs[p] for p in trial) > goal:
                break
            keep = trial
        total = sum(keep[p] * self.costs[p] for p in keep)
        while True:
            options = [p for p in keep if keep[p] < available[p]]
            best = min(options, key=lambda p: abs(total + self.costs[p] - goal), default=None)
            if best is None or abs(total + self.costs[best] - goal) >= abs(total - goal):
                break
            keep[best] += 1
            total += self.costs[best]
        return {p: max(1, m) for p, m in keep.items()}

    @property
    def uniform(self) -> bool:
        return len(set(self.costs.values())) <= 1


def match_budget(
    model: nn.Module,
    lora_rank: int,
    num_adapters: int,
    lora_targets: Sequence[str],
    batch: dict | None = None,
    kernel_size: int = 3,
) -> Budget:
    """Neurons per topo adapter so that neurons * sum of per-neuron costs + head ~= LoRA rank r + head.

    A topo adapter with m neurons on a width-d token stream trains D (m x d) and b (m): m (d + 1) parameters;
    on a C-channel image stream with a k x k conv, m (C k k + 1). Pass a `batch` for models whose widths are
    not `config.hidden_size` (CNNs, anything that is not BERT-like).
    """
    head_params = sum(p.numel() for p in model.get_submodule(head_name(model)).parameters())
    costs, widths = position_costs(model, batch, kernel_size)
    target = lora_rank * lora_params_per_rank(model, lora_targets) + head_params
    typical = statistics.median(costs.values())
    neurons = max(1, round((target - head_params) / (num_adapters * typical)))
    expected = round(num_adapters * neurons * typical) + head_params
    return Budget(lora_rank, num_adapters, neurons, head_params, target, expected, costs, widths)


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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    start = time.perf_counter()
    head = head_name(model)
    built = _build(method, model, train_batches, budget, total_steps, seed, list(lora_targets), head, topo_positions)
    built.setup_seconds = time.perf_counter() - start
    built.trainable = count_trainable(built.model)
    return built


def _build(method, model, train_batches, budget, total_steps, seed, lora_targets, head, topo_positions) -> Built:
    import peft

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Built(model, 0, "every weight")
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head + "."))
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
        if target_r >= budget.lora_rank:  # rank 1: nothing to reallocate (peft's allocator fails on k = 0)
            return Built(wrapped, 0, f"init_r = target_r = {target_r}: SVD-form LoRA with AdaLoRA's orthogonality term")
        return Built(
            wrapped,
            0,
            f"init_r={budget.lora_rank} -> target_r={target_r}, {total_steps} steps",
            on_step=lambda step: wrapped.base_model.update_and_allocate(step),
        )

    # The topo family: build with enough neurons, then trim each adapter (its neurons are strongest first) so the
    # trainable count meets the budget. With equal widths everywhere (a transformer) the request is the matched
    # count itself; in a CNN the widths, and so the cost of a neuron, differ by position.
    if method in ("topo", "topo_optimized"):
        directions = "optimized" if method == "topo_optimized" else "coordinate"
        options = dict(num_adapters=budget.num_adapters, directions=directions)
        built = _topo(model, train_batches, head, seed, budget.request(), options)
        return fit_budget(built, budget)
    candidates = [c for c in topo_candidates(model) if c in budget.costs]
    if method == "bottleneck_at_topo":
        if not topo_positions:
            raise ValueError("bottleneck_at_topo needs the positions chosen by topo (run topo first)")
        positions, init = list(topo_positions), "random"
    elif method == "topo_random_positions":
        positions, init = random.Random(1000 + seed).sample(candidates, budget.num_adapters), "eigen"
    else:  # topo_last_blocks
        positions, init = candidates[-budget.num_adapters :], "eigen"
    options = dict(num_adapters=len(positions), target_modules=positions, init=init)
    if init == "eigen":
        request = budget.request(positions)
    else:  # random rows: exactly the allocation (at most one neuron per channel: U's columns are distinct axes)
        request = max(budget.allocate({p: budget.widths.get(p, 10**6) for p in positions}).values())
    return fit_budget(_topo(model, train_batches, head, seed, request, options), budget)


def fit_budget(built: Built, budget: Budget) -> Built:
    """Trims the adapters of a TopoModel to `budget.allocate` of the neurons they got (keeping the strongest, which
    come first), so the trainable count meets the budget; updates adapter_shapes so save/load stays consistent."""
    wrapped = built.model
    config = wrapped.peft_config[wrapped.active_adapter]
    shapes = config.adapter_shapes
    got = {p: shape["neurons"] for p, shape in shapes.items()}
    keep = budget.allocate(got)
    if keep == got:
        return built
    from hf_topoadapt.tuner import TopoLayer

    name = wrapped.active_adapter
    base = wrapped.base_model.model
    with torch.no_grad():
        for position, shape in shapes.items():
            m = keep[position]
            if m == shape["neurons"]:
                continue
            module = base.get_submodule(shape["module"])
            layer = next(c for c in module.children() if isinstance(c, TopoLayer))
            down = layer.topo_down[name]
            down.weight = nn.Parameter(down.weight[:m].clone())
            down.bias = nn.Parameter(down.bias[:m].clone())
            if isinstance(down, nn.Conv2d):
                down.out_channels = m
            else:
                down.out_features = m
            up = layer.topo_up[name]
            layer.topo_up[name] = nn.Parameter(up[:, :m].clone(), requires_grad=up.requires_grad)
            shape["neurons"] = m
    built.note = built.note.replace(f"neurons {list(got.values())}", f"neurons {list(keep.values())}")
    built.note += f" (trimmed from {list(got.values())} to meet the budget)"
    return built


def _topo(model, train_batches, head, seed, neurons, options) -> Built:
    import hf_topoadapt as hta

    config = hta.TopoAdapterConfig(neurons=neurons, modules_to_save=[head], seed=seed, **options)
    wrapped = hta.get_topo_model(model, config, calibration_data=train_batches)
    chosen = list(wrapped.topo_report.chosen) if wrapped.topo_report else []
    if config.init == "random" or not chosen:
        chosen = list(config.target_modules)
    shapes = config.adapter_shapes or {}
    note = f"{config.init} init, neurons {[shape['neurons'] for shape in shapes.values()]}"
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
    budget_target: int | None = None


MATCHED = ("lora", "adalora", *TOPO_FAMILY)


def run_experiment(
    model_factory: Callable[[], nn.Module],
    encode_fn: Encoder,
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
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    results_path: str | None = None,
    resume: bool = False,
    after_run: Callable[[RunResult, Built], None] | None = None,
) -> list[RunResult]:
    """Every (per_class, seed, method): fresh model, build, train, evaluate.

    Args:
        model_factory: returns a freshly loaded pretrained classifier whose forward takes a batch dict and returns
            `.loss` and `.logits`; it is called under torch.manual_seed(seed) so the new head's initialisation is
            the same for every method of a seed.
        encode_fn: `encode_fn(indices)` -> a dict of tensors (model inputs and `labels`) for those examples;
            see `text_encoder` and `tensor_encoder`.
        labels: the class of every example (for the stratified few-shot split).
        results_path: each result is appended to this JSON-lines file as soon as it exists, so an interrupted run
            keeps what it finished. With `resume`, runs already in the file (same method, size, seed, epochs and
            lr) are read back instead of rerun.
        after_run: called with every new result and its built model (e.g. to save the adapter).
    """
    lrs = {**DEFAULT_LRS, **(lrs or {})}
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    if "bottleneck_at_topo" in methods and "topo" not in methods:
        methods.insert(0, "topo")
    # topo first: bottleneck_at_topo reuses its positions
    methods.sort(key=lambda m: 0 if m == "topo" else 1)
    done = load_runs(results_path) if resume and results_path else {}
    results: list[RunResult] = []
    plan = [(seed, k) for seed in seeds for k in per_class]
    bar = tqdm(total=len(plan) * len(methods), desc="runs", unit="run")
    for seed, k in plan:
        train_idx, test_idx = few_shot_split(labels, k, seed, test_per_class)
        prepared: tuple | None = None
        topo_positions: list[str] | None = None
        for method in methods:
            lr = lr_for(method, lrs)
            key = (method, k, seed, epochs, lr)
            if key in done:
                result = done[key]
                results.append(result)
                if method == "topo":
                    topo_positions = result.positions
                log(f"{method:22s} k={k:<3d} seed={seed} acc={result.accuracy:.4f} (already in {results_path})")
                bar.update()
                continue
            if prepared is None:
                train_batches = _to(batches_of(encode_fn(train_idx), batch_size, shuffle_seed=seed), device)
                test_batches = _to(batches_of(encode_fn(test_idx), eval_batch_size), device)
                prepared = (train_batches, test_batches)
            train_batches, test_batches = prepared
            total_steps = epochs * len(train_batches)
            torch.manual_seed(seed)
            model = model_factory().to(device)
            budget = match_budget(model, lora_rank, num_adapters, lora_targets, batch=train_batches[0])
            built = build_method(method, model, train_batches, budget, total_steps, seed, lora_targets, topo_positions)
            if method == "topo":
                topo_positions = built.positions
            gap = budget.relative_gap(built.trainable) if method in MATCHED else None
            per_epoch = train(
                built.model, train_batches, epochs, lr, seed, built.on_step, desc=f"{method} k={k} s={seed}"
            )
            accuracy, infer = evaluate(built.model, test_batches)
            result = RunResult(
                method, k, seed, accuracy, built.trainable, gap, lr, epochs, per_epoch, built.setup_seconds,
                infer, built.note, built.positions, budget.target,
            )  # fmt: skip
            results.append(result)
            if results_path:
                with open(results_path, "a") as f:
                    f.write(json.dumps(asdict(result)) + "\n")
            if after_run is not None:
                after_run(result, built)
            gap_text = f" budget gap {gap:+.1%} (target {budget.target:,})" if gap is not None else ""
            log(
                f"{method:22s} k={k:<3d} seed={seed} acc={accuracy:.4f} trainable={built.trainable:,}{gap_text} "
                f"train/epoch={per_epoch:.2f}s setup={built.setup_seconds:.1f}s {built.note}"
            )
            bar.update()
            del built, model
    bar.close()
    return results


def load_runs(path: str) -> dict[tuple, RunResult]:
    """The runs already in a JSON-lines results file, keyed by (method, per_class, seed, epochs, lr)."""
    import os

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
            done[(result.method, result.per_class, result.seed, result.epochs, result.lr)] = result
    return done


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


# ------------------------------------------------------------------------------------------------ saving
class TopoSaver:
    """`after_run` hook that saves the topo-adapted model of every `topo` run (the last one wins) in Hub format:
    adapter_config.json, adapter_model.safetensors, topo_report.json and a model card (README.md), plus
    `extra.save_pretrained` (a tokenizer or image processor) when given."""

    def __init__(self, save_dir: str, base_model: str | None = None, extra=None, data: str = "", method: str = "topo"):
        self.save_dir, self.base_model, self.extra, self.data, self.method = save_dir, base_model, extra, data, method
        self.saved: RunResult | None = None

    def __call__(self, result: RunResult, built: Built) -> None:
        if result.method != self.method:
            return
        import os

        os.makedirs(self.save_dir, exist_ok=True)
        model = built.model
        config = model.peft_config[model.active_adapter]
        if self.base_model:
            config.base_model_name_or_path = self.base_model
        training = (
            f"Trained by `recipes` on {self.data or 'the recipe data'}: {result.per_class} examples per class, "
            f"seed {result.seed}, {result.epochs} epochs, AdamW lr {result.lr:g}. Test accuracy "
            f"{result.accuracy:.4f}; {result.trainable:,} trainable parameters (adapters + new head)."
        )
        model.save_pretrained(self.save_dir, training=training)
        if self.extra is not None and hasattr(self.extra, "save_pretrained"):
            self.extra.save_pretrained(self.save_dir)
        self.saved = result

    def print_push_help(self, repo_hint: str = "your-name/topo-adapter", load_hint: str | None = None) -> None:
        if self.saved is None:
            print(f"no {self.method} run finished, nothing saved to {self.save_dir}")
            return
        r = self.saved
        base = self.base_model or "<base model>"
        print(
            f"\nSaved the {self.method}-adapted model ({r.per_class} per class, seed {r.seed}, accuracy "
            f"{r.accuracy:.4f}) to {self.save_dir}/ (adapter_config.json, adapter_model.safetensors, README.md, "
            "topo_report.json).\nPush it to the Hugging Face Hub (log in first: `hf auth login`):\n"
            f"  hf upload {repo_hint} {self.save_dir} .\n"
            "or from Python (builds the card with the Hub id):\n"
            f"  import hf_topoadapt as hta{', transformers' if load_hint else ''}\n"
            f"  base = {load_hint or f'...  # the base model ({base}) with the same new head size'}\n"
            f"  hta.TopoModel.from_pretrained(base, {self.save_dir!r}).push_to_hub({repo_hint!r})"
        )
