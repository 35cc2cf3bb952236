"""The matched trainable-parameter budget: LoRA at rank r on its targets (plus the new head) sets the target, and
the topo adapters get the neurons that meet it. Per-neuron costs differ by position in a CNN (a 3x3 conv neuron on
C channels trains C*9 + 1 parameters), so the budget knows every candidate position's cost."""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

HEAD_NAMES = ("classifier", "score", "head", "_fc", "fc")


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


def neuron_cost(width: int, channels: bool, kernel_size: int = 3, size: tuple[int, int] | None = None) -> int:
    """Trainable parameters of one topo neuron: width + 1 on a token/vector stream (a row of D and its bias),
    channels * k * k + 1 on an image stream (a k x k conv; smaller on a feature map of `size` smaller than the kernel,
    as the library builds it: effective_kernel)."""
    from hf_topoadapt.sensitivity.features import effective_kernel

    if not channels:
        return width + 1
    kernel = kernel_size if size is None else effective_kernel(kernel_size, *size)
    return width * kernel**2 + 1


def position_costs(
    model: nn.Module, batch: dict | None = None, kernel_size: int = 3, names: Sequence[str] | None = None
) -> tuple[dict[str, int], dict[str, int], frozenset[str], dict[str, tuple[int, int]]]:
    """Trainable parameters per topo neuron at every candidate position, or at the `names`d ones (`neuron_cost`).
    Widths come from one forward pass on `batch`, or from `model.config.hidden_size` without one. Returns (costs,
    widths, the image-stream positions, their feature maps' sizes)."""
    from hf_topoadapt.locate import find_positions
    from hf_topoadapt.sensitivity.capture import transform_stream
    from hf_topoadapt.sensitivity.features import layout_of

    positions = find_positions(model, positions=list(names) if names is not None else None)
    if batch is None:
        width = int(model.config.hidden_size)
        return {p.name: width + 1 for p in positions}, {p.name: width for p in positions}, frozenset(), {}
    seen: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for p in positions:
            stack.enter_context(transform_stream(p, lambda h, name=p.name: (seen.setdefault(name, h), h)[1]))
        was_training = model.training
        model.eval()
        model(**{k: v[:2] for k, v in batch.items()})
        model.train(was_training)
    costs, widths, images, maps = {}, {}, set(), {}
    for p in positions:
        if p.name not in seen:
            continue
        h = seen[p.name]
        channels = layout_of(h) == "channels"
        widths[p.name] = h.shape[1] if channels else h.shape[-1]
        if channels:
            images.add(p.name)
            maps[p.name] = (int(h.shape[-2]), int(h.shape[-1]))
        costs[p.name] = neuron_cost(widths[p.name], channels, kernel_size, maps.get(p.name))
    return costs, widths, frozenset(images), maps


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
    channels: frozenset[str] = frozenset()  # positions on an image stream, whose neurons are k x k convs
    kernel_size: int = 3  # the conv's k in `costs`
    maps: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # feature-map size per image position
    shrink: bool = True  # `costs` of convs shrunk to the maps, as TopoAdapterConfig(shrink_kernel=True) builds them

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

    def with_positions(self, model: nn.Module, batch: dict, names: Sequence[str]) -> Budget:
        """The same budget with the costs of further candidate positions (module names, e.g. attention outputs)."""
        extra = [name for name in names if name not in self.costs]
        if not extra:
            return self
        costs, widths, channels, maps = position_costs(model, batch, self.kernel_size, extra)
        return replace(
            self, costs={**self.costs, **costs}, widths={**self.widths, **widths}, channels=self.channels | channels,
            maps={**self.maps, **maps},
        )  # fmt: skip

    def adjusted(
        self,
        num_adapters: int | None = None,
        train_up: bool = False,
        kernel_size: int | None = None,
        shrink: bool | None = None,
    ) -> Budget:
        """The same target spread over `num_adapters` positions, with every neuron also training its output
        direction U (`train_up`: width more parameters per neuron), with k x k convs on image streams
        (`kernel_size`), shrunk to smaller feature maps or not (`shrink`); self when nothing changes."""
        kernel = self.kernel_size if kernel_size is None else kernel_size
        shrink = self.shrink if shrink is None else shrink
        if num_adapters is None and not train_up and kernel == self.kernel_size and shrink == self.shrink:
            return self
        count = self.num_adapters if num_adapters is None else num_adapters
        sizes = self.maps if shrink else {}
        costs = {p: neuron_cost(self.widths[p], p in self.channels, kernel, sizes.get(p)) for p in self.costs}
        if train_up:
            costs = {p: c + self.widths[p] for p, c in costs.items()}
        return replace(
            sized_budget(
                self.lora_rank, count, self.head_params, self.target, costs, self.widths, self.channels, kernel,
                self.maps,
            ),
            shrink=shrink,
        )  # fmt: skip

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
    costs, widths, channels, maps = position_costs(model, batch, kernel_size)
    target = lora_rank * lora_params_per_rank(model, lora_targets) + head_params
    return sized_budget(lora_rank, num_adapters, head_params, target, costs, widths, channels, kernel_size, maps)


def sized_budget(
    lora_rank, num_adapters, head_params, target, costs, widths, channels=frozenset(), kernel_size=3, maps=None
) -> Budget:
    """The Budget whose first guess of neurons per adapter meets `target` at the median per-neuron cost."""
    typical = statistics.median(costs.values())
    neurons = max(1, round((target - head_params) / (num_adapters * typical)))
    expected = round(num_adapters * neurons * typical) + head_params
    return Budget(
        lora_rank, num_adapters, neurons, head_params, target, expected, costs, widths, channels, kernel_size,
        dict(maps or {}),
    )  # fmt: skip
