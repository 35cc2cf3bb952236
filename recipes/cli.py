"""Command-line plumbing every recipe shares: the options (the same names in every recipe), the TrainingSetup and
run_experiment arguments they set, the settings recorded with the results, and the end of a run (tables written and
printed, the recipe's model card, how to push the saved model)."""

from __future__ import annotations

import argparse
import os

import torch

from .cards import TopoSaver, write_recipe_card
from .methods import DEFAULT_LRS, LEVERS, METHODS, is_method
from .metrics import DEFAULT_METRICS
from .results import write_results
from .training import TrainingSetup


def method_name(value: str) -> str:
    if not is_method(value):
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}: choose from {', '.join(METHODS)}, or topo+<levers> with levers from "
            f"{', '.join(LEVERS)}"
        )
    return value


def add_common_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--per-class", type=int, nargs="+", default=defaults["per_class"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        type=method_name,
        help=f"any of {', '.join(METHODS)}, or topo+<levers> (levers: {', '.join(LEVERS)}; topo+ for none)",
    )
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--eval-batch-size", type=int, default=defaults.get("eval_batch_size", 64))
    parser.add_argument(
        "--validation-per-class",
        type=int,
        default=None,
        help="validation examples per class, drawn from the training pool (default: as many as --per-class); "
        "checkpoints are chosen on them, never on the test split",
    )
    parser.add_argument("--test-per-class", type=int, default=100, help="cap on test examples per class (0: no cap)")
    parser.add_argument("--lora-rank", type=int, default=defaults["lora_rank"], help="sets the matched budget")
    parser.add_argument("--num-adapters", type=int, default=3, help="topo adapters; neurons are matched to the budget")
    parser.add_argument("--lora-targets", nargs="+", default=defaults["lora_targets"])
    lrs = {**DEFAULT_LRS, **defaults.get("lrs", {})}
    parser.set_defaults(recipe_lrs=lrs)
    parser.add_argument("--lr-head", type=float, default=None, help=f"head-only lr (default {lrs['head']:g})")
    parser.add_argument("--lr-full", type=float, default=None, help=f"full fine-tuning lr (default {lrs['full']:g})")
    parser.add_argument(
        "--lr-peft", type=float, default=None, help="one lr for every adapter method (default: each method's own)"
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="a method's own lr, e.g. lora=0.01 topo=0.03, or at one LoRA rank's budget, e.g. lora@r8=0.003 (the "
        "recipe's defaults were chosen on validation)",
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help="evaluate metrics: the shipped accuracy and macro_f1 (offline), or Hub metric names (online)",
    )
    parser.add_argument("--select-metric", default="accuracy", help="validation metric that picks the checkpoint")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 mixed precision (Trainer's bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="'cpu' or 'cuda' (default: the Trainer's / accelerate's choice)")
    parser.add_argument("--output-dir", default=defaults["output_dir"])
    parser.add_argument(
        "--save-dir",
        default=None,
        help="save the topo-adapted model of the last topo run here in Hub format (adapter_config.json, "
        "adapter_model.safetensors, model card, topo_report.json, tokenizer or image processor)",
    )
    parser.add_argument("--card", default=None, help="write the recipe's model card (results of every method) here")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the runs file")
    parser.add_argument("--runs-file", default=None, help="JSON-lines results file (default <output-dir>/runs.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_lrs(args: argparse.Namespace) -> dict[str, float]:
    """The learning rate of every method: the recipe's (per family and per method, chosen on validation), then the
    family flags, then --lr METHOD=LR."""
    lrs = dict(args.recipe_lrs)
    if args.lr_peft is not None:  # one rate for every adapter method replaces their own ones
        lrs = {k: v for k, v in lrs.items() if k in ("head", "head_warmup", "full")} | {"peft": args.lr_peft}
    for family in ("head", "full"):
        if getattr(args, f"lr_{family}") is not None:
            lrs[family] = getattr(args, f"lr_{family}")
    for item in args.lr:
        method, _, value = item.rpartition("=")  # a method name may hold `lever=value`
        try:
            lrs[method] = float(value)
        except ValueError:
            raise SystemExit(f"--lr takes METHOD=LR pairs, got {item!r}") from None
    return lrs


def training_setup(args: argparse.Namespace) -> TrainingSetup:
    return TrainingSetup(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        select_metric=args.select_metric,
        metrics=args.metric,
        bf16=args.bf16,
        device=args.device,
        progress=not args.no_progress,
    )


def experiment_options(args: argparse.Namespace) -> dict:
    """run_experiment's keyword arguments that every recipe's command line sets the same way."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:  # also the libraries' bars (loading weights, writing checkpoints, dataset maps)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.output_dir, exist_ok=True)
    return dict(
        setup=training_setup(args),
        lrs=recipe_lrs(args),
        lora_rank=args.lora_rank,
        num_adapters=args.num_adapters,
        validation_per_class=args.validation_per_class,
        test_per_class=args.test_per_class or None,
        output_dir=args.output_dir,
        results_path=args.runs_file or os.path.join(args.output_dir, "runs.jsonl"),
        resume=args.resume,
    )


def training_settings(args: argparse.Namespace) -> dict:
    """What every recipe records about the training budget next to its results."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "per_class": args.per_class,
        "validation_per_class": args.validation_per_class or "as many as per_class",
        "seeds": args.seeds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "test_per_class": args.test_per_class or None,
        "device": (
            torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        ),
        "precision": "bf16 mixed" if args.bf16 else "fp32",
        "training": "transformers Trainer: AdamW (weight decay 0.01), linear warm-up 10% then linear decay, evaluation "
        f"on validation every epoch, the epoch with the best validation {args.select_metric} tested once",
        "lrs": recipe_lrs(args),
        "metrics": list(args.metric),
    }


def finish(
    args: argparse.Namespace, results: list, settings: dict, recipe: str, saver: TopoSaver | None, repo_hint: str
) -> list[dict]:
    """Writes <output-dir>/results.{md,json,png} and the recipe's card, prints the table and, with --save-dir, how to
    push. Only the main process writes (under accelerate launch every process runs the same experiment)."""
    from .experiment import main_process

    if not main_process():
        return []
    rows = write_results(results, os.path.join(args.output_dir, "results"), recipe, settings)
    with open(os.path.join(args.output_dir, "results.md")) as f:
        print(f.read())
    if saver is not None:
        path = args.card or os.path.join(args.output_dir, "model_card.md")
        card = write_recipe_card(path, saver, rows, settings, recipe)
        if card:
            print(f"model card with these results: {card}")
        if args.save_dir:
            saver.print_push_help(repo_hint)
    return rows
