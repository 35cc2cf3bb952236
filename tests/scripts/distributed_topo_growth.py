"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo): grows a head-only TopoModel (a tiny
ViT) inside a DDP wrapper, first in the plain `grow` loop (Accelerate's prepare), then under Trainer.train() with
TopoGrowthCallback, each rank on its own share of the data, and writes what each rank ended with to
OUT/loop{rank}.json and OUT/trainer{rank}.json for the test to compare across ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny models
import models  # noqa: E402

import hf_topoadapt as hta  # noqa: E402
from hf_topoadapt.growth import GrowthConfig, TopoGrowthCallback, grow, head_only_topo_model  # noqa: E402

HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def rows() -> list[dict]:
    return [
        {"pixel_values": b["pixel_values"][i].float(), "labels": b["labels"][i]}
        for b in models._image_batches(0, 4)
        for i in range(len(b["labels"]))
    ]


def start_model() -> hta.TopoModel:
    torch.manual_seed(0)
    base = models.hf_vit(0)[0].float()
    return head_only_topo_model(base, hta.TopoAdapterConfig(modules_to_save=["classifier"], line_search_steps=4))


def record(model, log: list[dict], wrapped, rank: int, world: int, head_at_start: list) -> dict:
    return {
        "rank": rank,
        "world": world,
        "wrapped": type(wrapped).__name__,
        "positions": [e["position"] for e in log if e["accepted"]],
        "eps": [e["eps"] for e in log if e["accepted"]],
        "parameters": {n: p.detach().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad},
        "head_at_start": head_at_start,
        "head": dict(model.named_parameters())[HEAD].detach().flatten().tolist(),
    }


def plain_loop(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    data = rows()
    # Each rank holds an equal share of every batch of 4: the scoring sums its operators across ranks.
    batches = [torch.utils.data.default_collate(data[i : i + 4][rank::world]) for i in range(0, len(data), 4)]
    model = start_model()
    head = dict(model.named_parameters())[HEAD].detach().flatten().tolist()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    config = GrowthConfig(schedule=[1], max_insertions=2, calibration_batches=None)
    grower, _ = grow(wrapped, batches, None, None, optimizer, None, config, epochs=3)
    (out / f"loop{rank}.json").write_text(json.dumps(record(model, grower.log, wrapped, rank, world, head)))


def with_trainer(out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = start_model()
    head = dict(model.named_parameters())[HEAD].detach().flatten().tolist()
    callback = TopoGrowthCallback(GrowthConfig(schedule=[1], max_insertions=2, calibration_batches=2))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows(), callbacks=[callback])
    trainer.train()
    rank, world = trainer.args.process_index, trainer.args.world_size
    result = record(model, callback.grower.log, trainer.model_wrapped, rank, world, head)
    (out / f"trainer{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    plain_loop(Path(sys.argv[1]))
    with_trainer(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()
