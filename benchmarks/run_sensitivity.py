"""Where the seed spread comes from: how much a run's result moves when its trainable weights move by a rounding-level
amount before training.

Per recipe at its smallest size and rank, for the default `topo` and LoRA over seeds: each run twice, once as built
and once with every trainable weight multiplied by (1 + 1e-5 N(0, 1)) right after it is built (zeros stay zero, so
LoRA's B and the topo layers' fixed U are untouched). Same data, same batches, same everything else. A method whose
training is chaotic moves by points; a stable one by nothing. Single EfficientNet topo runs had moved by up to 5.6
test points with the matrix-free ascent, whose neurons agree with the dense ascent's to a cosine of 0.9999
(README, round 6).

    python benchmarks/run_sensitivity.py                         # every recipe, 5 seeds (resumable)
    python benchmarks/run_sensitivity.py --recipes effnet_mnist --seeds 0 1

Writes benchmarks/results/run_sensitivity.{md,json}; every run is appended to run_sensitivity_runs.jsonl.
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
from recipes.training import checkpoint_dir, fit  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
METHODS = ("topo", "lora")
SCALE = 1e-5  # relative: about a hundred float32 roundings


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int) -> int:
    """Every trainable weight times (1 + scale * N(0, 1)), drawn from its own seeded generator; returns how many."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            noise = torch.randn(parameter.shape, generator=generator).to(parameter)
            parameter.mul_(1 + scale * noise)
            count += parameter.numel()
    return count


def run_pair(recipe, task, lrs, recipe_args, seed, setup, method) -> dict:
    """The run as built and the run perturbed, from the same split and batches."""
    splits, calibration, steps = seed_data(recipe, task, recipe_args, seed, setup)
    lr = lr_for(method, lrs)
    outcomes = {}
    for kind in ("as_built", "perturbed"):
        model, budget = fresh_model(task, recipe_args, seed, calibration)
        built = build_method(method, model, calibration, budget, steps, seed, task.lora_targets)
        if kind == "perturbed":
            perturb(built.model, SCALE, seed)
        run_dir = checkpoint_dir(os.path.join(ROOT, "outputs"), "sensitivity", recipe, method, kind, seed)
        outcome = fit(built.model, splits, task.collator, lr, seed, setup, run_dir, built.callbacks, head_name(model))
        losses = [row["train_loss"] for row in outcome.curves if "train_loss" in row]
        outcomes[kind] = {
            "validation": outcome.validation, "test": outcome.test.get("accuracy"), "best_epoch": outcome.best_epoch,
            "last_train_loss": losses[-1] if losses else None, "positions": built.positions,
        }  # fmt: skip
    key = run_key(recipe, seed, method)
    return {"key": key, "recipe": recipe, "seed": seed, "method": method, "lr": lr, **outcomes}


def report(recipes: list[str], output_dir: str) -> dict:
    done = load_done(os.path.join(output_dir, "run_sensitivity_runs.jsonl"))
    lines = [
        "# How much a run moves with a rounding-level change of its starting weights",
        "",
        f"Each run twice at the recipe's smallest size and rank: as built, and with every trainable weight multiplied "
        f"by (1 + {SCALE:g} N(0, 1)) before training (zeros stay zero); the same split, batches and everything else. "
        "Cells: mean over seeds of the absolute change in validation accuracy, test accuracy and the last epoch's "
        "training loss, and the largest test change. The seed spread of the frontier (test accuracy's std over "
        "seeds) beside it. Regenerate with `python benchmarks/run_sensitivity.py`.",
        "",
        "| recipe | method | seeds | validation change | test change | largest test change | last training loss "
        "change | test std over seeds (as built) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, dict] = {}
    for recipe in recipes:
        for method in METHODS:
            records = [r for r in done.values() if r["recipe"] == recipe and r["method"] == method]
            if not records:
                continue
            change = {
                key: [abs(r["perturbed"][key] - r["as_built"][key]) for r in records]
                for key in ("validation", "test", "last_train_loss")
            }
            tests = [r["as_built"]["test"] for r in records]
            row = {key: statistics.fmean(values) for key, values in change.items()}
            row |= {"largest_test": max(change["test"]), "seeds": len(records)}
            row["test_std"] = statistics.stdev(tests) if len(tests) > 1 else 0.0
            summary.setdefault(recipe, {})[method] = row
            lines.append(
                f"| {recipe} | {method} | {row['seeds']} | {row['validation']:.3f} | {row['test']:.3f} | "
                f"{row['largest_test']:.3f} | {row['last_train_loss']:.3f} | {row['test_std']:.3f} |"
            )
    with open(os.path.join(output_dir, "run_sensitivity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "run_sensitivity.json"), "w") as f:
        json.dump({"scale": SCALE, "recipes": summary}, f, indent=1)
    print("\n".join(lines))
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "run_sensitivity_runs.jsonl")
    if not args.report_only:
        torch.set_num_threads(args.threads)
        done = load_done(path)
        for recipe, task, lrs, recipe_args, setup in quiet_setups(args.recipes, args):
            for seed in args.seeds:
                for method in args.methods:
                    if run_key(recipe, seed, method) in done:
                        continue
                    record = run_pair(recipe, task, lrs, recipe_args, seed, setup, method)
                    append_record(path, record)
                    a, b = record["as_built"], record["perturbed"]
                    print(f"{recipe} {method} seed {seed}: test {a['test']:.3f} -> {b['test']:.3f}", flush=True)
    return report(args.recipes, args.output_dir)


if __name__ == "__main__":
    main()
