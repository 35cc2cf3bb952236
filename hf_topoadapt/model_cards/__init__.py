"""The model card written by TopoModel.save_pretrained (and so uploaded by push_to_hub)."""

from __future__ import annotations

from importlib import resources

import yaml

TEMPLATE = "topo_adapter.md"


def render_model_card(config, report, adapter_id: str = "path/to/adapter", training: str | None = None) -> str:
    base = config.base_model_name_or_path or "unknown base model"
    metadata = {
        "library_name": "peft",
        "tags": ["hf_topoadapt", "topological-derivative", "peft"],
        "pipeline_tag": None,
    }
    if config.base_model_name_or_path:
        metadata["base_model"] = config.base_model_name_or_path
        metadata["tags"].append(f"base_model:adapter:{config.base_model_name_or_path}")
    metadata = {k: v for k, v in metadata.items() if v is not None}
    tables = report.table().split("\n\n")
    template = resources.files(__package__).joinpath(TEMPLATE).read_text()
    return template.format(
        metadata=yaml.safe_dump(metadata, sort_keys=False).strip(),
        base_model=base,
        num_layers=len(report.chosen) or len(config.target_modules or []),
        topo_version=config.topo_version or "",
        insertions_table=tables[1] if len(tables) > 1 else "(not recorded)",
        scores_table=tables[0] if report.scores else "(not recorded)",
        training=training or "Training data and metrics: not recorded.",
        adapter_id=adapter_id,
        activation=config.activation,
        directions=config.directions,
        eps_s=config.eps_s,
        max_neurons=config.max_neurons,
        train_up=config.train_up,
    )
