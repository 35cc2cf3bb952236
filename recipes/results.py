"""Result tables and plots: mean and spread over seeds per (method, size, budget), as markdown, JSON and a PNG."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict

from .methods import METHODS


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else math.nan


def _std(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def summarise(results: Sequence) -> list[dict]:
    """One row per (method, per_class, lora_rank): mean and std over seeds of test accuracy and macro-F1, the
    validation score that chose the checkpoint, and the costs."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r.method, r.per_class, getattr(r, "lora_rank", 0)), []).append(r)
    rows = []
    for (method, k, rank), runs in groups.items():
        accuracies = [r.accuracy for r in runs]
        f1 = [r.test_metrics.get("macro_f1") for r in runs if getattr(r, "test_metrics", None)]
        rows.append(
            {
                "method": method,
                "per_class": k,
                "lora_rank": rank,
                "seeds": len(runs),
                "accuracy_mean": _mean(accuracies),
                "accuracy_std": _std(accuracies),
                "macro_f1_mean": _mean(f1),
                "macro_f1_std": _std(f1),
                "validation_mean": _mean(getattr(r, "validation", math.nan) for r in runs),
                "trainable": round(_mean(r.trainable for r in runs)),
                "budget_gap": None if runs[0].budget_gap is None else _mean(r.budget_gap for r in runs),
                "lr": runs[0].lr,
                "train_seconds_per_epoch": _mean(r.train_seconds_per_epoch for r in runs),
                "setup_seconds": _mean(r.setup_seconds for r in runs),
                "inference_seconds_per_batch": _mean(r.inference_seconds_per_batch for r in runs),
            }
        )
    return sorted(rows, key=lambda r: (r["per_class"], r["lora_rank"], method_order(r["method"]), r["method"]))


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| method | per class | seeds | test accuracy (mean ± std) | test macro-F1 | validation | trainable params | "
        "vs budget | lr | train s/epoch | setup s | inference s/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = "" if r["budget_gap"] is None else f"{r['budget_gap']:+.1%}"
        lines.append(
            f"| {r['method']} | {r['per_class']} | {r['seeds']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
            f"{r.get('macro_f1_mean', math.nan):.4f} | {r.get('validation_mean', math.nan):.4f} | {r['trainable']:,} | "
            f"{gap} | {r['lr']:g} | {r['train_seconds_per_epoch']:.2f} | {r['setup_seconds']:.1f} | "
            f"{r['inference_seconds_per_batch']:.3f} |"
        )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict], path: str, title: str) -> None:
    """Test accuracy against training examples per class, one line per method (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}, key=method_order):
        points = sorted((r["per_class"], r["accuracy_mean"], r["accuracy_std"]) for r in rows if r["method"] == method)
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: Sequence, stem: str, title: str, settings: dict) -> list[dict]:
    """stem.json (settings, every run, the summary), stem.md (the table) and stem.png (the plot)."""
    rows = summarise(results)
    with open(f"{stem}.json", "w") as f:
        json.dump({"settings": settings, "summary": rows, "runs": [asdict(r) for r in results]}, f, indent=2)
    settings_text = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    name = stem.split("/")[-1]
    with open(f"{stem}.md", "w") as f:
        f.write(f"# {title}\n\n{settings_text}\n\n{markdown_table(rows)}\n\n![accuracy]({name}.png)\n")
    plot_accuracy(rows, f"{stem}.png", title)
    return rows
