"""Side-by-side transfer-learning benchmark: the minilm_topics recipe for every method at a matched budget.

    python benchmarks/transfer.py --quick   # < 3 min on 2 CPU cores: 8 per class, seed 0, head/lora/topo
    python benchmarks/transfer.py           # 8 per class, seeds 0 1 2, every method

Writes benchmarks/results/transfer[_quick].{md,json,png}: mean ± std accuracy over seeds, trainable
parameters (and the gap to the matched budget), train seconds per epoch, setup seconds (topo scoring and
insertion), inference seconds per batch of 32, and accuracy against training-set size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")

from recipes.common import DEFAULT_LRS, METHODS, run_experiment, write_results  # noqa: E402
from recipes.minilm_topics import load_data, load_tokenizer, model_factory  # noqa: E402

QUICK = {"per_class": [8], "seeds": [0], "methods": ["head", "lora", "topo"], "epochs": 10, "test_per_class": 25}
FULL = {"per_class": [8], "seeds": [0, 1, 2], "methods": list(METHODS), "epochs": 10, "test_per_class": 100}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-class", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--lr-head", type=float, default=DEFAULT_LRS["head"])
    parser.add_argument("--lr-full", type=float, default=DEFAULT_LRS["full"])
    parser.add_argument("--lr-peft", type=float, default=DEFAULT_LRS["peft"], help="lr of every adapter method")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in plan:
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    texts, labels, names = load_data("chatterbot")
    results = run_experiment(
        model_factory(args.model, len(names)),
        load_tokenizer(args.model),
        texts,
        labels,
        plan["methods"],
        plan["per_class"],
        plan["seeds"],
        plan["epochs"],
        test_per_class=plan["test_per_class"],
        device=device,
        lrs={"head": args.lr_head, "full": args.lr_full, "peft": args.lr_peft},
    )
    elapsed = time.perf_counter() - start
    settings = {
        **plan,
        "recipe": "minilm_topics (all-MiniLM-L6-v2, chatterbot topics trivia/ai/coding/psychology)",
        "classes": {name: labels.count(i) for i, name in enumerate(names)},
        "batch_size": 8,
        "optimizer": "AdamW (weight decay 0.01), linear warm-up 10% then linear decay",
        "lrs": f"head {args.lr_head:g}, full {args.lr_full:g}, every adapter method {args.lr_peft:g} "
        "(best of a grid on seed 0, 8 per class: benchmarks/results/transfer_lr_grid.md; seeds 1, 2 play no part)",
        "budget": "LoRA r=2 on query/value + classifier; 3 topo adapters with neurons matched (16 each)",
        "device": f"CPU, {torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name(),
        "wall_seconds": round(elapsed, 1),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, "transfer_quick" if args.quick else "transfer")
    write_results(results, stem, "Transfer: minilm_topics" + (" (quick)" if args.quick else ""), settings)
    print(open(f"{stem}.md").read())
    print(f"wall time {elapsed:.1f}s")


if __name__ == "__main__":
    main()
