"""Accuracy against trainable budget at each recipe's smallest size: LoRA and AdaLoRA at ranks 1, 2, 4, 8, topo
adapters (the default, one-shot) and topo adapters grown during fine-tuning at the matched budgets, head-only and
full fine-tuning as reference lines, and the ablations at the r=2 budget (the paper's method without the levers, each
default lever off in turn, random positions, random initialisation at the chosen positions).

    python benchmarks/transfer_frontier.py --recipe vit_digits        # one recipe (resumable), then the report
    python benchmarks/transfer_frontier.py --report-only              # rewrite the report from the runs files
    python benchmarks/transfer.py --frontier                          # the same, every recipe

Writes benchmarks/results/transfer_frontier.{md,json} and transfer_frontier_<recipe>.png; each run goes to
transfer_frontier_<recipe>_runs.jsonl at once. Runs of the learning-rate grid and of the lever selection with the
same settings (method, size, seed, epochs, learning rate, budget) are the same computation and are reused, not rerun,
unless `--no-reuse` (used for the ViT: its lever selection ran on an earlier pretrained ViT than the one the recipe
ships; its lr grid was rerun on the shipped one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from benchmarks.transfer_lr_grid import SMALLEST, recipe_task  # noqa: E402
from benchmarks.transfer_training import paired  # noqa: E402
from recipes.experiment import load_runs, run_experiment  # noqa: E402
from recipes.methods import DEFAULT_LEVERS, lever_off, lr_for  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
RANKS = (1, 2, 4, 8)
CURVES = ("lora", "adalora", "topo", "topo_grown")
REFERENCE = ("head", "full")
ABLATION_RANK = 2
OUT = os.path.join(ROOT, "benchmarks", "results")
GOAL_MARGIN = 0.02  # topo above LoRA by >= 2 points at the r=2 budget
GOAL_TOLERANCE = 0.01  # and nowhere below it by more than 1 point


def ablations() -> list[str]:
    return [
        "topo_paper",
        *[lever_off(lever) for lever in DEFAULT_LEVERS if len(DEFAULT_LEVERS) > 1],  # one lever: topo_paper
        "topo_random_positions",
        "bottleneck_at_topo",
    ]


def lever_name(levers) -> str:
    return "topo+" + "+".join(sorted(levers))


def reuse_earlier_runs(recipe: str, output_dir: str, runs_file: str, lrs: dict, epochs: int | None = None) -> int:
    """Copies into the frontier's runs file the baseline runs (head, full, LoRA, AdaLoRA) of the lr grid and the
    lever selection with this plan's settings (and training length, when given). Topo runs are never reused: what
    they computed changed with the defaults and the solvers of their day (eigenvector signs, the neuron cap). Returns
    how many."""
    have = load_runs(runs_file)
    added = 0
    for source in (f"transfer_lr_grid_{recipe}_runs.jsonl", f"transfer_levers_{recipe}_runs.jsonl"):
        for result in load_runs(os.path.join(output_dir, source)).values():
            if result.method.startswith(("topo", "bottleneck")) or epochs not in (None, result.epochs):
                continue
            same_rate = math.isclose(result.lr, lr_for(result.method, lrs, result.lora_rank))
            if result.key in have or not same_rate:
                continue
            with open(runs_file, "a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            have[result.key] = result
            added += 1
    return added


def recipe_setup(recipe: str, threads: int):
    """A recipe's task, default arguments, Trainer settings (no progress bars) and learning rates."""
    _, task, recipe_args = recipe_task(recipe, threads)
    from recipes.cli import recipe_lrs, training_setup

    setup = training_setup(recipe_args)
    setup.progress = False
    return task, recipe_args, setup, recipe_lrs(recipe_args)


