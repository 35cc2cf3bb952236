"""The fine-tuning methods the recipes compare, each built on a freshly loaded pretrained classifier: head-only,
full fine-tuning, LoRA and AdaLoRA through peft, and topo adapters through hf_topoadapt with its ablations, the
matched methods at the same trainable budget."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import TrainerCallback

from .budget import Budget, count_trainable, head_name
from .training import AdaLoraAllocation

# The levers of issue 9, each an option of the library: a head warm-up before scoring, cross-fitted scores, the
# classifier's input as a candidate position, neurons allocated by value per parameter within the budget, and output
# directions optimised on the calibration loss (METHOD.md's extension) instead of the eigenvectors.
WARMUP_STEPS = 100  # on the captured head inputs: about as cheap as one forward pass over the calibration data
LEVERS: dict[str, dict] = {
    "warmup": {"head_warmup_steps": WARMUP_STEPS},
    "crossfit": {"crossfit": True},
    "head_input": {"include_head": True},
    "budget": {"neuron_budget": True},  # the recipe's matched budget minus the head
    "optimized": {"directions": "optimized"},  # output directions U fitted to the calibration loss, not eigenvectors
    "x_tanh": {"activation": "x_tanh"},  # an even, rectifier-like admissible activation instead of silu_tanh
    "per_token": {"rank_by": "per_token"},  # positions ranked by their value per token (CNN feature maps differ)
    "up": {"train_up": True},  # U trains too (a bottleneck adapter's both sides): fewer neurons at the same budget
    # the embedding (stem) output never competes: one adapter there was the worst or near-worst position on every
    # recipe (transfer_diagnostics.md) while the TD ranks it first on EfficientNet and often on the ViT
    "no_embeddings": {"include_embeddings": False},
    # the head trains at the recipe's head-only rate, the topo layers at the method's (one shared rate is a compromise
    # between the two: on EfficientNet the head-only rate is 33x the topo rate)
    "head_lr": {"own_head_lr": True},
    # the optimised directions' ascent on products with the captured token pairs (warm-started Lanczos) instead of
    # forming and solving a (q x q) matrix per step: the largest part of the setup (benchmarks/results/setup_cost.md)
    "matrix_free": {"optimize_solver": "matrix_free"},
    # the same only at positions wider than 512 features, where the dense ascent runs Lanczos on a formed matrix
    "wide_matrix_free": {"optimize_solver": "auto"},
    # every block's attention output competes too (TopoAdapterConfig.positions names them): on the transformers the
    # default chooses 3 of 4 (ViT) or 6 (MiniLM) block outputs, so which positions it takes can matter little
    "attention": {"attention_positions": True},
    # the layers at positions drawn at random among the candidates (topo_random_positions' rule): with `attention` on
    # the transformers, whether the ranking matters where it has room to
    "random_positions": {"positions": "random"},
    # every layer from one scoring round (TopoAdapterConfig.score_once) instead of a round per insertion: with a tenth
    # of the step an insertion barely changes the model the next round scores, and the rounds are most of the setup
    "score_once": {"score_once": True},
    # positions and neurons by value per trainable parameter within the budget, up to 64 neurons a layer: `budget` with
    # `max_neurons=64` under one name (transfer_training.md, round 17), instead of the budget spread evenly over the
    # top-ranked positions (the recipes' trimming), which on EfficientNet bought 2-4 neurons at wide late blocks. It
    # passed the round's rule at the recipes' rank, but on EfficientNet it fills its three cheapest positions up to
    # their width and leaves 28%, 55% and 75% of the budget unspent at r=2, 4 and 8
    # (transfer_frontier_effnet_mnist_value_budget_runs.jsonl): not the default.
    "value_budget": {"neuron_budget": True, "max_neurons": 64},
    # with a budget: positions past the recipe's count once its positions are full and budget is left
    # (TopoAdapterConfig.fill_budget), so value_budget spends on EfficientNet what its cheap blocks cannot hold. It
    # does (93-100% at every rank), but value_budget+fill's gain there is r=1's alone (round 18): not the default.
    "fill": {"fill_budget": True},
    # The default's three layers cannot hold the budget when the ranking picks narrow positions (EfficientNet's 16-24
    # channel early blocks hold one neuron per channel): 3 of 10 seeds spent 19-74% less at r=4 and 8. `spend` adds
    # the next-ranked position (the same scoring round) until the budget is spent or no candidate is left.
    "spend": {"spend_budget": True},
    # Convs no larger than the feature maps they read (TopoAdapterConfig.shrink_kernel): at EfficientNet's 32-pixel
    # input its blocks 11-15 output 1 x 1 maps, where a 3 x 3 conv is a 1 x 1 conv and eight taps that read only
    # padding, charged to the budget: nine times the parameters per neuron for the same function.
    "shrink": {"shrink_kernel": True},
}
SPEND_TOLERANCE = 0.05  # a gap below -5% counts as unspent (trimming to whole neurons leaves a few percent)
# Levers with a value, written `name=value` in a method name (`topo+optimized+step=0.5`): the fraction of the
# line-searched step the inserted layers take, and the adapters' learning rate as a multiple of the method's (the head
# keeps the method's rate; hf_topoadapt.optimizers.create_topo_optimizer).
# `adapters=N` spreads the budget over N positions instead of the recipe's count (LoRA spreads it over every layer).
# `optimize_tol=T`: where an optimised neuron's ascent stops (TopoAdapterConfig.optimize_tol).
# `kernel=K`: the inserted conv's kernel on image streams (TopoAdapterConfig.kernel_size, 3 by default): a 3 x 3
# neuron on C channels costs 9 C + 1 parameters, so at EfficientNet's r=1 budget a position gets 3-6 of them.
# `direction=A`: the inserted rows of D trained as magnitude times a direction whose entries are of size A, which Adam
# turns by about lr / A per step (recipes/anchored.py): an ablation of what the eigen direction of D is worth.
# `max_neurons=N`: at most N neurons a layer (TopoAdapterConfig.max_neurons, 16 by default), with `budget` the cap that
# left 13-18% of EfficientNet's budget unspent on its cheap first blocks (round 13).
# `decrease=F`: no line search; the step whose second-order predicted decrease is F of the calibration loss
# (TopoAdapterConfig.step_decrease), which depends on the gain alone, not on a bumpy loss curve's lowest grid point.
# `head_rate=R`: the head at R times the method's rate, the topo layers at the method's (`head_lr` puts the head at
# the recipe's head-only rate, up to 33x the topo rate, too fast beside layers that change its inputs).
# `grow_every=N`: a grown method inserts a layer every N epochs instead of GROW_EVERY (one-shot methods have no
# schedule and refuse it).
# `start=K`: a grown method starts from K layers placed before training as one-shot `topo` places them (its levers,
# K/N of the budget), instead of from the head alone, and grows the rest (the "or k0 adapters").
# `dropout=P`: dropout of probability P on each inserted layer's input to D while training (TopoAdapterConfig.
# topo_dropout, peft's lora_dropout): topo's training loss falls furthest of the methods and its test loss on MiniLM is
# the highest (transfer_diagnostics.md, transfer_frontier.md).
VALUE_LEVERS: dict[str, str] = {
    "step": "step_scale", "decrease": "step_decrease", "adapter_lr": "adapter_lr_ratio", "adapters": "num_adapters",
    "optimize_tol": "optimize_tol", "max_neurons": "max_neurons",
    "kernel": "kernel_size", "direction": "direction_scale", "head_rate": "head_lr_ratio", "grow_every": "grow_every",
    "start": "start_adapters", "dropout": "topo_dropout", "heads": "head_draws",
}  # fmt: skip
WHOLE_LEVERS = ("num_adapters", "kernel_size", "max_neurons", "grow_every", "start_adapters", "head_draws")
GROWN_ONLY = {"grow_every": "topo_grown+grow_every=1", "start_adapters": "topo_grown+start=1"}
# The default combination, chosen on validation: optimized by the greedy selection (benchmarks/results/
# transfer_levers.md), no_embeddings and then a tenth of the line-searched step added to it by the one-lever-at-a-time
# measurement (transfer_training.md, rounds 1 and 4), the ascent matrix-free on wide positions, which saves time at no
# cost in accuracy (round 6), and every layer from one scoring round, which saves time and gained (round 15).
# `value_budget` passed round 17's rule but is not in it: on EfficientNet it cannot spend budgets above r=1; with
# `fill` it can, and then loses or ties on validation at r=2, 4 and 8 there (round 18).
# `spend` keeps the matched budget matched where the ranking picks narrow positions; it changes nothing where the
# three layers hold the budget (every transformer position here), and on EfficientNet's seeds that left 19-74% unspent
# it did not lose on validation (+0.4 ± 0.5 points over 20 pairs at r=4 and 8, transfer_frontier_effnet_mnist_
# candidates_runs.jsonl).
# `shrink` builds 1 x 1 convs where the feature maps are 1 x 1 (EfficientNet's blocks 11-15 at 32 pixels), which a
# 3 x 3 conv computes with eight dead taps charged to the budget. It changes only the runs whose layers sit there (9
# of EfficientNet's 40 frontier cells; the others came out identical, checked on one) and gained on validation there
# (transfer_frontier.md; transfer_frontier_effnet_mnist_candidates_runs.jsonl).
DEFAULT_LEVERS: tuple[str, ...] = (
    "no_embeddings", "optimized", "step=0.1", "wide_matrix_free", "score_once", "spend", "shrink",
)  # fmt: skip
# Growth keeps the paper's full step: a grown layer's step is taken on the trained model, and a tenth lost there on
# validation (transfer_training.md, round 5); build_topo_grown hands it to GrowthConfig.step_scale. It also keeps the
# dense ascent its runs were made with (round 6 measured the matrix-free one on one-shot adapters).
# It keeps 3 x 3 convs on 1 x 1 maps too: with `shrink` its 21 frontier runs with a layer there moved +0.1 ± 1.4 points
# on validation (transfer_frontier_effnet_mnist_candidates_runs.jsonl, topo_grown+shrink).
GROWN_LEVERS: tuple[str, ...] = ("no_embeddings", "optimized")
# The ablation that switches a default lever off, where its name is not topo_no_<lever>.
LEVER_OFF = {
    "no_embeddings": "topo_with_embeddings", "step=0.1": "topo_full_step", "wide_matrix_free": "topo_formed_matrix",
    "score_once": "topo_greedy",
}  # fmt: skip


def lever_off(lever: str) -> str:
    """The ablation with one default lever switched off."""
    return LEVER_OFF.get(lever, f"topo_no_{lever}")


def topo_options(levers) -> dict:
    """TopoAdapterConfig options of a lever set; a lever not in it is off (explicitly: the library's own defaults
    are the chosen levers)."""
    options = {
        "include_head": False, "include_embeddings": True, "directions": "coordinate", "step_scale": 1.0,
        "optimize_solver": "dense", "score_once": False, "shrink_kernel": False,
    }  # fmt: skip
    for lever in levers:
        name, _, value = lever.partition("=")
        if value and name in VALUE_LEVERS:
            key = VALUE_LEVERS[name]
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"lever {lever!r} needs a number after '='") from None
            if key in WHOLE_LEVERS:
                if number != int(number) or number < 1:
                    raise ValueError(f"lever {lever!r} needs a whole number >= 1 after '='")
                number = int(number)
            options[key] = number
        elif lever in LEVERS:
            options.update(LEVERS[lever])
        else:
            known = [*LEVERS, *(f"{n}=<number>" for n in VALUE_LEVERS)]
            raise ValueError(f"unknown lever {lever!r}; known: {known}")
    return options


# Topo variants: options of one builder. positions: "ranked" (the topological derivative), "topo" (the positions the
# `topo` run of the same seed chose), "random", "last" (the last blocks), "fixed" (given); init: "eigen" or "random".
TOPO_VARIANTS: dict[str, dict] = {
    "topo": topo_options(DEFAULT_LEVERS),
    "topo_paper": topo_options(()),  # none of the levers: the paper's layer at the top-k eigenvalues
    **{  # with one default lever, switching it off is topo_paper
        lever_off(lever): topo_options(set(DEFAULT_LEVERS) - {lever})
        for lever in DEFAULT_LEVERS
        if len(DEFAULT_LEVERS) > 1
    },
    "topo_head_input_only": {**topo_options(DEFAULT_LEVERS), "positions": "fixed", "fixed": ["head_input"]},
    "bottleneck_at_topo": {**topo_options(DEFAULT_LEVERS), "positions": "topo", "init": "random"},
    "topo_random_positions": {**topo_options(DEFAULT_LEVERS), "positions": "random"},
    "topo_last_blocks": {**topo_options(DEFAULT_LEVERS), "positions": "last"},
}
# Progressive growth during fine-tuning (issue 9, the paper's algorithm on a frozen pretrained model): the head trains
# alone, then one adapter is inserted every GROW_EVERY epochs at the position ranked first by the current (trained)
# model, until the matched budget or num_adapters is reached.
GROW_EVERY = 2
GROWN = {"topo_grown": topo_options(GROWN_LEVERS)}
TOPO_FAMILY = (*TOPO_VARIANTS, *GROWN)
METHODS = ("head", "head_warmup", "full", "lora", "adalora", *TOPO_FAMILY)
MATCHED = ("lora", "adalora", *TOPO_FAMILY)
# Learning rate per method family (recipes override them with the values chosen on their validation splits).
DEFAULT_LRS = {"head": 2e-2, "full": 2e-4, "peft": 1e-2}


TOPO_POSITION_OPTIONS = ("include_head", "include_embeddings", "exclude_positions", "positions")


def _levers_after(method: str, prefix: str) -> list[str] | None:
    """The levers named after `prefix` in `method` (`topo+warmup+crossfit` -> warmup, crossfit), None without it."""
    if not method.startswith(prefix):
        return None
    return [lever for lever in method.removeprefix(prefix).split("+") if lever]


def lever_method(method: str) -> dict | None:
    """Options of a method named by its levers, `topo+warmup+crossfit` (`topo+` for none), else None."""
    levers = _levers_after(method, "topo+")
    return None if levers is None else topo_options(levers)


def topo_variant(method: str) -> dict | None:
    return TOPO_VARIANTS.get(method, lever_method(method))


def grown_variant(method: str) -> dict | None:
    """Options of a grown method: `topo_grown`, or `topo_grown+<levers>` (levers added to growth's own), else None."""
    if method in GROWN:
        return GROWN[method]
    levers = _levers_after(method, "topo_grown+")
    return None if levers is None else topo_options([*GROWN_LEVERS, *levers])


def _named_by_levers(method: str) -> bool:
    return lever_method(method) is not None or grown_variant(method) is not None


def is_method(method: str) -> bool:
    return method in METHODS or _named_by_levers(method)


def is_matched(method: str) -> bool:
    """Methods built to the matched trainable budget (the gap to it is recorded)."""
    return method in MATCHED or _named_by_levers(method)


def lr_for(method: str, lrs: dict[str, float], rank: int | None = None) -> float:
    """A method's learning rate: `<method>@r<rank>` (chosen on validation at LoRA rank `rank`'s budget, for that
    method alone) before its own; a one-shot topo variant (an ablation, a default's candidate `topo+...`) takes
    `topo@r<rank>`; every topo variant trains at the topo method's rate; then the family's. Grown methods keep their
    own rate at every rank (their runs were made so)."""
    family = {"head": "head", "head_warmup": "head", "full": "full"}.get(method, "peft")
    if rank is not None and f"{method}@r{rank}" in lrs:
        return lrs[f"{method}@r{rank}"]
    if rank is not None and f"topo@r{rank}" in lrs and topo_variant(method) is not None:
        return lrs[f"topo@r{rank}"]
    if topo_variant(method) is not None and method not in lrs and "topo" in lrs:  # bottleneck_at_topo too
        return lrs["topo"]
    if method.startswith("topo") and method not in lrs:
        return lrs.get("topo", lrs.get(family, DEFAULT_LRS[family]))
    return lrs.get(method, lrs.get(family, DEFAULT_LRS[family]))


@dataclass
class Built:
    model: nn.Module
    trainable: int = 0
    note: str = ""
    positions: list[str] = field(default_factory=list)
    callbacks: list[TrainerCallback] = field(default_factory=list)
    setup_seconds: float = 0.0
    setup_phases: dict[str, float] = field(default_factory=dict)  # TopoReport.seconds of a one-shot topo model
    adapter_lr_ratio: float = 1.0  # the topo layers train at this multiple of the method's learning rate (grown
    # layers join the optimizer's adapter group)
    head_lr: float | None = None  # the head's own rate (the topo layers keep the method's times adapter_lr_ratio)
    head_lr_ratio: float = 1.0  # else the head at this multiple of the method's rate
    # Called after training: adds what happened during it (growth's scoring and insertions) to note, positions and
    # setup_seconds.
    after_fit: Callable[[Built], None] | None = None


def build_method(
    method: str,
    model: nn.Module,
    calibration: list[dict],
    budget: Budget,
    total_steps: int,
    seed: int,
    lora_targets: Sequence[str] = ("query", "value"),
    topo_positions: list[str] | None = None,
    head_lr: float = DEFAULT_LRS["head"],
) -> Built:
    """Wraps a fresh pretrained classifier for one method. `calibration` (batches of the training split) scores and
    initialises the topo adapters; `topo_positions` (what `topo` chose for this seed) is needed by
    `bottleneck_at_topo`; `head_lr` is the head warm-up's learning rate (the recipe's head-only rate)."""
    if not is_method(method):
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)} or topo+<levers> ({list(LEVERS)})")
    start = time.perf_counter()
    head = head_name(model)
    grown = grown_variant(method)
    variant = grown if grown is not None else topo_variant(method)
    options = dict(variant or {})
    adapter_lr_ratio = options.pop("adapter_lr_ratio", 1.0)  # optimizer settings (fit's), not the adapters'
    own_head_lr = options.pop("own_head_lr", False)
    head_lr_ratio = options.pop("head_lr_ratio", 1.0)
    direction_scale = options.pop("direction_scale", None)
    grow_every = options.pop("grow_every", GROW_EVERY)
    start_adapters = options.pop("start_adapters", 0)
    if grown is not None and "head_draws" in options:
        raise ValueError(
            f"{method!r}: heads=K ranks the positions of one-shot topo before training; a grown method "
            "scores with its trained head. Name a one-shot method, e.g. 'topo+heads=4'"
        )
    for key, example in GROWN_ONLY.items():
        if grown is None and key in (variant or {}):
            raise ValueError(
                f"{method!r}: {key} sets how a grown method inserts its layers; a one-shot method inserts them all "
                f"before training. Name a grown method, e.g. {example!r}"
            )
    if options.pop("attention_positions", False):
        names = [*topo_candidates(model, options, budget), *attention_outputs(model)]
        budget = budget.with_positions(model, calibration[0], names)
        options["candidates"] = names
    if variant is not None:  # a lever that changes what a neuron costs, or over how many positions the budget spreads
        spread = options.pop("num_adapters", None)
        if spread is not None:  # more positions than the model has: every candidate, each with its share
            spread = min(spread, len(topo_candidates(model, options, budget)))
        budget = budget.adjusted(
            spread, options.get("train_up", False), options.get("kernel_size"), options.get("shrink_kernel")
        )
    if grown is not None:
        built = build_topo_grown(model, calibration, budget, seed, head, options, grow_every, start_adapters)
    elif variant is not None:
        options = {**options, "head_warmup_lr": head_lr} if "head_warmup_steps" in options else options
        built = build_topo(model, calibration, budget, seed, head, topo_positions, **options)
    else:
        built = _build_baseline(method, model, calibration, budget, total_steps, list(lora_targets), head, head_lr)
    if direction_scale is not None:
        anchor(built, direction_scale)
    built.adapter_lr_ratio = adapter_lr_ratio
    built.head_lr = head_lr if own_head_lr else None
    built.head_lr_ratio = head_lr_ratio
    built.setup_seconds = time.perf_counter() - start
    built.trainable = count_trainable(built.model)
    return built


