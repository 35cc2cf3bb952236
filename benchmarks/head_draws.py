"""How much of a seed's position ranking is its new head's random draw: the recipes' default ranks its candidates
under the seed's own head and under K - 1 other draws of it (same examples, same pretrained backbone;
recipes/head_draws.py), and this counts the distinct top threes per seed. The diagnostic behind round 23
(transfer_training.md, the `heads=K` lever).

    python benchmarks/head_draws.py                       # EfficientNet and MiniLM, seeds 0-9, 6 draws
    python benchmarks/head_draws.py --recipes vit_digits --seeds 0 1 2

Writes benchmarks/results/head_draws.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from benchmarks.transfer_lr_grid import SMALLEST, recipe_task  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results")


def top_threes(recipe: str, seeds, draws: int) -> list[dict]:
    import torch

    import hf_topoadapt as hta
    from recipes.data import few_shot_splits
    from recipes.experiment import calibration_batches
    from recipes.head_draws import head_averaged_order
    from recipes.methods import TOPO_VARIANTS, head_name

    _, task, args = recipe_task(recipe, 1)
    options = {k: v for k, v in TOPO_VARIANTS["topo"].items() if k != "spend_budget"}
    rows = []
    for seed in seeds:
        per_class, test = SMALLEST[recipe], args.test_per_class or None
        splits = task.preprocess(few_shot_splits(task.source, per_class, seed, None, test))
        batches = calibration_batches(splits["train"], task.collator, args.batch_size, seed, torch.device("cpu"))
        torch.manual_seed(seed)
        model = task.model_factory()
        head = head_name(model)
        config = hta.TopoAdapterConfig(modules_to_save=[head], seed=seed, **options)
        order, per_draw = head_averaged_order(model, batches, head, config, draws, seed)
        tops = [sorted(values, key=lambda n: -values[n])[:3] for values in per_draw]
        rows.append({"recipe": recipe, "seed": seed, "own": tops[0], "draws": tops, "averaged": order[:3]})
        print(f"{recipe} seed {seed}: {len({tuple(sorted(t)) for t in tops})} distinct top threes", flush=True)
    return rows


def report(rows: list[dict], draws: int) -> str:
    def short(names):
        return ", ".join(n.rsplit(".", 1)[-1] for n in names)

    lines = [
        "# Which positions a seed gets: its examples or its new head's draw",
        "",
        f"The recipes' default ranking of its candidates under the seed's own new head and {draws - 1} other draws of "
        "it (recipes/head_draws.py: every head parameter drawn again from a normal of its own standard deviation), "
        "same examples and pretrained backbone; the top three of each draw (block numbers), how many of the draws' "
        "top threes differ as sets, and the top three of the scores averaged over the draws (each divided by its "
        "draw's best; round 23's `heads=K`). Regenerate with `python benchmarks/head_draws.py`.",
        "",
        "| recipe | seed | own head | distinct top threes | every draw | averaged |",
        "|---|---:|---|---:|---|---|",
    ]
    for row in rows:
        distinct = len({tuple(sorted(t)) for t in row["draws"]})
        every = "; ".join(short(t) for t in row["draws"])
        lines.append(
            f"| {row['recipe']} | {row['seed']} | {short(row['own'])} | {distinct} of {draws} | {every} | "
            f"{short(row['averaged'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["effnet_mnist", "minilm_topics"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--output-dir", default=OUT)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [row for recipe in args.recipes for row in top_threes(recipe, args.seeds, args.draws)]
    text = report(rows, args.draws)
    with open(os.path.join(args.output_dir, "head_draws.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "head_draws.json"), "w") as f:
        json.dump({"draws": args.draws, "rows": rows}, f, indent=1)
    print(text)
    return rows


if __name__ == "__main__":
    main()
