"""Learning rates chosen on validation: every method of a recipe over a grid of learning rates at the smallest size,
several seeds; the chosen rate is the one with the best mean validation accuracy (the test split plays no part).
Each run's lowest validation loss is reported beside it: a continuous read of the same runs, since accuracy on 32-100
validation examples moves in steps of points and neighbouring rates often tie within half a point.

    python benchmarks/transfer_lr_grid.py --recipe vit_digits             # the recipe's grid, seeds 0 1 2
    python benchmarks/transfer_lr_grid.py --recipe minilm_topics --methods topo lora --seeds 0 1
    python benchmarks/transfer_lr_grid.py --recipe effnet_mnist --methods lora topo --ranks 1 4 8   # per budget

Writes benchmarks/results/transfer_lr_grid_<recipe>.{md,json} (the recipe's own budget) and, for --ranks other than
it, transfer_lr_grid_<recipe>_ranks.{md,json}: a rate chosen at LoRA rank r (and topo's matched budget) is the
recipe's `<method>@r<r>` rate, since a rate tuned at one rank can diverge at another. Every run is appended to
transfer_lr_grid_<recipe>_runs.jsonl at once and skipped when the grid is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from recipes.experiment import load_runs, run_experiment  # noqa: E402

GRIDS = {
    # 5e-2: LoRA at r=1 chose 2e-2, the grid's top, rising (only the calls that asked for it ran it)
    "minilm_topics": {"head": [5e-3, 2e-2, 5e-2], "full": [5e-5, 1e-4, 2e-4], "peft": [2e-3, 5e-3, 1e-2, 2e-2, 5e-2]},
    # 5e-2: AdaLoRA at r=4 and 30 epochs chose 3e-2, the grid's top (only the calls that asked for it ran it)
    "effnet_mnist": {"head": [1e-2, 3e-2, 1e-1], "full": [1e-4, 3e-4, 1e-3], "peft": [1e-3, 3e-3, 1e-2, 3e-2, 5e-2]},
    "vit_digits": {"head": [1e-2, 3e-2, 1e-1], "full": [3e-4, 1e-3, 3e-3], "peft": [3e-3, 1e-2, 3e-2, 1e-1]},
}
SMALLEST = {"minilm_topics": 8, "effnet_mnist": 10, "vit_digits": 10}
# "topo" is the recipes' default topo method (its rate is every topo variant's), "topo+" the paper's layer.
DEFAULT_METHODS = ("head", "full", "lora", "adalora", "topo", "topo+")
OUT = os.path.join(ROOT, "benchmarks", "results")


def family(method: str) -> str:
    return method if method in ("head", "full") else "peft"


def recipe_task(recipe: str, threads: int, load: bool = True):
    """The recipe's module, Task (None unless `load`) and default arguments."""
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    args = module.parse_args(["--threads", str(threads), "--no-progress"])
    if not load:
        return module, None, args
    if recipe == "vit_digits":
        task, _ = module.task(args, log=lambda _: None)
    elif recipe == "minilm_topics":
        task, _ = module.task(args)
    else:
        task = module.task(args)
    return module, task, args


def lowest_loss(curves: list[dict]) -> float:
    """A run's lowest validation loss over its epochs (its per-epoch curves)."""
    return min(epoch["loss"] for epoch in curves)


def choose(results, methods, rank: int | None = None) -> dict[str, dict]:
    """Per method and lr (at LoRA rank `rank`, every rank when None): mean and std of the best-epoch validation
    accuracy and of the lowest validation loss over every seed run, and the chosen lr (`best`).

    Rates are compared on the seeds both ran, so more seeds at two close rates never set them against a rate's mean
    over fewer (easier or harder) seeds: the chosen rate beats every other on their shared seeds, by mean accuracy
    and, tied on it, by the lower mean validation loss (accuracy on a few dozen examples moves in steps, so
    neighbouring rates often tie exactly; a tie used to go to the lower rate, which on MiniLM kept the tied rate whose
    loss was 2-3x higher). Without such a rate (a cycle) the best on the seeds every rate ran is chosen."""
    table = {}
    for method in methods:
        by_lr: dict[float, dict[int, object]] = {}
        for r in results:
            if r.method == method and rank in (None, r.lora_rank):
                by_lr.setdefault(r.lr, {})[r.seed] = r
        if not by_lr:
            continue
        rows = {lr: _summary(list(runs.values())) for lr, runs in sorted(by_lr.items())}
        table[method] = {"rows": rows, "best": _best_rate(by_lr)}
    return table


