"""The model card of a saved topo adapter (written by TopoModel.save_pretrained, uploaded by push_to_hub): Hub
metadata through huggingface_hub's `ModelCardData` (base_model, library_name: peft, datasets, metrics and a
`model-index` from `EvalResult`s when results are known), the body from the template in the top-level
`model_cards/` folder, shipped in the wheel as the package `hf_topoadapt.card_templates`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

TEMPLATE = "topo_adapter_template.md"
TAGS = ["hf_topoadapt", "topological-derivative", "peft"]
# Head class name suffix -> (the transformers auto class that rebuilds it, its pipeline tag)
AUTO_CLASSES = {
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForImageClassification": ("AutoModelForImageClassification", "image-classification"),
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
}
CLASSIFICATION = ("ForSequenceClassification", "ForImageClassification", "ForTokenClassification")


def template_text() -> str:
    return resources.files("hf_topoadapt.card_templates").joinpath(TEMPLATE).read_text(encoding="utf-8")


def auto_class(model: nn.Module | None) -> tuple[str | None, str | None, str]:
    """(auto class, pipeline tag, extra from_pretrained arguments) that rebuild `model`'s architecture and head."""
    name = type(model).__name__ if model is not None else ""
    for suffix, (auto, pipeline) in AUTO_CLASSES.items():
        if name.endswith(suffix):
            config = getattr(model, "config", None)
            labels = getattr(config, "num_labels", None)
            extra = f", num_labels={labels}" if suffix in CLASSIFICATION and labels is not None else ""
            return auto, pipeline, extra
    return None, None, ""


def hub_model_id(name: str | None) -> str | None:
    """`name` when it can be a Hub id; None for a local file or folder (the Hub rejects a path in the metadata)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name) or name.count("/") > 1:
        return None
    return name


def load_base_snippet(base_model: str, model: nn.Module | None) -> str:
    auto, _, extra = auto_class(model)
    if auto is not None:
        return f'from transformers import {auto}\n\nbase = {auto}.from_pretrained("{base_model}"{extra})'
    kind = type(model).__name__ if model is not None else "base model"
    return f"base = ...  # the {kind} the adapter was trained on ({base_model}), with the same head"


def render_model_card(
    config,
    report,
    adapter_id: str = "path/to/adapter",
    training: str | None = None,
    *,
    model: nn.Module | None = None,
    results: Sequence[EvalResult] | None = None,
    results_table: str | None = None,
    datasets: Sequence[str] | None = None,
    subfolder: str | None = None,
) -> str:
    """The README.md of a saved adapter.

    Args:
        config: its TopoAdapterConfig.
        report: its TopoReport.
        adapter_id: the Hub id or path people load it from.
        training: a markdown paragraph on the training data and settings.
        model: the base model (its class and number of labels make the "How to load" snippet).
        results: measured results, written as the Hub `model-index`.
        results_table: a markdown table of results for the body.
        datasets: Hub dataset ids it was trained on.
        subfolder: the adapter's subfolder inside the repo (adapters other than "default").
    """
    base = config.base_model_name_or_path or "unknown base model"
    hub_base = hub_model_id(config.base_model_name_or_path)
    _, pipeline, _ = auto_class(model)
    tags = list(TAGS)
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")
    metrics = sorted({r.metric_type for r in results or []}) or None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag=pipeline,
        tags=tags,
        datasets=[d for d in datasets or [] if hub_model_id(d) and not os.path.exists(d)] or None,  # Hub ids only
        metrics=metrics,
        model_name=adapter_id.rstrip("/").split("/")[-1] if results else None,
        eval_results=list(results) if results else None,
    )

    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        base_model=base,
        num_layers=len(report.chosen) or len(config.target_modules or []),
        topo_version=config.topo_version or "",
        insertions_table=report.insertions_table() if report.insertions else "(not recorded)",
        scores_table="\n\n".join(filter(None, (report.warmup_line(), report.scores_table())))
        if report.scores
        else "(not recorded)",
        training=training or "Training data and metrics: not recorded.",
        results_table=results_table or "",
        load_base=load_base_snippet(base, model),
        adapter_id=adapter_id,
        subfolder=f', subfolder="{subfolder}"' if subfolder else "",
        activation=config.activation,
        directions=config.directions,
        eps_s=config.eps_s,
        max_neurons=config.max_neurons,
        train_up=config.train_up,
    )
    return str(card)
