"""How far training moves the inserted layers' rows from their eigen-initialised directions.

Per recipe at its smallest size, the default `topo` over seeds: after every optimizer step, each row of every inserted
layer's D (its input weights and the conv's kernel, flattened) against its initial direction: the cosine, and the
row's norm over its initial norm. The rows start at a tenth of the line-searched step (entries of about 1e-3) and
Adam's steps are about the learning rate per entry, so the question is whether any of the initial direction is left
(transfer_training.md, round 9, holds it fixed and loses).

    python benchmarks/direction_drift.py                       # every recipe, 5 seeds (resumable)
    python benchmarks/direction_drift.py --recipes vit_digits --seeds 0 1

Writes benchmarks/results/direction_drift.{md,json,png}; every run is appended to direction_drift_runs.jsonl.
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

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from benchmarks.transfer_diagnostics import (  # noqa: E402
    append_record,
    fresh_model,
    load_done,
    quiet_setups,
    run_key,
    seed_data,
)
from recipes.budget import head_name  # noqa: E402
from recipes.methods import build_method, lr_for  # noqa: E402
from recipes.training import checkpoint_dir, fit, unwrap  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
METHOD = "topo"
OUT = os.path.join(ROOT, "benchmarks", "results")
STEPS_SHOWN = (1, 2, 5, 10, 20, 40)  # steps taken, and the last


def topo_rows(model) -> dict[str, torch.Tensor]:
    """Every inserted layer's D, one row per neuron, by position."""
    rows = {}
    for name, module in unwrap(model).named_modules():
        if name.endswith(".topo_down.default"):
            weight = module.weight.detach().float()
            rows[name.removesuffix(".topo_down.default")] = weight.reshape(weight.shape[0], -1).clone()
    return rows


class RowDrift(TrainerCallback):
    """After each optimizer step: every row's cosine to its initial direction, its norm over the initial one, and its
    component along the initial direction over the initial norm (`along`: 1 at the start; above 1 where training
    lengthens the initial direction while it turns away from it)."""

    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.log: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = topo_rows(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = topo_rows(model)
        cosines, ratios, along = [], [], []
        for name, first in self.start.items():
            norms = first.norm(dim=1).clamp_min(1e-30)
            cosines += torch.nn.functional.cosine_similarity(now[name], first, dim=1).tolist()
            ratios += (now[name].norm(dim=1) / norms).tolist()
            along += ((now[name] * first).sum(dim=1) / norms**2).tolist()
        self.log.append({
            "step": state.global_step, "cosine": statistics.fmean(cosines), "min_cosine": min(cosines),
            "norm_ratio": statistics.fmean(ratios), "along": statistics.fmean(along),
        })  # fmt: skip


def run_seed(recipe, task, lrs, recipe_args, seed, setup) -> dict:
    splits, calibration, steps = seed_data(recipe, task, recipe_args, seed, setup)
    model, budget = fresh_model(task, recipe_args, seed, calibration)
    built = build_method(METHOD, model, calibration, budget, steps, seed, task.lora_targets)
    drift = RowDrift()
    lr = lr_for(METHOD, lrs)
    run_dir = checkpoint_dir(OUT, "drift", recipe, seed)
    outcome = fit(built.model, splits, task.collator, lr, seed, setup, run_dir, [drift], head_name(model))
    return {
        "key": run_key(recipe, seed, METHOD), "recipe": recipe, "seed": seed, "lr": lr, "positions": built.positions,
        "note": built.note, "validation": outcome.validation, "drift": drift.log,
    }  # fmt: skip


def at_step(record: dict, step: int, key: str) -> float:
    """The value after `step` steps (the last one where the run is shorter)."""
    log = record["drift"]
    return log[min(step, len(log)) - 1][key]


def report(recipes: list[str], output_dir: str) -> dict:
    done = load_done(os.path.join(output_dir, "direction_drift_runs.jsonl"))
    by_recipe = {r: [v for v in done.values() if v["recipe"] == r] for r in recipes}
    lines = [
        "# How far training moves the inserted rows from their initial directions",
        "",
        "The default `topo` at each recipe's smallest size, trained as in the frontier. After every optimizer step, "
        "each row of every inserted layer's D (input weights, flattened conv kernel) against its initial direction: "
        "the mean cosine over rows and seeds, the lowest over rows (mean over seeds), and the mean norm over the "
        "initial norm. The rows start at a tenth of the line-searched step, entries of about 1e-3, while Adam's "
        "steps are about the learning rate (0.003-0.01) per entry. Regenerate with "
        "`python benchmarks/direction_drift.py`.",
        "",
        "| recipe | seeds | steps | " + " | ".join(f"after {s}" for s in STEPS_SHOWN) + " | at the end |",
        "|---|---:|---:|" + "---:|" * (len(STEPS_SHOWN) + 1),
    ]
    summary = {}
    for recipe, records in by_recipe.items():
        if not records:
            continue
        steps = min(len(r["drift"]) for r in records)
        cells, summary[recipe] = [], {}
        for step in (*STEPS_SHOWN, steps):
            keys = ("cosine", "min_cosine", "norm_ratio", "along")
            values = {k: statistics.fmean(at_step(r, step, k) for r in records) for k in keys}
            summary[recipe][step] = values
            cells.append(
                f"{values['cosine']:.2f} (min {values['min_cosine']:.2f}; norm x{values['norm_ratio']:.1f}, "
                f"along x{values['along']:.1f})"
            )
        lines.append(f"| {recipe} | {len(records)} | {steps} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: mean cosine to the initial direction (the lowest row's; the rows' norm over their initial norm, and "
        "their component along the initial direction over the initial norm).",
        "",
        "![direction drift](direction_drift.png)",
    ]
    plot(by_recipe, os.path.join(output_dir, "direction_drift.png"))
    with open(os.path.join(output_dir, "direction_drift.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "direction_drift.json"), "w") as f:
        json.dump({"method": METHOD, "recipes": summary}, f, indent=1)
    print("\n".join(lines))
    return summary


def plot(by_recipe: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for color, (recipe, records) in zip(("C0", "C1", "C2"), by_recipe.items(), strict=False):
        for i, record in enumerate(records):
            steps = [d["step"] for d in record["drift"]]
            label = recipe if i == 0 else None
            axes[0].plot(steps, [d["cosine"] for d in record["drift"]], color=color, alpha=0.6, label=label)
            axes[1].plot(steps, [d["norm_ratio"] for d in record["drift"]], color=color, alpha=0.6, label=label)
    axes[0].set(xlabel="optimizer step", ylabel="mean cosine to the initial row", ylim=(-0.1, 1.05))
    axes[1].set(xlabel="optimizer step", ylabel="row norm / initial norm", yscale="log")
    axes[0].legend()
    fig.suptitle("Inserted rows of D during training (default topo, one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "direction_drift_runs.jsonl")
    if not args.report_only:
        torch.set_num_threads(args.threads)
        done = load_done(path)
        for recipe, task, lrs, recipe_args, setup in quiet_setups(args.recipes, args):
            for seed in args.seeds:
                if run_key(recipe, seed, METHOD) in done:
                    continue
                record = run_seed(recipe, task, lrs, recipe_args, seed, setup)
                append_record(path, record)
                last = record["drift"][-1]
                print(f"{recipe} seed {seed}: cosine {last['cosine']:.2f} after {last['step']} steps", flush=True)
    return report(args.recipes, args.output_dir)


if __name__ == "__main__":
    main()