def anchor(built: Built, scale: float) -> None:
    """The `direction=A` lever on a built topo model; the plain weights come back after training."""
    from .anchored import anchor_directions, release

    downs = anchor_directions(built.model, scale)
    before = built.after_fit

    def after_fit(built: Built) -> None:
        release(downs)
        if before is not None:
            before(built)

    built.after_fit = after_fit
    built.note += f", directions anchored at entry scale {scale:g}"


def _build_baseline(method, model, calibration, budget, total_steps, lora_targets, head, head_lr) -> Built:
    import peft

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Built(model, note="every weight")
    if method in ("head", "head_warmup"):
        note = f"{head} only"
        if method == "head_warmup":  # the topo warm-up's head training, then the same training as head-only
            from hf_topoadapt.warmup import warm_up_head

            record = warm_up_head(model, calibration, [head], WARMUP_STEPS, head_lr)
            note += f", warmed up {record.steps} steps (loss {record.loss_before:.3f} -> {record.loss_after:.3f})"
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head + "."))
        return Built(model, note=note)
    if method == "lora":
        config = peft.LoraConfig(
            r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, lora_dropout=0.0, target_modules=lora_targets,
            modules_to_save=[head],
        )  # fmt: skip
        return Built(peft.get_peft_model(model, config), note=f"r={budget.lora_rank} on {'/'.join(lora_targets)}")
    # adalora
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
        return Built(wrapped, note=f"init_r = target_r = {target_r}: SVD-form LoRA with AdaLoRA's orthogonality term")
    note = f"init_r={budget.lora_rank} -> target_r={target_r}, {total_steps} steps"
    return Built(wrapped, note=note, callbacks=[AdaLoraAllocation()])


