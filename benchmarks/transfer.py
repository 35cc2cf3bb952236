"""Side-by-side transfer-learning benchmark: every recipe x method x training-set size x seed at a matched budget.

    python benchmarks/transfer.py --quick                    # < 3 min on 2 CPU cores: smallest size, seed 0,
                                                             # head/lora/topo, 20 test images per class
    python benchmarks/transfer.py                            # full: every method, 5 seeds (resumable)
    python benchmarks/transfer.py --recipe effnet_mnist      # one recipe
    python benchmarks/transfer.py --frontier                 # accuracy against trainable budget at the smallest
                                                             # size: benchmarks/transfer_frontier.py

Recipes: minilm_topics (all-MiniLM-L6-v2 on chatterbot topics; 8, 16 per class), effnet_mnist (ImageNet
EfficientNet-Lite0 on MNIST; 10, 50 per class), vit_digits (a small ViT pretrained on digits 0-4, transferred
to 5-9; 10, 50 per class).

Writes, per recipe, <output-dir>/transfer_<recipe>[_quick].{md,json,png} (mean ± std accuracy over seeds, trainable
parameters and the gap to the matched budget, train seconds per epoch, setup seconds, inference seconds per
batch, and accuracy against training-set size), and a combined <output-dir>/transfer[_quick].md with one section
per recipe, and (full runs) the recipe's model card model_cards/<recipe>.md. Every finished (method, size, seed) run
is appended to <output-dir>/transfer_<recipe>[_quick]_runs.jsonl as soon as it ends, and a rerun skips the runs
already there, so a full run can be split across sessions (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from recipes.cards import write_recipe_card  # noqa: E402
from recipes.cli import method_name  # noqa: E402
from recipes.methods import TOPO_FAMILY  # noqa: E402
from recipes.results import markdown_table, write_results  # noqa: E402

RECIPES = ("minilm_topics", "effnet_mnist", "vit_digits")
SIZES = {"minilm_topics": [8, 16], "effnet_mnist": [10, 50], "vit_digits": [10, 50]}
# The per-size tables compare the methods a user chooses between; the topo ablations (random positions, random init,
# the classifier's input alone, ...) are measured once, at the smallest size: transfer_frontier.md and
# transfer_diagnostics.md.
FULL = {
    "seeds": [0, 1, 2, 3, 4],
    "methods": ["head", "full", "lora", "adalora", "topo", "topo_paper", "topo_grown"],
    "test_per_class": 100,
}
QUICK = {"seeds": [0], "methods": ["head", "lora", "topo"], "test_per_class": 20}
CARDS = os.path.join(ROOT, "model_cards")
TOPO_ADAPTERS = tuple(m for m in TOPO_FAMILY if m != "bottleneck_at_topo")  # eigen-initialised topo layers
LR_GRIDS = {
    recipe: f"chosen on validation at the smallest size: transfer_lr_grid_{recipe}.md" for recipe in RECIPES
}
DESCRIPTIONS = {
    "minilm_topics": "all-MiniLM-L6-v2 (BERT, 22.7M params), chatterbot topics trivia/ai/coding/psychology; "
    "LoRA r=2 on query/value",
    "effnet_mnist": "ImageNet EfficientNet-Lite0 (4.65M params), MNIST subset at 32 px, 10 classes; "
    "LoRA r=1 on the 1x1 projection convs",
    "vit_digits": "ViT (hidden 64, 4 layers, patch 7) pretrained here on MNIST digits 0-4, transferred to digits 5-9; "
    "LoRA r=2 on q_proj/v_proj",
}


def recipe_module(recipe: str):
    import importlib

    return importlib.import_module(f"recipes.{recipe}")


def recipe_argv(recipe: str, plan: dict, args: argparse.Namespace, runs_file: str) -> list[str]:
    argv = ["--per-class", *map(str, plan["per_class"]), "--seeds", *map(str, plan["seeds"])]
    argv += ["--methods", *plan["methods"], "--test-per-class", str(plan["test_per_class"])]
    argv += ["--output-dir", args.output_dir, "--runs-file", runs_file, "--resume", "--threads", str(args.threads)]
    argv += ["--no-progress"] if args.no_progress else []
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.device:
        argv += ["--device", args.device]
    if recipe == "vit_digits" and args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    return argv


def verdict(rows: list[dict]) -> str:
    """Whether the topo adapters beat the best other method by >= 2 points at the smallest training-set size."""
    if not rows:
        return "no results"
    smallest = min(r["per_class"] for r in rows)
    at = {r["method"]: r["accuracy_mean"] for r in rows if r["per_class"] == smallest}
    topo = {m: a for m, a in at.items() if m in TOPO_ADAPTERS}
    other = {m: a for m, a in at.items() if m not in TOPO_ADAPTERS}
    if not topo or not other:
        return f"at {smallest} per class: needs a topo adapter and another method to compare"
    best_topo, best_other = max(topo, key=topo.get), max(other, key=other.get)
    margin = 100 * (topo[best_topo] - other[best_other])
    answer = "yes" if margin >= 2 else "no"
    return (
        f"At {smallest} per class, do the topo adapters beat the best other method by >= 2 points? **{answer}**: "
        f"{best_topo} {topo[best_topo]:.4f} vs {best_other} {other[best_other]:.4f} ({margin:+.1f} points)."
    )


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, nargs="+", help="override the sizes (every chosen recipe)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", type=method_name)
    parser.add_argument("--epochs", type=int, help="override each recipe's epochs (the same for every method)")
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default min(2, cores))")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", default=None, help="vit_digits: where the pretrained ViT is cached")
    parser.add_argument("--fresh", action="store_true", help="ignore (delete) the runs files of the chosen recipes")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--frontier", action="store_true", help="the accuracy-budget frontier instead of the tables")
    args = parser.parse_args(argv)
    if args.frontier:
        from benchmarks import transfer_frontier

        argv = ["--recipe", args.recipe, "--output-dir", args.output_dir]
        argv += ["--seeds", *map(str, args.seeds)] if args.seeds else []
        return transfer_frontier.main(argv + (["--threads", str(args.threads)] if args.threads else []))
    args.threads = args.threads or min(2, os.cpu_count() or 1)
    os.makedirs(args.output_dir, exist_ok=True)
    recipes = RECIPES if args.recipe == "all" else (args.recipe,)
    suffix = "_quick" if args.quick else ""

    summaries: dict[str, list[dict]] = {}
    walls: dict[str, float] = {}
    for recipe in recipes:
        plan = dict(QUICK if args.quick else FULL)
        plan["per_class"] = SIZES[recipe][:1] if args.quick else SIZES[recipe]
        for key in ("per_class", "seeds", "methods", "test_per_class"):
            if getattr(args, key) is not None:
                plan[key] = getattr(args, key)
        stem = os.path.join(args.output_dir, f"transfer_{recipe}{suffix}")
        runs_file = f"{stem}_runs.jsonl"
        if args.fresh and os.path.exists(runs_file):
            os.remove(runs_file)
        module = recipe_module(recipe)
        print(f"\n=== {recipe}: sizes {plan['per_class']}, seeds {plan['seeds']}, methods {plan['methods']}")
        start = time.perf_counter()
        results, settings, saver = module.run(module.parse_args(recipe_argv(recipe, plan, args, runs_file)))
        walls[recipe] = time.perf_counter() - start
        settings = {"recipe": DESCRIPTIONS[recipe], **settings, "wall_seconds_this_session": round(walls[recipe], 1)}
        settings["runs_file"] = os.path.relpath(runs_file, args.output_dir)
        settings["lr_choice"] = LR_GRIDS[recipe]
        summaries[recipe] = write_results(
            results, stem, f"Transfer: {recipe}{' (quick)' if args.quick else ''}", settings
        )
        print(open(f"{stem}.md").read())
        if not args.quick:  # the recipe's card carries the full run's measured results
            card = write_recipe_card(os.path.join(CARDS, f"{recipe}.md"), saver, summaries[recipe], settings, recipe)
            print(f"model card: {card}")

    for recipe in RECIPES:  # recipes not run this time keep their last results in the combined file
        stem = os.path.join(args.output_dir, f"transfer_{recipe}{suffix}.json")
        if recipe not in summaries and os.path.exists(stem):
            with open(stem) as f:
                summaries[recipe] = json.load(f)["summary"]
    summaries = {recipe: summaries[recipe] for recipe in RECIPES if recipe in summaries}
    combined = os.path.join(args.output_dir, f"transfer{suffix}.md")
    sections = [f"# Transfer learning at a matched trainable-parameter budget{' (quick)' if args.quick else ''}\n"]
    sections.append(
        "Every method trains with the same AdamW schedule and epochs; matched methods (LoRA, AdaLoRA, the topo family) "
        "are within 10% of LoRA's trainable count (column `vs budget`). Per-recipe details, settings and plots: "
        "the linked files. Regenerate with `python benchmarks/transfer.py" + (" --quick" if args.quick else "") + "`.\n"
    )
    for recipe, rows in summaries.items():
        sections.append(f"## {recipe}\n\n{DESCRIPTIONS[recipe]}. Details: [transfer_{recipe}{suffix}.md]"
                        f"(transfer_{recipe}{suffix}.md).\n\n{markdown_table(rows)}\n\n{verdict(rows)}\n\n"
                        f"![accuracy](transfer_{recipe}{suffix}.png)\n")  # fmt: skip
    with open(combined, "w") as f:
        f.write("\n".join(sections))
    with open(os.path.join(args.output_dir, f"transfer{suffix}_summary.json"), "w") as f:
        json.dump({"summary": summaries, "wall_seconds": walls}, f, indent=2)
    print("\n".join(f"{recipe}: {verdict(rows)}" for recipe, rows in summaries.items()))
    print(f"wall time {sum(walls.values()):.1f}s ({', '.join(f'{r} {w:.0f}s' for r, w in walls.items())})")
    return summaries


if __name__ == "__main__":
    main()
