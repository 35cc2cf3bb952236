"""Grow a residual MLP from scratch: a new layer where the topological derivative is largest, every
20 epochs (Proposed I), initialised along the eigenvectors; the optimizer keeps its Adam state.

    python examples/grow_mlp.py
"""

import torch
from torch.nn import functional as F

from hf_topoadapt import growth

torch.manual_seed(0)
x = torch.rand(256, 2) * 2 - 1
y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:])
train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 192, 32)]
val = [(x[192:], y[192:])]

model = growth.ResidualMLP(2, 1, width=16, depth=0).double()  # stem and head only: no blocks yet
train = [(a.double(), b.double()) for a, b in train]
val = [(a.double(), b.double()) for a, b in val]
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
config = growth.GrowthConfig(method="topological", schedule=[20], max_insertions=3, calibration_batches=None)
grower, history = growth.grow(model, train, val, F.mse_loss, optimizer, None, config, epochs=80)

for entry in grower.log:
    print(
        f"epoch {entry['epoch']:>3}: after {entry['position']}, {entry.get('neurons')} neurons, "
        f"loss {entry['loss_before']:.4f} -> {entry['loss_after']:.4f}"
    )
print(f"final depth {model.depth}, val MSE {history[-1]['val_loss']:.4f}")