def build_topo_grown(
    model: nn.Module, calibration: list[dict], budget: Budget, seed: int, head: str, options,
    grow_every: int = GROW_EVERY,
    start_adapters: int = 0,
) -> Built:  # fmt: skip
    """A TopoModel of the head alone (or of `start_adapters` one-shot layers, as `topo` builds them, with their share
    of the budget) and the callback that grows it during training: one layer of the matched per-adapter width every
    `grow_every` epochs at the best position of the current model, the last one trimmed to fit the budget
    (GrowthConfig.max_trainable)."""
    import hf_topoadapt as hta
    from hf_topoadapt.growth import GrowthConfig, TopoGrowthCallback, head_only_topo_model

    options = {
        k: v
        for k, v in options.items()
        if k not in ("neuron_budget", "fill_budget", "head_warmup_steps", "spend_budget")
    }
    if start_adapters >= budget.num_adapters:
        raise ValueError(
            f"start={start_adapters} leaves nothing to grow: the budget is spread over {budget.num_adapters} layers. "
            f"Use start=1 to {budget.num_adapters - 1}, or one-shot `topo` for all of them before training"
        )
    first = []  # positions of the one-shot layers growth starts from
    if start_adapters:
        built = _first_layers(model, calibration, budget, seed, head, start_adapters)
        wrapped, first = built.model, list(built.positions)
    else:
        config = hta.TopoAdapterConfig(neurons=budget.request(), modules_to_save=[head], seed=seed, **options)
        wrapped = head_only_topo_model(model, config)
    growth = GrowthConfig(
        schedule=[grow_every], max_insertions=budget.num_adapters - start_adapters, max_trainable=budget.target,
        calibration_batches=None, seed=seed, step_scale=options.get("step_scale", 1.0),
    )  # fmt: skip
    callback = TopoGrowthCallback(growth, calibration_data=calibration)

    def after_fit(built: Built) -> None:
        log = callback.grower.log if callback.grower is not None else []
        grown = [e for e in log if e["accepted"]]
        built.positions = [*first, *(e["position"] for e in grown)]
        built.setup_seconds += sum(e.get("seconds", 0.0) for e in log)
        shapes = wrapped.peft_config[wrapped.active_adapter].adapter_shapes or {}
        built.note = (
            (f"one-shot layers at {first}, then " if first else "")
            + f"grown every {grow_every} epochs: epochs {[e['epoch'] for e in grown]}, neurons "
            f"{[s['neurons'] for s in shapes.values()]}"
            + (f"; stopped: {callback.grower.stopped}" if log and callback.grower.stopped else "")
        )

    note = f"{start_adapters} one-shot layers, grown during training" if first else "head, grown during training"
    return Built(wrapped, note=note, callbacks=[callback], after_fit=after_fit, positions=first)