def run_recipe(
    recipe: str, seeds: list[int], threads: int, output_dir: str, only: list[str] | None = None, reuse: bool = True
) -> None:
    task, recipe_args, setup, lrs = recipe_setup(recipe, threads)
    runs_file = os.path.join(output_dir, f"transfer_frontier_{recipe}_runs.jsonl")
    if reuse:
        reused = reuse_earlier_runs(recipe, output_dir, runs_file, lrs, setup.epochs)
        print(f"{recipe}: {reused} runs reused from the grid and levers")
    # the r=2 comparison first, then the ends of the frontier: an interrupted run has reported what matters most
    plan = {rank: list(CURVES) for rank in sorted(RANKS, key=lambda r: (r != ABLATION_RANK, -r))}
    plan[ABLATION_RANK] += ablations()
    plan[recipe_args.lora_rank] = [*REFERENCE, *plan[recipe_args.lora_rank]]  # rank does not change them
    for rank, methods in plan.items():
        methods = [m for m in methods if only is None or m in only]
        if not methods:
            continue
        log = lambda line, r=rank: print(f"  {recipe} r={r}: {line}", flush=True)  # noqa: E731
        run_experiment(
            task, methods, [SMALLEST[recipe]], seeds, setup, lrs=lrs, lora_rank=rank,
            num_adapters=recipe_args.num_adapters, test_per_class=recipe_args.test_per_class, output_dir=output_dir,
            results_path=runs_file, resume=True, log=log,
        )  # fmt: skip


def run_candidate(recipe: str, method: str, seeds: list[int], threads: int, output_dir: str, ranks) -> list[str]:
    """A default's candidate (a lever that passed a round) at every rank before it is adopted: what it spends of each
    budget and what it scores, in transfer_frontier_<recipe>_candidates_runs.jsonl under its own name."""
    task, recipe_args, setup, lrs = recipe_setup(recipe, threads)
    lines = []
    for rank in ranks:
        results = run_experiment(
            task, [method], [SMALLEST[recipe]], seeds, setup, lrs=lrs, lora_rank=rank,
            num_adapters=recipe_args.num_adapters, test_per_class=recipe_args.test_per_class, output_dir=output_dir,
            results_path=os.path.join(output_dir, f"transfer_frontier_{recipe}_candidates_runs.jsonl"), resume=True,
            log=lambda line, r=rank: print(f"  {recipe} r={r}: {line}", flush=True),
        )  # fmt: skip
        spent = [r.trainable / r.budget_target for r in results if r.budget_target]
        validation, test = _stats([r.validation for r in results]), _stats([r.accuracy for r in results])
        lines.append(
            f"{recipe} r={rank} {method}: budget spent {min(spent):.0%}-{max(spent):.0%}, validation "
            f"{validation[0]:.3f} ± {validation[1]:.3f}, test {test[0]:.3f} ± {test[1]:.3f}"
        )
    print("\n".join(lines))
    return lines


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(recipe: str, output_dir: str) -> dict | None:
    """Per (method, rank): accuracy mean/std over seeds, trainable mean, setup and epoch seconds; and the goal."""
    runs_file = os.path.join(output_dir, f"transfer_frontier_{recipe}_runs.jsonl")
    if not os.path.exists(runs_file):
        return None
    _, _, recipe_args = recipe_task(recipe, 1, load=False)
    from recipes.cli import recipe_lrs

    lrs = recipe_lrs(recipe_args)
    groups: dict[tuple[str, int], list] = {}
    for r in load_runs(runs_file).values():
        if r.per_class != SMALLEST[recipe] or r.epochs != recipe_args.epochs:  # another training length
            continue
        rank = r.lora_rank if r.method not in REFERENCE else 0
        # the rate chosen on validation (at this budget where the recipe has one), not the grid's others
        if math.isclose(r.lr, lr_for(r.method, lrs, r.lora_rank)):
            groups.setdefault((r.method, rank), []).append(r)
    rows = {}
    for (method, rank), runs in groups.items():
        mean, std = _stats([r.accuracy for r in runs])
        rows[f"{method}@{rank}"] = {
            "method": method, "rank": rank, "seeds": sorted(r.seed for r in runs), "accuracy_mean": mean,
            "accuracy_std": std, "validation_mean": _stats([r.validation for r in runs])[0],
            "trainable": round(statistics.fmean(r.trainable for r in runs)), "lr": runs[0].lr,
            "setup_seconds": statistics.fmean(r.setup_seconds for r in runs),
            "train_seconds_per_epoch": statistics.fmean(r.train_seconds_per_epoch for r in runs),
            "positions": [r.positions for r in sorted(runs, key=lambda r: r.seed)],
            "accuracy_by_seed": {r.seed: r.accuracy for r in runs},
            "test_loss": test_loss(runs),
        }  # fmt: skip
    return {
        "recipe": recipe, "per_class": SMALLEST[recipe], "epochs": recipe_args.epochs, "rows": rows, "goal": goal(rows)
    }  # fmt: skip