def _best_rate(by_lr: dict[float, dict[int, object]]) -> float:
    def key(lr: float, seeds: set[int]) -> tuple[float, float]:
        return _rank_key(_summary([by_lr[lr][seed] for seed in sorted(seeds)]))

    def beats(a: float, b: float) -> bool:
        shared = by_lr[a].keys() & by_lr[b].keys()
        return not shared or key(a, shared) >= key(b, shared)

    rates = sorted(by_lr)
    winners = [a for a in rates if all(beats(a, b) for b in rates if b != a)]
    if winners:
        return winners[0]
    common = set.intersection(*(set(runs) for runs in by_lr.values()))
    return max(rates, key=lambda lr: key(lr, common)) if common else max(rates, key=lambda lr: key(lr, set(by_lr[lr])))


def _rank_key(row: dict) -> tuple[float, float]:
    # means of the same accuracies summed in another order can differ in the last bits: those are ties too
    return round(row["accuracy"], 9), -row["loss"]


def _summary(runs) -> dict:
    accuracy = [r.validation for r in runs]
    loss = [lowest_loss(r.curves) for r in runs]

    def std(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "accuracy": statistics.fmean(accuracy), "accuracy_std": std(accuracy),
        "loss": statistics.fmean(loss), "loss_std": std(loss), "seeds": len(runs),
    }  # fmt: skip


def grid_runs(
    results, path: str, args, methods: list[str] | None = None, epochs: int | None = None, rank: int | None = None
) -> list:
    """This call's runs and every other run of the same grid already in the runs file (other seeds): a method's
    choice uses all the seeds it has. `methods`: the methods kept (default: this call's); `epochs`: the training
    length kept (default: every one; a run of another length is another grid); `rank`: the LoRA rank kept (default:
    this call's). The rates are the grid's and this call's `--lrs`: a call that runs a few of them (more seeds where
    two tie) still reports, and chooses among, all of them."""
    methods = methods or args.methods
    earlier = [r for r in load_runs(path).values() if epochs is None or r.epochs == epochs]
    runs = {(r.method, r.per_class, r.seed, r.lr, r.lora_rank): r for r in earlier}
    runs.update({(r.method, r.per_class, r.seed, r.lr, r.lora_rank): r for r in results})
    ranks = {r.lora_rank for r in results} if rank is None else {rank}
    return [
        r for r in runs.values()
        if r.method in methods and r.per_class == SMALLEST[args.recipe] and r.lora_rank in ranks
        and any(math.isclose(r.lr, lr) for lr in [*GRIDS[args.recipe][family(r.method)], *(args.lrs or [])])
    ]  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=list(GRIDS), required=True)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="override the grid for every method")
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=None, help="LoRA ranks (budgets) to choose at (default: the recipe's)"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output-dir", default=OUT)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from the runs file; train nothing"
    )
    args = parser.parse_args(argv)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    import torch

    torch.set_num_threads(args.threads)
    module, task, recipe_args = recipe_task(args.recipe, args.threads)
    from recipes.cli import training_setup

    setup = training_setup(recipe_args)
    setup.progress = False
    stem = os.path.join(args.output_dir, f"transfer_lr_grid_{args.recipe}")
    ranks = args.ranks or [recipe_args.lora_rank]
    results = []
    for rank in [] if args.report_only else ranks:
        for method in args.methods:
            for lr in args.lrs or GRIDS[args.recipe][family(method)]:
                results += run_experiment(
                    task, [method], [SMALLEST[args.recipe]], args.seeds, setup, lrs={method: lr}, lora_rank=rank,
                    num_adapters=recipe_args.num_adapters, test_per_class=recipe_args.test_per_class,
                    output_dir=args.output_dir, results_path=f"{stem}_runs.jsonl", resume=True, log=lambda _: None,
                )  # fmt: skip
    chosen = {}
    if recipe_args.lora_rank in ranks:
        own = [r for r in results if r.lora_rank == recipe_args.lora_rank]
        earlier = {
            r.method for r in load_runs(f"{stem}_runs.jsonl").values()
            if r.lora_rank == recipe_args.lora_rank and r.epochs == setup.epochs
        }  # fmt: skip
        methods = report_methods(args.methods, earlier)
        kept = grid_runs(own, f"{stem}_runs.jsonl", args, methods, setup.epochs, recipe_args.lora_rank)
        table = choose(kept, methods)
        chosen = write_report(stem, {None: table}, args.recipe, setup.epochs, "")
    others = [rank for rank in ranks if rank != recipe_args.lora_rank]
    if others:
        runs = other_rank_runs(f"{stem}_runs.jsonl", args.recipe, recipe_args.lora_rank, setup.epochs)
        methods, grid_ranks = sorted({r.method for r in runs}), sorted({r.lora_rank for r in runs})
        tables = {rank: choose(runs, methods, rank) for rank in grid_ranks}
        flags = f" --methods {' '.join(methods)} --ranks {' '.join(map(str, grid_ranks))}"
        chosen |= write_report(f"{stem}_ranks", tables, args.recipe, setup.epochs, flags)
    return chosen


