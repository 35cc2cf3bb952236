"""Growth on a CUDA device: new layers, optimizer state, checkpoints and the Trainer stay on the GPU.
Skipped without CUDA (run it on the lent GPU machine: `python -m pytest tests/test_growth_cuda.py`)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from hf_topoadapt.growth import (
    Grower,
    ResidualCNN,
    ResidualMLP,
    SmallViT,
    TopoGrowthCallback,
    grow,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x[:, :1] * x[:, 1:2]
    return x, y, [(x[i : i + 16].to(device), y[i : i + 16].to(device)) for i in range(0, 64, 16)]


@pytest.mark.parametrize("method", ["topological", "sensli", "random", "net2deeper", "td_random"])
def test_grow_and_resume_on_cuda(method, tmp_path):
    device = torch.device("cuda")
    x, _, batches = data(device)
    config = {"method": method, "schedule": [2]}
    torch.manual_seed(0)
    model = ResidualMLP(4, 1, width=16, depth=0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    grower, _ = grow(model, batches, batches[:1], F.mse_loss, optimizer, None, config, epochs=7)
    assert model.depth == 3 and {p.device.type for p in model.parameters()} == {"cuda"}
    assert all(s["exp_avg"].device.type == "cuda" for s in optimizer.state.values())
    save_checkpoint(tmp_path / "run.pt", model, optimizer, None, grower)
    torch.manual_seed(1)
    fresh = ResidualMLP(4, 1, width=16, depth=0).to(device)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), 1e-2)
    load_checkpoint(tmp_path / "run.pt", fresh, fresh_optimizer, None, Grower(fresh, config, F.mse_loss))
    assert torch.equal(fresh(x.to(device)), model(x.to(device)))


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_cnn_and_vit_grow_on_cuda(kind):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = (ResidualCNN(1, 3, channels=8) if kind == "cnn" else SmallViT(1, 3)).to(device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g).to(device), torch.randint(0, 3, (32,), generator=g).to(device)
    entry = Grower(model, {"schedule": [1]}, F.cross_entropy).maybe_grow(1, calibration_data=[(x, y)])
    assert entry["accepted"] and entry["loss_after"] < entry["loss_before"]
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_trainer_callback_on_cuda(tmp_path):
    from transformers import Trainer, TrainingArguments

    x, y, _ = data("cpu")

    class Pairs(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"inputs": x[i], "labels": y[i]}

    torch.manual_seed(0)
    model = ResidualMLP(4, 1, width=16, depth=1)
    callback = TopoGrowthCallback({"schedule": [1], "max_insertions": 2, "calibration_batches": 2})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        learning_rate=1e-2,
    )
    Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback]).train()
    assert model.depth == 3 and {p.device.type for p in model.parameters()} == {"cuda"}
