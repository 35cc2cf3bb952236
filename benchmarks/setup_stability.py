"""Whether a topo setup makes the same choices after a rounding-level change of the pretrained weights: the layers'
positions, their neurons and their steps.

Per recipe at its smallest size and rank, for each topo variant over seeds: the adapters built twice from the same
calibration batches, once on the pretrained model as loaded and once with every weight multiplied by
(1 + 1e-6 N(0, 1)) first (about what another machine's rounding does). No training: the setup alone. Single
EfficientNet runs of the same configuration on two machines had ended 17 validation points apart (seed 4: 0.82 against
0.65) with other positions and neurons, and run_sensitivity.md shows that training itself moves such runs by less.

    python benchmarks/setup_stability.py                                  # every recipe, 5 seeds (resumable)
    python benchmarks/setup_stability.py --recipes effnet_mnist --seeds 0 1

Writes benchmarks/results/setup_stability.{md,json}; every pair of builds is appended to setup_stability_runs.jsonl.
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

from benchmarks.run_sensitivity import perturb  # noqa: E402
from benchmarks.transfer_diagnostics import (  # noqa: E402
    append_record,
    fresh_model,
    load_done,
    quiet_setups,
    run_key,
    seed_data,
)
from benchmarks.transfer_training import ROUND7_BASE, ROUND16_BASE  # noqa: E402
from recipes.methods import build_method  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
# the greedy rule (a scoring round per insertion, the default until round 15) and one scoring round for all layers
METHODS = {"greedy": ROUND7_BASE, "score_once": ROUND16_BASE}
SCALE = 1e-6


def setup_of(built) -> dict:
    """The choices a build made: positions and neurons in insertion order, the steps and the loss they reach."""
    accepted = [i for i in built.model.topo_report.insertions if i["accepted"]]
    shapes = built.model.peft_config[built.model.active_adapter].adapter_shapes
    return {
        "positions": [i["position"] for i in accepted],
        "neurons": [shapes[i["position"]]["neurons"] for i in accepted],
        "eps": [i["eps"] for i in accepted],
        "loss_after": accepted[-1]["loss_after"] if accepted else None,
    }


def build_pair(recipe, task, recipe_args, seed, setup, method: str) -> dict:
    splits, calibration, steps = seed_data(recipe, task, recipe_args, seed, setup)
    builds = {}
    for kind in ("as_loaded", "perturbed"):
        model, budget = fresh_model(task, recipe_args, seed, calibration)
        if kind == "perturbed":
            perturb(model, SCALE, seed)  # before the build every weight still requires grad: perturb reaches all
        built = build_method(METHODS[method], model, calibration, budget, steps, seed, task.lora_targets)
        builds[kind] = setup_of(built)
    return {"key": run_key(recipe, seed, method), "recipe": recipe, "seed": seed, "method": method, **builds}


def compare(record: dict) -> dict:
    """Whether the two builds chose the same positions (as a set), the same neurons at them, and how far their steps
    moved: the largest ratio between the two builds' |eps| at a position both chose."""
    a, b = record["as_loaded"], record["perturbed"]

    def by_position(build: dict, key: str) -> dict:
        return dict(zip(build["positions"], build[key], strict=True))

    same_positions = set(a["positions"]) == set(b["positions"])
    same_neurons = same_positions and by_position(a, "neurons") == by_position(b, "neurons")
    eps_a, eps_b = by_position(a, "eps"), by_position(b, "eps")
    ratios = [
        max(abs(eps_a[p]), abs(eps_b[p])) / min(abs(eps_a[p]), abs(eps_b[p]))
        for p in set(eps_a) & set(eps_b)
        if eps_a[p] and eps_b[p]
    ]
    return {"same_positions": same_positions, "same_neurons": same_neurons, "eps_ratio": max(ratios, default=None)}


def report(recipes: list[str], output_dir: str) -> dict:
    done = load_done(os.path.join(output_dir, "setup_stability_runs.jsonl"))
    lines = [
        "# Whether the setup makes the same choices after a rounding-level change",
        "",
        "Each topo variant built twice at the recipe's smallest size and rank from the same calibration batches: on "
        "the pretrained model as loaded, and with every pretrained weight multiplied by "
        f"(1 + {SCALE:g} N(0, 1)) first. No training. Cells: the seeds whose two builds chose the same positions, "
        "the same positions with the same neurons, and the median and largest ratio between their steps (|eps|) at "
        "a position both chose. "
        f"Variants: {', '.join(f'`{name}` ({method})' for name, method in METHODS.items())}. Regenerate with "
        "`python benchmarks/setup_stability.py`.",
        "",
        "| recipe | variant | seeds | same positions | same neurons | median step ratio | largest step ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, dict] = {}
    for recipe in recipes:
        for method in METHODS:
            records = [r for r in done.values() if r["recipe"] == recipe and r["method"] == method]
            if not records:
                continue
            compared = [compare(r) for r in records]
            ratios = [c["eps_ratio"] for c in compared if c["eps_ratio"] is not None]
            row = {
                "seeds": len(records),
                "same_positions": sum(c["same_positions"] for c in compared),
                "same_neurons": sum(c["same_neurons"] for c in compared),
                "median_eps_ratio": statistics.median(ratios) if ratios else None,
                "largest_eps_ratio": max(ratios, default=None),
            }
            summary.setdefault(recipe, {})[method] = row
            median = "" if row["median_eps_ratio"] is None else f"{row['median_eps_ratio']:.2f}"
            largest = "" if row["largest_eps_ratio"] is None else f"{row['largest_eps_ratio']:.2f}"
            lines.append(
                f"| {recipe} | `{method}` | {row['seeds']} | {row['same_positions']} | {row['same_neurons']} | "
                f"{median} | {largest} |"
            )
    with open(os.path.join(output_dir, "setup_stability.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "setup_stability.json"), "w") as f:
        json.dump({"scale": SCALE, "methods": METHODS, "recipes": summary}, f, indent=1)
    print("\n".join(lines))
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "setup_stability_runs.jsonl")
    if not args.report_only:
        torch.set_num_threads(args.threads)
        done = load_done(path)
        for recipe, task, _, recipe_args, setup in quiet_setups(args.recipes, args):
            for seed in args.seeds:
                for method in args.methods:
                    if run_key(recipe, seed, method) in done:
                        continue
                    record = build_pair(recipe, task, recipe_args, seed, setup, method)
                    append_record(path, record)
                    print(f"{recipe} {method} seed {seed}: {compare(record)}", flush=True)
    return report(args.recipes, args.output_dir)


if __name__ == "__main__":
    main()