def report_methods(methods: list[str], earlier: set[str]) -> list[str]:
    """The methods of the recipe's own report: this call's beside those of earlier calls (a call for one method
    rewrites the report, and must not drop the others' rows), in DEFAULT_METHODS' order, then the rest."""
    ordered = [m for m in DEFAULT_METHODS if m in earlier or m in methods]
    return ordered + [m for m in methods if m not in ordered] + sorted(earlier - set(ordered) - set(methods))


def other_rank_runs(path: str, recipe: str, own_rank: int, epochs: int | None = None) -> list:
    """Every grid run in the runs file at a LoRA rank other than the recipe's own (of `epochs` when given)."""
    return [
        r for r in load_runs(path).values()
        if r.lora_rank != own_rank and r.per_class == SMALLEST[recipe] and epochs in (None, r.epochs)
        and any(math.isclose(r.lr, lr) for lr in GRIDS[recipe][family(r.method)])
    ]  # fmt: skip


def write_report(stem: str, tables: dict, recipe: str, epochs: int, flags: str) -> dict[str, float]:
    """`stem`.md and .json from per-rank tables (rank None: the recipe's own budget); returns the chosen rates, keyed
    `<method>@r<rank>` at other ranks, as the recipes' lrs take them."""
    by_rank = None not in tables
    lines = [
        f"# Learning rates for {recipe}{' at other budgets' if by_rank else ''}, chosen on validation",
        "",
        f"{SMALLEST[recipe]} examples per class to train and as many to validate, every seed run so far (the "
        f"seeds column; `--seeds` adds more), "
        f"{epochs} epochs with the recipe's Trainer settings; mean ± std per learning rate of each run's "
        f"best-epoch validation accuracy and of its lowest validation loss (a continuous read of the same runs: "
        f"accuracy on a few dozen examples moves in steps of points and ties; the test split is not looked at). The "
        f"chosen rate beats every other on the seeds both ran: by mean accuracy, and tied on it by the lower mean "
        f"validation loss (a rate with more seeds is never set against another's mean over fewer). "
        + ("A rank's chosen rate is the recipe's `<method>@r<rank>` rate (topo at LoRA rank r's matched budget). "
           if by_rank else "")
        + f"Regenerate with `python benchmarks/transfer_lr_grid.py --recipe {recipe}{flags}`.",
        "",
        f"| {'rank | ' if by_rank else ''}method | lr | validation accuracy | lowest validation loss | seeds "
        "| chosen |",
        f"|{'---:|' if by_rank else ''}---|---:|---:|---:|---:|:---:|",
    ]  # fmt: skip
    chosen, dump = {}, {}
    for rank, table in tables.items():
        for method, entry in table.items():
            key = method if rank is None else f"{method}@r{rank}"
            chosen[key] = entry["best"]
            dump[key] = {str(k): v for k, v in entry["rows"].items()}
            for lr, row in entry["rows"].items():
                lines.append(
                    f"| {'' if rank is None else f'{rank} | '}{method} | {lr:g} | {row['accuracy']:.4f} ± "
                    f"{row['accuracy_std']:.4f} | {row['loss']:.3f} ± {row['loss_std']:.3f} | {row['seeds']} | "
                    f"{'yes' if lr == entry['best'] else ''} |"
                )
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{stem}.json", "w") as f:
        json.dump({"chosen": chosen, "table": dump}, f, indent=2)
    print("\n".join(lines))
    return chosen


if __name__ == "__main__":
    main()