def test_loss(runs: list) -> tuple[float, float] | None:
    """Mean and std of the test cross-entropy of the checkpoints chosen by validation accuracy (None where a run
    predates recording it): how confident the same predictions are, beside how many are right."""
    losses = [r.test_metrics.get("loss") for r in runs]
    return None if any(v is None for v in losses) else _stats(losses)


def goal(rows: dict) -> dict:
    """Issue 9's goal per topo method: above LoRA at every rank, >= 2 points at r=2, never > 1 point below, seed
    spread no larger than LoRA's, setup within 2 training epochs."""
    out = {}
    for method in ("topo", "topo_grown"):
        margins, spreads, setup = {}, {}, []
        for rank in RANKS:
            ours, lora = rows.get(f"{method}@{rank}"), rows.get(f"lora@{rank}")
            if ours is None or lora is None:
                continue
            margins[rank] = ours["accuracy_mean"] - lora["accuracy_mean"]
            spreads[rank] = (ours["accuracy_std"], lora["accuracy_std"])
            setup.append(ours["setup_seconds"] / max(ours["train_seconds_per_epoch"], 1e-9))
        if not margins:
            continue
        mine, theirs = by_rank_and_seed(rows, method, margins), by_rank_and_seed(rows, "lora", margins)
        out[method] = {
            "margin_by_rank": margins,
            "paired_by_rank": {
                rank: difference({k: v for k, v in mine.items() if k[0] == rank}, theirs) for rank in margins
            },
            "pooled": difference(mine, theirs),
            "above_lora_everywhere": all(m > 0 for m in margins.values()),
            "margin_at_r2_met": margins.get(ABLATION_RANK, -1) >= GOAL_MARGIN,
            "never_worse_than_1_point": min(margins.values()) >= -GOAL_TOLERANCE,
            "spread_no_larger": all(a <= b for a, b in spreads.values()),
            "setup_in_epochs_max": max(setup),
            "setup_within_2_epochs": max(setup) <= 2.0,
        }
    return out


def by_rank_and_seed(rows: dict, method: str, ranks) -> dict[tuple[int, int], float]:
    return {
        (rank, int(seed)): acc for rank in ranks for seed, acc in rows[f"{method}@{rank}"]["accuracy_by_seed"].items()
    }


def difference(ours: dict, lora: dict) -> dict:
    """Our accuracy minus LoRA's, paired on the (rank, seed) both ran (a seed fixes the training examples and the
    head's draw): mean, its standard error and the count, whether a margin is more than the seeds' noise."""
    mean, error, n = paired(ours, lora)
    return {"mean": mean, "error": error, "n": n}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, style in zip(CURVES, ("o-", "s--", "^-", "v-"), strict=True):
        mine = [r for r in rows.values() if r["method"] == method]
        points = sorted((r["trainable"], r["accuracy_mean"], r["accuracy_std"]) for r in mine)
        if points:
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
        losses = sorted((r["trainable"], *r["test_loss"]) for r in mine if r.get("test_loss"))
        if losses:
            xs, ys, es = zip(*losses, strict=True)
            loss_ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
    for method, color in zip(REFERENCE, ("grey", "black"), strict=True):
        row = rows.get(f"{method}@0")
        if row:
            ax.axhline(row["accuracy_mean"], color=color, ls=":", label=f"{method} ({row['trainable']:,} params)")
            if row.get("test_loss"):
                loss_ax.axhline(row["test_loss"][0], color=color, ls=":", label=method)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    loss_ax.set_ylabel("test cross-entropy (lower is better)")
    for a in (ax, loss_ax):
        a.set_xscale("log")
        a.set_xlabel("trainable parameters")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{summary['recipe']}, {summary['per_class']} per class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(row: dict | None, seeds: int | None = None) -> str:
    """Mean ± std (trainable parameters), with the row's seed count where it differs from the table's `seeds`."""
    if row is None:
        return "-"
    count = "" if seeds is None or len(row["seeds"]) == seeds else f"; {len(row['seeds'])} seeds"
    return f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} ({row['trainable']:,}{count})"


