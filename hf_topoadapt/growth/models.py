"""Small growable reference models for from-scratch growth experiments (METHOD.md section 7).

Each model is stem -> `blocks` (an nn.ModuleList of residual blocks) -> head. Growth inserts new
`TopoAdapter` layers straight into `blocks`, so a new layer becomes a position of its own and the
grown model is an ordinary module (no hooks). `forward(inputs, labels=None)` returns the prediction,
or a dict-like output with `.loss` when labels are given (the Hugging Face Trainer convention).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import TopoAdapter

TASKS = ("regression", "classification")


class GrowthOutput(dict):
    """A dict with attribute access: `outputs.loss` for scoring, `outputs["loss"]` for the Trainer."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class GrowableModel(nn.Module):
    """Base class: subclasses define `stem`, `blocks` (nn.ModuleList) and `head_forward`."""

    block_path = "blocks"

    def __init__(self, task: str):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(outputs, labels)
        return F.mse_loss(outputs, labels.reshape(outputs.shape).to(outputs.dtype))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None):
        h = self.stem(inputs)
        for block in self.blocks:
            h = block(h)
        outputs = self.head_forward(h)
        if labels is None:
            return outputs
        return GrowthOutput(loss=self.loss(outputs, labels), logits=outputs)

    @property
    def depth(self) -> int:
        return len(self.blocks)


def residual_layer(width: int, layout: str = "vector", kernel_size: int = 3, std: float | None = None) -> TopoAdapter:
    """h + sigma(W h + b) with the admissible activation: a full-rank `TopoAdapter` with U = identity."""
    layer = TopoAdapter(width, width, layout, kernel_size, train_up=True)
    fan_in = layer.down.weight[0].numel()
    with torch.no_grad():
        nn.init.normal_(layer.down.weight, std=std if std is not None else fan_in**-0.5)
        layer.up.copy_(torch.eye(width))
    return layer


class ResidualMLP(GrowableModel):
    """x -> tanh(Linear(x)) -> blocks of h + sigma(W h + b) -> Linear."""

    def __init__(self, in_features: int, out_features: int, width: int = 16, depth: int = 0, task: str = "regression"):
        super().__init__(task)
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.blocks = nn.ModuleList(residual_layer(width) for _ in range(depth))
        self.head = nn.Linear(width, out_features)

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


class ConvBlock(nn.Module):
    """h + conv(gelu(conv(h))), 'same' padding."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.gelu(self.conv1(h)))


class ResidualCNN(GrowableModel):
    """Conv stem -> residual conv blocks -> global average pool -> Linear."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 8, depth: int = 1, task: str = "classification"
    ):
        super().__init__(task)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.GELU())
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(depth))
        self.head = nn.Linear(channels, num_classes)

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h.mean(dim=(2, 3)))


class PatchEmbedding(nn.Module):
    """Patches -> tokens, a CLS token in front and learned positions added."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, width: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(0.02 * torch.randn(1, 1 + (image_size // patch_size) ** 2, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.positions


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallViT(GrowableModel):
    """Patch embedding + CLS + positions -> transformer blocks -> LayerNorm -> Linear on the CLS token."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 8,
        patch_size: int = 4,
        width: int = 16,
        heads: int = 2,
        depth: int = 1,
        task: str = "classification",
    ):
        super().__init__(task)
        self.stem = PatchEmbedding(in_channels, image_size, patch_size, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)[:, 0])
