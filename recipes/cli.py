"""Command-line plumbing every recipe shares: the run_experiment options its arguments set, the settings
recorded with the results, and the end of a run (tables written and printed, how to push the saved model)."""

from __future__ import annotations

import argparse
import os

import torch

from .common import write_results


def experiment_options(args: argparse.Namespace) -> dict:
    """run_experiment's keyword arguments that every recipe's command line sets the same way."""
    return dict(
        batch_size=args.batch_size,
        test_per_class=args.test_per_class or None,
        lora_rank=args.lora_rank,
        num_adapters=args.num_adapters,
        lora_targets=args.lora_targets,
        lrs={"head": args.lr_head, "full": args.lr_full, "peft": args.lr_peft},
        device=args.device,
        results_path=args.runs_file or os.path.join(args.output_dir, "runs.jsonl"),
        resume=args.resume,
    )


def training_settings(args: argparse.Namespace) -> dict:
    """What every recipe records about the training budget next to its results."""
    device = str(args.device)
    return {
        "per_class": args.per_class,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "test_per_class": args.test_per_class or None,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads",
        "optimizer": "AdamW (weight decay 0.01), linear warm-up 10% then linear decay",
        "lrs": {"head": args.lr_head, "full": args.lr_full, "adapter methods": args.lr_peft},
    }


def finish(args: argparse.Namespace, results: list, settings: dict, title: str, **push_help) -> list[dict]:
    """Writes <output-dir>/results.{md,json,png}, prints the table and, with --save-dir, how to push."""
    saver = settings.pop("saver", None)
    rows = write_results(results, os.path.join(args.output_dir, "results"), title, settings)
    with open(os.path.join(args.output_dir, "results.md")) as f:
        print(f.read())
    if saver is not None:
        saver.print_push_help(**push_help)
    return rows
