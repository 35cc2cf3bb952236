"""Topo scoring and adapters on your own model: name its block list with `block_path`.

python examples/quickstart_custom.py
"""

import torch
from torch import nn
from torch.nn import functional as F

import hf_topoadapt as hta


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class MyNet(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))  # the residual stream
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


torch.manual_seed(0)
x = torch.randn(128, 4)
y = torch.sin(x.sum(1, keepdim=True))
batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
model = MyNet()

scoring = hta.ScoringConfig(block_path="layers")  # positions: after `embed` ("embeddings") and after each block
for score in hta.score_positions(model, batches, scoring, loss_fn=F.mse_loss):
    print(f"{score.name:10s} eigenvalue {score.eigenvalue:.4g}  neurons {len(score.neurons)}")

record = hta.insert_layer(model, batches, scoring, loss_fn=F.mse_loss)  # one layer, in place
print(
    f"inserted after {record.position}: {record.num_neurons} neurons, eps {record.eps:.3g}, "
    f"calibration loss {record.loss_before:.4f} -> {record.loss_after:.4f}"
)

# Or the PEFT-style wrapper: freeze the model, train only the adapters (and `modules_to_save`).
config = hta.TopoAdapterConfig(num_adapters=2, block_path="layers", modules_to_save=["out"])
adapted = hta.get_topo_model(MyNet(), config, calibration_data=batches, loss_fn=F.mse_loss)
adapted.print_trainable_parameters()
