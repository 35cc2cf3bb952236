"""How long the recipes train, chosen on validation: whether a recipe's runs were cut short, and for one that was,
the training length at which its runs stop gaining.

1. Truncation, from the frontier's runs of every method at a recipe's earlier length: the share of runs whose best
   validation epoch fell in the last tenth of training. A recipe whose runs mostly peak at the end is measuring who
   learns fastest in its few steps, not what each method reaches.
2. For such a recipe, LoRA and topo at its own rank, at the rates its earlier grid chose, trained for each candidate
   length (seeds 0 1 2): the chosen length is the shortest whose mean validation accuracy over both methods is
   within a point of the best length's (a longer one costs more and gains nothing measurable). The test split is not
   looked at.

    python benchmarks/transfer_epochs.py                       # EfficientNet at 10, 30 and 50 epochs (resumable)
    python benchmarks/transfer_epochs.py --report-only

Writes benchmarks/results/transfer_epochs.{md,json}; runs go to transfer_epochs_<recipe>_runs.jsonl at once.
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
from recipes.experiment import load_runs  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results")
# the frontier's runs at each recipe's length before this choice (EfficientNet's 10-epoch runs are kept apart)
EARLIER_RUNS = {
    "minilm_topics": "transfer_frontier_minilm_topics_runs.jsonl",
    "effnet_mnist": "transfer_frontier_effnet_mnist_10_epochs_runs.jsonl",
    "vit_digits": "transfer_frontier_vit_digits_runs.jsonl",
}
LATE = 0.9  # a best epoch past this fraction of training is "at the end"
# The candidates' rates: those the recipe's 10-epoch grid chose at its own rank (r=1), for every length alike.
CANDIDATES = {"effnet_mnist": {"epochs": [10, 30, 50], "rates": {"lora": 1e-2, "topo": 1e-2}}}
SEEDS = [0, 1, 2]
TIE = 0.01


def truncation(runs) -> dict:
    late = [r for r in runs if r.best_epoch >= LATE * r.epochs]
    return {
        "runs": len(runs), "epochs": sorted({r.epochs for r in runs}), "late_share": len(late) / len(runs),
        "median_best_epoch": statistics.median(r.best_epoch for r in runs),
    }  # fmt: skip


def run_candidates(recipe: str, threads: int, output_dir: str) -> None:
    import torch

    from recipes.cli import training_setup
    from recipes.experiment import run_experiment

    torch.set_num_threads(threads)
    _, task, args = recipe_task(recipe, threads)
    plan = CANDIDATES[recipe]
    for epochs in plan["epochs"]:
        setup = training_setup(args)
        setup.epochs, setup.progress = epochs, False
        for method, lr in plan["rates"].items():
            run_experiment(
                task, [method], [SMALLEST[recipe]], SEEDS, setup, lrs={method: lr}, lora_rank=args.lora_rank,
                num_adapters=args.num_adapters, test_per_class=args.test_per_class, output_dir=output_dir,
                results_path=os.path.join(output_dir, f"transfer_epochs_{recipe}_runs.jsonl"), resume=True,
                log=lambda line, e=epochs: print(f"  {recipe} {e} epochs: {line}", flush=True),
            )  # fmt: skip


def choose_length(runs, plan: dict) -> dict:
    """Per length: each method's validation (mean, std, best epochs) and the mean over methods; the choice."""
    rows = {}
    for epochs in plan["epochs"]:
        methods = {}
        for method, lr in plan["rates"].items():
            mine = sorted(
                (r for r in runs if r.method == method and r.epochs == epochs and abs(r.lr - lr) < 1e-12
                 and r.seed in SEEDS),
                key=lambda r: r.seed,
            )  # fmt: skip
            if len(mine) < len(SEEDS):
                continue
            values = [r.validation for r in mine]
            methods[method] = {
                "validation_mean": statistics.fmean(values), "validation_std": statistics.stdev(values),
                "best_epochs": [r.best_epoch for r in mine], "validation": values,
            }  # fmt: skip
        if len(methods) == len(plan["rates"]):
            mean = statistics.fmean(m["validation_mean"] for m in methods.values())
            rows[epochs] = {"methods": methods, "mean": mean}
    chosen = shortest_near_best({e: row["mean"] for e, row in rows.items()}) if rows else None
    return {"rows": rows, "chosen": chosen}