def _first_layers(model, calibration, budget: Budget, seed: int, head: str, count: int) -> Built:
    """`count` layers placed before training as the default one-shot `topo` places them, trimmed to count/N of the
    adapters' budget: where growth starts from."""
    adapters = budget.target - budget.head_params
    share = replace(budget, num_adapters=count, target=budget.head_params + adapters * count // budget.num_adapters)
    options = {**topo_options(DEFAULT_LEVERS), "num_adapters": count}
    options.pop("spend_budget", None)  # growth spends the rest of the budget
    return fit_budget(_topo(model, calibration, head, seed, share.request(), "eigen", options), share)


def attention_outputs(model: nn.Module) -> list[str]:
    """Module names of every block's attention sublayer (a child named attention, self_attn or attn)."""
    from hf_topoadapt.locate import find_block_list

    path, blocks = find_block_list(model)
    names = []
    for i, block in enumerate(blocks):
        children = dict(block.named_children())
        child = next((c for c in ("attention", "self_attn", "attn") if c in children), None)
        if child is not None:
            names.append(f"{path}.{i}.{child}")
    return names


def topo_candidates(model: nn.Module, options: dict, budget: Budget) -> list[str]:
    """The positions a topo variant with these TopoAdapterConfig options ranks (the library's defaults for the rest)
    that the budget has a cost for."""
    import hf_topoadapt as hta
    from hf_topoadapt.locate import config_positions

    # a string `positions` is build_topo's rule ("random", "fixed"...), a list TopoAdapterConfig.positions
    chosen = {k: v for k, v in options.items() if k in TOPO_POSITION_OPTIONS and not isinstance(v, str)}
    config = hta.TopoAdapterConfig(**chosen)
    return [p.name for p in config_positions(model, config) if p.name in budget.costs]


def build_topo(
    model: nn.Module,
    calibration: list[dict],
    budget: Budget,
    seed: int,
    head: str,
    topo_positions: list[str] | None = None,
    positions: str = "ranked",
    init: str = "eigen",
    fixed: list[str] | None = None,
    neurons: int | None = None,
    candidates: list[str] | None = None,
    **options,
) -> Built:
    """Topo adapters at the budget: built with enough neurons, then each trimmed (its neurons come strongest first) so
    the trainable count meets the budget. With equal widths everywhere (a transformer) the request is the matched
    count itself; in a CNN a neuron's cost differs by position. `positions="fixed"` with `fixed` names the positions,
    and `neurons` fixes the neurons of every adapter (no trimming to the budget); `candidates` names the positions
    that compete."""
    options = {"num_adapters": budget.num_adapters, **options}
    spend = options.pop("spend_budget", False)
    head_draws = options.pop("head_draws", 1)
    if candidates:  # the positions that compete (TopoAdapterConfig.positions), beyond the default block outputs
        options["positions"] = list(candidates)
    if options.get("neuron_budget") is True and init == "eigen":  # the library allocates it by value per parameter
        options["neuron_budget"] = budget.target - budget.head_params
    else:  # random rows get exactly the recipe's allocation below
        options.pop("neuron_budget", None)
        options.pop("fill_budget", None)
    if positions == "ranked" and head_draws > 1:
        request = neurons or budget.request()
        return _head_averaged(model, calibration, head, seed, request, init, options, budget, head_draws, spend)
    if positions == "ranked":
        request = neurons or budget.request()
        built = fit_budget(_topo(model, calibration, head, seed, request, init, options), budget)
        return spend_budget(built, model, calibration, head, seed, request, init, options, budget) if spend else built
    candidates = topo_candidates(model, options, budget)
    if positions == "fixed":
        if not fixed:
            raise ValueError('positions="fixed" needs the positions: fixed=[...]')
        chosen = list(fixed)
    elif positions == "topo":
        if not topo_positions:
            raise ValueError("this method needs the positions chosen by topo (run topo first)")
        chosen = list(topo_positions)
    elif positions == "random":
        chosen = random.Random(1000 + seed).sample(candidates, budget.num_adapters)
    elif positions == "last":
        chosen = candidates[-budget.num_adapters :]
    else:
        raise ValueError(f"unknown positions rule {positions!r}")
    options.update(num_adapters=len(chosen), target_modules=chosen)
    if neurons is not None:
        return _topo(model, calibration, head, seed, neurons, init, options)
    if init == "eigen":
        request = budget.request(chosen)
    else:  # random rows: exactly the allocation (at most one neuron per channel: U's columns are distinct axes)
        request = max(budget.allocate({p: budget.widths.get(p, 10**6) for p in chosen}).values())
    return fit_budget(_topo(model, calibration, head, seed, request, init, options), budget)


def _topo(model, calibration, head, seed, neurons, init, options) -> Built:
    import hf_topoadapt as hta

    if options.get("neuron_budget"):
        neurons = None  # the budget decides the neurons of every position
    config = hta.TopoAdapterConfig(neurons=neurons, modules_to_save=[head], seed=seed, init=init, **options)
    wrapped = hta.get_topo_model(model, config, calibration_data=calibration)
    chosen = list(wrapped.topo_report.chosen) if wrapped.topo_report else []
    if config.init == "random" or not chosen:
        chosen = list(config.target_modules)
    shapes = config.adapter_shapes or {}
    directions = f" ({config.directions} directions)" if config.init == "eigen" else ""
    note = f"{config.init} init{directions}, neurons {[shape['neurons'] for shape in shapes.values()]}"
    if wrapped.topo_report and config.init == "eigen":
        accepted = [i for i in wrapped.topo_report.insertions if i["accepted"]]
        note += ", eps " + " ".join(f"{i['eps']:.3g}" for i in accepted)
        note += f", calibration loss {accepted[0]['loss_before']:.3f} -> {accepted[-1]['loss_after']:.3f}"
    phases = dict(wrapped.topo_report.seconds) if wrapped.topo_report else {}
    return Built(wrapped, note=note, positions=chosen, setup_phases=phases)


def _head_averaged(model, calibration, head, seed, request, init, options, budget: Budget, draws, spend) -> Built:
    """The `heads=K` lever: the positions the ranking averaged over K draws of the head puts first (head_draws.py),
    each layer placed and initialised as usual with the run's own head; with `spend`, the next of that order while the
    budget is unspent."""
    import hf_topoadapt as hta

    from .head_draws import head_averaged_order

    config = hta.TopoAdapterConfig(modules_to_save=[head], seed=seed, init=init, **_config_options(options))
    order, _ = head_averaged_order(model, calibration, head, config, draws, seed)
    count = min(options["num_adapters"], len(order))
    fixed = {**options, "num_adapters": count, "target_modules": order[:count]}
    built = fit_budget(_topo(model, calibration, head, seed, request, init, fixed), budget)
    if spend:
        built = spend_budget(built, model, calibration, head, seed, request, init, options, budget, order)
    built.note += f"; positions ranked over {draws} head draws"
    return built


def _config_options(options: dict) -> dict:
    """The TopoAdapterConfig fields among build options (no count of adapters or named positions)."""
    return {k: v for k, v in options.items() if k not in ("num_adapters", "target_modules")}


def spend_budget(
    built, model, calibration, head, seed, request, init, options, budget: Budget, order: list[str] | None = None
) -> Built:
    """Built again with one more ranked position while the budget is unspent by more than SPEND_TOLERANCE. Each try
    starts from the model unloaded (its layers and head copy removed: the pretrained model and the seed's untrained
    head), so the same scoring round ranks the same positions and the earlier layers come out the same. `order`: the
    positions best first by another ranking (`heads=K`), taken as target_modules, instead of the model's own."""
    count = options["num_adapters"]
    available = len(order) if order is not None else len(topo_candidates(model, options, budget))
    while budget.relative_gap(count_trainable(built.model)) < -SPEND_TOLERANCE and count < available:
        count += 1
        base = built.model.unload()
        more = {**options, "num_adapters": count}
        if order is not None:
            more["target_modules"] = order[:count]
        built = fit_budget(_topo(base, calibration, head, seed, request, init, more), budget)
        built.note += f"; {count} positions to spend the budget"
    return built


def fit_budget(built: Built, budget: Budget) -> Built:
    """Trims the adapters of a TopoModel to `budget.allocate` of the neurons they got (keeping the strongest, which
    come first), so the trainable count meets the budget; updates adapter_shapes so save/load stays consistent."""
    from hf_topoadapt.tuner import TopoLayer

    wrapped = built.model
    config = wrapped.peft_config[wrapped.active_adapter]
    shapes = config.adapter_shapes
    got = {p: shape["neurons"] for p, shape in shapes.items()}
    keep = budget.allocate(got)
    if keep == got:
        return built
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