def common_seeds(rows: dict) -> list[int]:
    """The seeds most rows ran (a row that ran more, or fewer, says so in its cell)."""
    counts = Counter(tuple(r["seeds"]) for r in rows.values())
    return list(counts.most_common(1)[0][0]) if counts else []


def loss_cell(row: dict | None) -> str:
    if row is None or row.get("test_loss") is None:
        return "-"
    return f"{row['test_loss'][0]:.3f} ± {row['test_loss'][1]:.3f}"


def points(difference: dict) -> str:
    error = "" if math.isnan(difference["error"]) else f" ± {100 * difference['error']:.1f}"
    return f"{100 * difference['mean']:+.1f}{error}"


def rates_line(rows: dict) -> str:
    """Each curve's learning rate at every rank, as its runs trained."""

    def rate(key: str) -> str:
        return f"{rows[key]['lr']:g}" if key in rows else "-"

    return "; ".join(f"{method} " + ", ".join(rate(f"{method}@{r}") for r in RANKS) for method in CURVES)


def report(recipes, output_dir: str) -> dict:
    summaries = {r: s for r in recipes if (s := summarise(r, output_dir)) is not None}
    lines = [
        "# Accuracy against trainable budget",
        "",
        "At each recipe's smallest training size: test accuracy, mean ± std over seeds (trainable parameters in "
        "brackets), of the checkpoint chosen on validation, tested once. Budgets are LoRA's at rank r (topo and "
        f"AdaLoRA matched to it); topo is the default (levers: {', '.join(DEFAULT_LEVERS) or 'none'}), one-shot before "
        "training; topo_grown starts from the head and grows one layer every 2 epochs at the best position of the "
        "trained model. Learning rates per method were chosen on validation at the recipe's rank "
        "(transfer_lr_grid_<recipe>.md), and LoRA's, AdaLoRA's and topo's again at every other rank "
        "(transfer_lr_grid_<recipe>_ranks.md): a rate chosen at one rank made LoRA diverge at another. "
        "The topo, LoRA, ablation and head-only and full reference rows ran on one machine, and AdaLoRA where its "
        "rank chose a rate of its own; AdaLoRA's other ranks and topo_grown ran on earlier ones. The same "
        "EfficientNet run can end several points apart on two machines (setup_stability.md); the earlier runs are "
        "kept in transfer_frontier_<recipe>_earlier_machine_runs.jsonl. "
        "EfficientNet trains 30 epochs since its 10 cut every method's runs short (transfer_epochs.md), with every "
        "rate chosen again there (AdaLoRA's too, at every rank); its 10-epoch runs are in "
        "transfer_frontier_effnet_mnist_10_epochs_runs.jsonl. A row without runs (-, or missing from the ablations) "
        "was not run again yet. "
        "Regenerate with `python benchmarks/transfer.py --frontier`.",
        "",
    ]
    for recipe, s in summaries.items():
        rows = s["rows"]
        seeds = common_seeds(rows)
        lines += [f"## {recipe} ({s['per_class']} per class, {s['epochs']} epochs, seeds {seeds})", ""]
        n = len(seeds)
        lines += ["| method | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---|" + "---:|" * len(RANKS)]
        for method in CURVES:
            lines.append(f"| {method} | " + " | ".join(cell(rows.get(f"{method}@{r}"), n) for r in RANKS) + " |")
        for method in REFERENCE:
            lines.append(f"| {method} (reference) | {cell(rows.get(f'{method}@0'), n)} |" + " |" * (len(RANKS) - 1))
        lines += ["", f"Learning rates at r={', '.join(map(str, RANKS))}: {rates_line(rows)}."]
        lines += ["", "Test loss (cross-entropy of the same checkpoints, lower is better):", ""]
        lines += ["| method | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---|" + "---:|" * len(RANKS)]
        for method in (*CURVES, *REFERENCE):
            ranks = RANKS if method in CURVES else (0,)
            lines.append(f"| {method} | " + " | ".join(loss_cell(rows.get(f"{method}@{r}")) for r in ranks) + " |")
        lines += ["", f"Ablations at the r={ABLATION_RANK} budget (validation accuracy beside test):", ""]
        lines += ["| method | test accuracy | validation | setup s | train s/epoch |", "|---|---:|---:|---:|---:|"]
        for method in ["topo", "topo_grown", "lora", *ablations()]:
            row = rows.get(f"{method}@{ABLATION_RANK}")
            if row:
                lines.append(
                    f"| {method} | {cell(row, n)} | {row['validation_mean']:.3f} | {row['setup_seconds']:.1f} | "
                    f"{row['train_seconds_per_epoch']:.2f} |"
                )
        lines += ["", "Goal (issue 9), per topo method:", ""]
        for method, g in s["goal"].items():
            margins = ", ".join(f"r={r} {points(d)}" for r, d in g["paired_by_rank"].items())
            lines.append(
                f"- {method}: points over LoRA, paired by seed (mean ± standard error) {margins}; pooled over the "
                f"ranks {points(g['pooled'])} ({g['pooled']['n']} pairs); above LoRA at every rank: "
                f"{'yes' if g['above_lora_everywhere'] else 'no'}; >= 2 points at r=2: "
                f"{'yes' if g['margin_at_r2_met'] else 'no'}; never > 1 point below: "
                f"{'yes' if g['never_worse_than_1_point'] else 'no'}; spread <= LoRA's at every rank: "
                f"{'yes' if g['spread_no_larger'] else 'no'}; setup <= 2 epochs: "
                f"{'yes' if g['setup_within_2_epochs'] else 'no'} (at most {g['setup_in_epochs_max']:.1f} epochs)"
            )
        png = f"transfer_frontier_{recipe}.png"
        plot(s, os.path.join(output_dir, png))
        lines += ["", f"![{recipe}]({png})", ""]
    with open(os.path.join(output_dir, "transfer_frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "transfer_frontier.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    print("\n".join(lines))
    return summaries


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these methods of the plan (e.g. the baselines first)")
    parser.add_argument(
        "--no-reuse", action="store_true",
        help="run the baselines here too, not copied from the grid and lever runs (their pretrained model differs: "
        "the ViT recipe pretrains its own, and a new machine pretrains another)",
    )  # fmt: skip
    parser.add_argument(
        "--candidate",
        help="run this method at --ranks (a default's candidate) instead of the plan, and report what it spends of "
        "each budget",
    )  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="with --candidate")
    args = parser.parse_args(argv)
    recipes = RECIPES if args.recipe == "all" else (args.recipe,)
    if args.candidate:
        import torch

        torch.set_num_threads(args.threads)
        return {
            recipe: run_candidate(recipe, args.candidate, args.seeds, args.threads, args.output_dir, args.ranks)
            for recipe in recipes
        }
    if not args.report_only:
        import datasets
        import torch
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        for recipe in recipes:
            run_recipe(recipe, args.seeds, args.threads, args.output_dir, args.only, reuse=not args.no_reuse)
    return report(RECIPES, args.output_dir)


if __name__ == "__main__":
    main()