def shortest_near_best(means: dict[int, float]) -> int:
    """The shortest length whose mean is within TIE of the best one."""
    return min(e for e, m in means.items() if m >= max(means.values()) - TIE)


def alone(chosen: dict) -> str:
    """The length each method's own validation would choose by the same rule: the choice's dependence on who is
    asked."""
    rows = chosen["rows"]
    if not rows:
        return "-"
    parts = []
    for method in next(iter(rows.values()))["methods"]:
        means = {e: row["methods"][method]["validation_mean"] for e, row in rows.items()}
        parts.append(f"{method} {shortest_near_best(means)}")
    return ", ".join(parts)


def report(output_dir: str) -> dict:
    result = {"truncation": {}, "lengths": {}}
    for recipe, name in EARLIER_RUNS.items():
        runs = [r for r in load_runs(os.path.join(output_dir, name)).values() if r.per_class == SMALLEST[recipe]]
        if runs:
            result["truncation"][recipe] = truncation(runs)
    for recipe, plan in CANDIDATES.items():
        runs = list(load_runs(os.path.join(output_dir, f"transfer_epochs_{recipe}_runs.jsonl")).values())
        result["lengths"][recipe] = choose_length(runs, plan)
    lines = [
        "# How long the recipes train, chosen on validation",
        "",
        "Regenerate with `python benchmarks/transfer_epochs.py` (`--report-only` rereads the runs).",
        "",
        "## Were the runs cut short?",
        "",
        f"Every method's frontier runs at the recipe's earlier training length: the share whose best validation epoch "
        f"fell in the last tenth of training (at or past {LATE:.0%} of the epochs), and the median best epoch.",
        "",
        "| recipe | runs | epochs | best epoch at the end | median best epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for recipe, t in result["truncation"].items():
        lines.append(
            f"| {recipe} | {t['runs']} | {', '.join(map(str, t['epochs']))} | {t['late_share']:.0%} | "
            f"{t['median_best_epoch']:g} |"
        )
    for recipe, chosen in result["lengths"].items():
        plan = CANDIDATES[recipe]
        rates = ", ".join(f"{m} {lr:g}" for m, lr in plan["rates"].items())
        lines += [
            "",
            f"## {recipe}: the training length",
            "",
            f"At its own rank and {SMALLEST[recipe]} examples per class, seeds {SEEDS}, at the rates its 10-epoch grid "
            f"chose ({rates}): validation accuracy mean ± std, the best epoch of each seed, and the mean over the "
            f"methods. The shortest length within {TIE * 100:g} point of the best mean is chosen.",
            "",
            f"| epochs | {' | '.join(plan['rates'])} | mean |",
            f"|---:|{'---|' * len(plan['rates'])}---:|",
        ]
        for epochs, row in chosen["rows"].items():
            cells = [
                f"{m['validation_mean']:.3f} ± {m['validation_std']:.3f} (best epochs "
                f"{', '.join(f'{e:g}' for e in m['best_epochs'])})"
                for m in row["methods"].values()
            ]
            lines.append(f"| {epochs} | {' | '.join(cells)} | {row['mean']:.3f} |")
        lines += ["", f"**Chosen: {chosen['chosen']} epochs.** Each method alone would choose: {alone(chosen)}."]
    with open(os.path.join(output_dir, "transfer_epochs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "transfer_epochs.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(lines))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        for recipe in CANDIDATES:
            run_candidates(recipe, args.threads, args.output_dir)
    return report(args.output_dir)


if __name__ == "__main__":
    main()
