"""Topo adapters on a timm ViT with a plain PyTorch loop (tuple batches and a loss function).

    python examples/quickstart_timm.py [--pretrained]

Offline the ViT is randomly initialised (no weights ship in a package); with internet, `--pretrained` loads
timm's ImageNet weights. The calibration data here is random images: use a few batches of your own data.
"""

import sys

import timm
import torch
from torch.nn import functional as F

import hf_topoadapt as hta

torch.manual_seed(0)
model = timm.create_model(
    "vit_tiny_patch16_224", pretrained="--pretrained" in sys.argv, num_classes=3, img_size=64
)  # 4 x 4 patches + CLS
images, targets = torch.randn(16, 3, 64, 64), torch.randint(0, 3, (16,))
batches = [(images[:8], targets[:8]), (images[8:], targets[8:])]  # (inputs, targets): model(inputs)

for score in hta.score_positions(model, batches, loss_fn=F.cross_entropy):  # blocks found without arguments
    print(f"{score.name:10s} eigenvalue {score.eigenvalue:.4g}")

config = hta.TopoAdapterConfig(num_adapters=2, neurons=8, modules_to_save=["head"])
model = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=F.cross_entropy)
model.print_trainable_parameters()

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for epoch in range(3):
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
