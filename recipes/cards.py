"""What a recipe leaves behind for the Hub: the topo-adapted model of its last topo run saved with
`save_pretrained` (adapter, report, tokenizer or image processor, a card with that run's test results), and a card
for the recipe, `model_cards/<recipe>.md`, with the measured results of every method as a table and the topo
method's mean results as the Hub `model-index`."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard

from .results import markdown_table


@dataclass
class CardInfo:
    """How the Hub should describe a recipe's data and task."""

    task_type: str  # "text-classification" | "image-classification"
    dataset_type: str  # a Hub dataset id where there is one
    dataset_name: str
    base_model: str  # what the saved adapter names as its base (a Hub id, not a local path)


def eval_results(info: CardInfo, metrics: dict[str, float], note: str = "") -> list[EvalResult]:
    return [
        EvalResult(
            task_type=info.task_type,
            dataset_type=info.dataset_type,
            dataset_name=info.dataset_name,
            dataset_split="test",
            metric_type=name,
            metric_value=round(float(value), 4),
            metric_name=f"{name}{note}",
        )
        for name, value in metrics.items()
        if name != "loss" and value is not None and not math.isnan(value)  # metrics, not the test loss
    ]


class TopoSaver:
    """`after_run` hook of `run_experiment`: keeps the last run of `method` (its config, report and base model), and
    with a `save_dir` saves it in Hub format, plus `extra.save_pretrained` (a tokenizer or image processor)."""

    def __init__(self, info: CardInfo, save_dir: str | None = None, extra=None, data: str = "", method: str = "topo"):
        self.info, self.save_dir, self.extra, self.data, self.method = info, save_dir, extra, data, method
        self.saved = None  # the RunResult
        self.config = self.report = self.base = None

    def __call__(self, result, built) -> None:
        if result.method != self.method:
            return
        model = built.model
        config = model.peft_config[model.active_adapter]
        config.base_model_name_or_path = self.info.base_model
        self.saved, self.config, self.report = result, copy.deepcopy(config), model.topo_report
        self.base = model.get_base_model()
        if not self.save_dir:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        model.training_note = (
            f"Trained by `recipes` on {self.data or 'the recipe data'}: {result.per_class} examples per class (as "
            f"many to validate), seed {result.seed}, {result.epochs} epochs with the transformers Trainer (AdamW, "
            f"lr {result.lr:g}, the epoch with the best validation accuracy kept). {result.trainable:,} trainable "
            "parameters (adapters + new head)."
        )
        model.card_results = eval_results(self.info, result.test_metrics, f" (seed {result.seed})")
        model.card_datasets = [self.info.dataset_type]
        model.save_pretrained(self.save_dir)
        if self.extra is not None and hasattr(self.extra, "save_pretrained"):
            self.extra.save_pretrained(self.save_dir)

    def print_push_help(self, repo_hint: str = "your-name/topo-adapter") -> None:
        if self.saved is None or not self.save_dir:
            print(f"no {self.method} run was saved")
            return
        r = self.saved
        print(
            f"\nSaved the {self.method}-adapted model ({r.per_class} per class, seed {r.seed}, test accuracy "
            f"{r.accuracy:.4f}) to {self.save_dir}/ (adapter_config.json, adapter_model.safetensors, README.md, "
            "topo_report.json).\nPush it to the Hugging Face Hub (log in first: `hf auth login`):\n"
            f"  hf upload {repo_hint} {self.save_dir} .\n"
            "or from Python (the card then names the Hub id): see 'How to load' in its README.md, then\n"
            f"  hta.TopoModel.from_pretrained(base, {self.save_dir!r}).push_to_hub({repo_hint!r})"
        )


def write_recipe_card(path: str, saver: TopoSaver, rows: list[dict], settings: dict, recipe: str) -> str | None:
    """model_cards/<recipe>.md: the card of the recipe's topo adapter with the measured results of every method (the
    table) and the topo method's mean test metrics at the smallest size (the model-index). None without a topo run."""
    from hf_topoadapt.cards import render_model_card

    if saver.config is None:
        return None
    smallest = min(r["per_class"] for r in rows)
    topo = next((r for r in rows if r["method"] == saver.method and r["per_class"] == smallest), None)
    metrics = {} if topo is None else {"accuracy": topo["accuracy_mean"], "macro_f1": topo.get("macro_f1_mean")}
    seeds = topo["seeds"] if topo else 0
    note = f" (mean of {seeds} seeds, {smallest} per class)"
    training = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    card = render_model_card(
        saver.config,
        saver.report,
        f"your-name/{recipe}-topo",
        f"Made by `python -m recipes.{recipe}`; settings:\n\n{training}",
        model=saver.base,
        results=eval_results(saver.info, metrics, note),
        results_table=markdown_table(rows),
        datasets=[saver.info.dataset_type],
    )
    ModelCard(card)  # parses, or raises: the metadata must be valid for the Hub
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(card)
    return path
