"""Tiny models built in code for the CPU test matrix (float64, eager attention, eval mode), and batches
that fit them. Each builder returns (model, batches, loss_fn, width, layout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEQ, BATCH = 40, 5, 3


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class ResidualMLP(nn.Module):
    """First layer, residual blocks, an MLP head (Linear, SiLU, Linear)."""

    def __init__(self, inputs=3, width=6, depth=3, outputs=2, hidden=5):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, outputs))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class ResidualCNN(nn.Module):
    def __init__(self, in_channels=2, channels=3, depth=2, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ConvBlock(channels) for _ in range(depth)))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def residual_mlp(seed: int = 0, batches: int = 2):
    torch.manual_seed(seed)
    model = ResidualMLP().double().eval()
    g = _generator(seed)
    data = [
        (torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64))
        for _ in range(batches)
    ]
    return model, data, F.mse_loss, 6, "vector"


def residual_cnn(seed: int = 0, batches: int = 2):
    torch.manual_seed(seed)
    model = ResidualCNN().double().eval()
    g = _generator(seed)
    data = [
        (torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
        for _ in range(batches)
    ]
    return model, data, F.cross_entropy, 3, "channels"


def _text_batches(seed: int, causal: bool, batches: int = 2):
    g = _generator(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ids if causal else torch.randint(0, 3, (BATCH,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def hf_bert(seed: int = 0, width: int = 8):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * width,
        num_labels=3,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).double().eval(), _text_batches(seed, False), None, width, "tokens"


def hf_gpt2(seed: int = 0, width: int = 8):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=width,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).double().eval(), _text_batches(seed, True), None, width, "tokens"


def hf_llama(seed: int = 0, width: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * width,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).double().eval(), _text_batches(seed, True), None, width, "tokens"


def _image_batches(seed: int, batches: int = 2):
    g = _generator(seed)
    return [
        {
            "pixel_values": torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 3, (BATCH,), generator=g),
        }
        for _ in range(batches)
    ]


def hf_vit(seed: int = 0, width: int = 8):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * width,
        image_size=8,
        patch_size=4,
        num_labels=3,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config).double().eval(), _image_batches(seed), None, width, "tokens"


def timm_vit(seed: int = 0, width: int = 8):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=4,
        embed_dim=width,
        depth=2,
        num_heads=2,
        num_classes=3,
    )
    for block in model.blocks:
        block.attn.fused_attn = False  # double backward for the reference Hessian needs eager attention
    data = [(b["pixel_values"], b["labels"]) for b in _image_batches(seed)]
    return model.double().eval(), data, F.cross_entropy, width, "tokens"


BUILDERS = {
    "residual_mlp": residual_mlp,
    "residual_cnn": residual_cnn,
    "hf_vit": hf_vit,
    "hf_bert": hf_bert,
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
    "timm_vit": timm_vit,
}
