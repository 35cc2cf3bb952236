"""Which levers make the topo default, chosen on validation: greedy forward selection at the smallest size.

Start from the paper's method (topo+: none of the levers); each round tries adding every remaining lever (a head
warm-up before scoring, cross-fitted scores, the classifier's input as a candidate, neurons by value per parameter)
on every recipe and seed, and keeps the one that raises the mean validation accuracy most (averaged over recipes),
if any does. The test split is not looked at.

    python benchmarks/transfer_levers.py                           # every recipe, seeds 0-4 (resumable)
    python benchmarks/transfer_levers.py --recipes vit_digits --seeds 0 1

Writes benchmarks/results/transfer_levers.{md,json}; runs go to transfer_levers_runs.jsonl and are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from benchmarks.transfer_lr_grid import SMALLEST, recipe_task  # noqa: E402
from recipes.cli import recipe_lrs  # noqa: E402
from recipes.experiment import run_experiment  # noqa: E402
from recipes.methods import LEVERS, lr_for  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
OUT = os.path.join(ROOT, "benchmarks", "results")


def method_of(levers) -> str:
    return "topo+" + "+".join(sorted(levers))


def validation_of(recipe: str, method: str, args, tasks, lrs) -> list[float]:
    _, task, recipe_args = tasks[recipe]
    from recipes.cli import training_setup

    setup = training_setup(recipe_args)
    setup.progress = False
    results = run_experiment(
        task, [method], [SMALLEST[recipe]], args.seeds, setup, lrs={**lrs[recipe], method: lr_for("topo", lrs[recipe])},
        lora_rank=recipe_args.lora_rank, num_adapters=recipe_args.num_adapters,
        test_per_class=recipe_args.test_per_class, output_dir=args.output_dir,
        results_path=os.path.join(args.output_dir, f"transfer_levers_{recipe}_runs.jsonl"), resume=True,
        log=lambda line: print(f"  {recipe}: {line}", flush=True),
    )  # fmt: skip
    return [r.validation for r in results]


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS))
    parser.add_argument("--lr", nargs="+", default=[], help="recipe=lr for the topo methods (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=OUT)
    args = parser.parse_args(argv)
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tasks = {recipe: recipe_task(recipe, args.threads) for recipe in args.recipes}
    overrides = dict(item.split("=") for item in args.lr)
    lrs = {}
    for recipe, (_, _, recipe_args) in tasks.items():
        lrs[recipe] = recipe_lrs(recipe_args)
        if recipe in overrides:
            lrs[recipe]["topo"] = float(overrides[recipe])

    def score(levers) -> dict[str, list[float]]:
        return {recipe: validation_of(recipe, method_of(levers), args, tasks, lrs) for recipe in args.recipes}

    chosen: list[str] = []
    current = score(chosen)
    rounds = [{"chosen": [], "candidates": {method_of([]): current}}]
    while len(chosen) < len(args.levers):
        candidates = {lever: score([*chosen, lever]) for lever in args.levers if lever not in chosen}

        def gain(values: dict[str, list[float]], start=current) -> float:
            return statistics.fmean(statistics.fmean(values[r]) - statistics.fmean(start[r]) for r in args.recipes)

        best = max(candidates, key=lambda lever: gain(candidates[lever]))
        rounds.append(
            {
                "chosen": list(chosen),
                "candidates": {method_of([*chosen, lever]): v for lever, v in candidates.items()},
                "gains": {method_of([*chosen, lever]): gain(v) for lever, v in candidates.items()},
            }
        )
        if gain(candidates[best]) <= 0:
            break
        chosen.append(best)
        current = candidates[best]
    write(args, rounds, chosen, lrs)
    return chosen


def write(args, rounds, chosen, lrs) -> None:
    lines = [
        "# Topo levers chosen on validation",
        "",
        f"Greedy forward selection at the smallest size of every recipe ({', '.join(args.recipes)}), seeds "
        f"{args.seeds}: each round adds the lever that raises the mean validation accuracy most (averaged over the "
        "recipes), while one does. Learning rates of the topo methods: "
        + ", ".join(f"{r} {lr_for('topo', lrs[r]):g}" for r in args.recipes)
        + ". Regenerate with `python benchmarks/transfer_levers.py`.",
        "",
        f"**Chosen: {', '.join(chosen) or 'none'}** (`{method_of(chosen)}`).",
        "",
    ]
    header = "| round | method | " + " | ".join(args.recipes) + " | mean gain over the round's start |"
    lines += [header, "|---:|---|" + "---:|" * len(args.recipes) + "---:|"]
    for i, entry in enumerate(rounds):
        for method, values in entry["candidates"].items():
            cells = [
                f"{statistics.fmean(values[r]):.4f} ± {statistics.stdev(values[r]) if len(values[r]) > 1 else 0:.4f}"
                for r in args.recipes
            ]
            gain = entry.get("gains", {}).get(method)
            lines.append(
                f"| {i} | `{method}` | " + " | ".join(cells) + f" | {'' if gain is None else f'{gain:+.4f}'} |"
            )
    with open(os.path.join(args.output_dir, "transfer_levers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.output_dir, "transfer_levers.json"), "w") as f:
        json.dump({"chosen": chosen, "rounds": rounds, "lrs": lrs, "seeds": args.seeds}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
