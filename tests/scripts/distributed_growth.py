"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo), or as one plain process:
grows a ResidualMLP inside a DDP wrapper (Accelerate's prepare) while training, each rank on its own half
of every batch, and writes what it ended with to OUT/rank{r}.json (one process: OUT/single.json) for the
test to compare across ranks and with one process on the whole batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn import functional as F

from hf_topoadapt.growth import GrowthConfig, ResidualMLP, grow


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def main(out: Path, mode: str) -> None:
    if mode == "trainer":
        return with_trainer(out)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Each rank holds an equal share of every batch: DDP's mean of per-rank gradients is then the gradient of
    # the whole batch, and the scoring's J (mean over ranks) is the whole-batch loss.
    batches = [(x[rank::world], y[rank::world]) for x, y in data()]
    torch.manual_seed(0)
    model = ResidualMLP(3, 1, width=6, depth=1).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    config = GrowthConfig(schedule=[2], max_insertions=2, calibration_batches=None, seed=0)
    grower, history = grow(wrapped, batches, batches, F.mse_loss, optimizer, None, config, epochs=6)
    record = {
        "rank": rank,
        "world": world,
        "wrapped": type(wrapped).__name__,
        "positions": [e["position"] for e in grower.log if e["accepted"]],
        "eps": [e["eps"] for e in grower.log if e["accepted"]],
        "depth": model.depth,
        "train_losses": [h["train_loss"] for h in history],
        "parameters": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()},
    }
    name = f"rank{rank}.json" if world > 1 else "single.json"
    (out / name).write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    if world > 1:
        torch.distributed.destroy_process_group()


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = (torch.cat(parts) for parts in zip(*data(), strict=True))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i].float(), "labels": self.y[i].float()}


def with_trainer(out: Path) -> None:
    """TopoGrowthCallback inside Trainer.train() under the same launch: the Trainer wraps the model in DDP."""
    from transformers import Trainer, TrainingArguments

    from hf_topoadapt.growth import TopoGrowthCallback

    torch.manual_seed(0)
    model = ResidualMLP(3, 1, width=6, depth=1)
    callback = TopoGrowthCallback(GrowthConfig(schedule=[1], max_insertions=2, calibration_batches=2, seed=0))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=3, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback])
    trainer.train()
    rank = trainer.args.process_index
    record = {
        "rank": rank,
        "world": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "positions": [e["position"] for e in callback.grower.log if e["accepted"]],
        "depth": model.depth,
        "parameters": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()},
    }
    (out / f"trainer{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "loop")
