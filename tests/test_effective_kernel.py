"""A conv layer on a feature map smaller than its kernel: the taps that read only 'same' padding never get a gradient,
so the library builds the smaller kernel that computes the same (a 1 x 1 conv on a CNN's 1 x 1 last stage), scores it
exactly as before, records it per layer and loads it back."""

from __future__ import annotations

import json
import os
import sys

import peft
import pytest
import torch
import torch.nn.functional as F
from models import ConvBlock
from torch import nn

import hf_topoadapt as hta
from hf_topoadapt.layers import TopoAdapter
from hf_topoadapt.scoring import score_round
from hf_topoadapt.sensitivity.features import effective_kernel, token_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipes/ is not installed
from recipes.budget import neuron_cost  # noqa: E402


class Pool(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1)


class ShrinkingCNN(nn.Module):
    """Two blocks on 4 x 4 maps, then a pool to 1 x 1 and a block there: a CNN's last stage at a small input."""

    def __init__(self, channels: int = 3, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(channels), ConvBlock(channels), Pool(), ConvBlock(channels))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).flatten(1))


def cnn(seed: int = 0, size: int = 4):
    torch.manual_seed(seed)
    model = ShrinkingCNN().double().eval()
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(3, 2, size, size, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
        for _ in range(2)
    ]
    return model, batches


@pytest.mark.parametrize(
    ("kernel", "height", "width", "expected"),
    [(3, 1, 1, 1), (3, 2, 2, 3), (3, 1, 2, 3), (3, 8, 8, 3), (5, 2, 2, 3), (5, 1, 1, 1), (1, 1, 1, 1), (7, 3, 1, 5)],
)
def test_the_kernel_shrinks_only_past_the_maps_extent(kernel, height, width, expected):
    assert effective_kernel(kernel, height, width) == expected


def test_on_a_one_pixel_map_the_three_by_three_patches_are_the_centre_tap_and_padding():
    g = torch.Generator().manual_seed(0)
    state, adjoint = torch.randn(5, 4, 1, 1, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    z3, p3 = token_pairs(state, adjoint, 3)
    z1, p1 = token_pairs(state, adjoint, 1)
    centre = [c * 9 + 4 for c in range(4)]
    assert torch.equal(z3[:, centre], z1[:, :4]) and torch.equal(z3[:, -1], z1[:, -1]) and torch.equal(p3, p1)
    dead = [i for i in range(36) if i not in centre]
    assert torch.count_nonzero(z3[:, dead]) == 0  # so Q's blocks are zero there: the same spectrum, nine times q

    layer = TopoAdapter(4, 2, "channels", 1).double()
    wide = TopoAdapter(4, 2, "channels", 3).double()
    with torch.no_grad():
        layer.down.weight.normal_(generator=g), layer.down.bias.normal_(generator=g), layer.up.normal_(generator=g)
        wide.down.weight.zero_()
        wide.down.weight[:, :, 1, 1] = layer.down.weight[:, :, 0, 0]
        wide.down.bias.copy_(layer.down.bias), wide.up.copy_(layer.up)
    h = state.double()
    assert torch.allclose(layer(h), wide(h), atol=1e-14)


def test_scores_are_those_of_the_full_kernel_and_the_layer_is_the_small_one(tmp_path):
    model, batches = cnn()
    config = hta.TopoAdapterConfig(
        target_modules=["blocks.3"], modules_to_save=["fc"], include_embeddings=False, line_search_steps=4
    )
    scored = score_round(model, batches, config.scoring_config(positions=["blocks.1", "blocks.3"]), F.cross_entropy)
    by_name = {s.name: s for s in scored.scores}
    assert by_name["blocks.1"].kernel_size == 3 and by_name["blocks.1"].num_features == 3 * 9 + 1
    assert by_name["blocks.3"].kernel_size == 1 and by_name["blocks.3"].num_features == 3 + 1
    full = score_round(
        model, batches, hta.ScoringConfig(positions=["blocks.3"], kernel_size=1), F.cross_entropy
    ).scores[0]
    assert by_name["blocks.3"].eigenvalue == pytest.approx(full.eigenvalue, rel=1e-12)

    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=F.cross_entropy)
    shape = topo.peft_config["default"].adapter_shapes["blocks.3"]
    assert shape["kernel_size"] == 1
    downs = [p for n, p in topo.named_parameters() if p.requires_grad and n.endswith("topo_down.default.weight")]
    assert [tuple(p.shape[1:]) for p in downs] == [(3, 1, 1)]  # C * 1 * 1 + 1 per neuron, not C * 9 + 1
    topo.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["adapter_shapes"]["blocks.3"]["kernel_size"] == 1
    expected = torch.cat([topo(x) for x, _ in batches])
    for loader in (hta.TopoModel.from_pretrained, peft.PeftModel.from_pretrained):
        loaded = loader(cnn()[0], str(tmp_path))
        assert torch.equal(torch.cat([loaded(x) for x, _ in batches]), expected), loader


def test_an_adapter_saved_without_a_kernel_per_layer_loads_with_the_configs(tmp_path):
    model, batches = cnn()
    config = hta.TopoAdapterConfig(target_modules=["blocks.1"], modules_to_save=["fc"], line_search_steps=4)
    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=F.cross_entropy)
    topo.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["adapter_shapes"]["blocks.1"]["kernel_size"]  # as written before the kernel was recorded per layer
    path.write_text(json.dumps(saved))
    loaded = hta.TopoModel.from_pretrained(cnn()[0], str(tmp_path))
    assert torch.equal(torch.cat([loaded(x) for x, _ in batches]), torch.cat([topo(x) for x, _ in batches]))


def test_random_rows_on_a_one_pixel_map_get_the_small_kernel_too():
    model, batches = cnn()
    config = hta.TopoAdapterConfig(target_modules=["blocks.3", "blocks.0"], init="random", neurons=2)
    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=F.cross_entropy)
    shapes = topo.peft_config["default"].adapter_shapes
    assert shapes["blocks.3"]["kernel_size"] == 1 and shapes["blocks.0"]["kernel_size"] == 3


def test_calibration_maps_of_two_sizes_at_a_kernel_boundary_are_a_clear_error():
    model, batches = cnn()
    _, larger = cnn(size=8)
    mixed = [batches[0], larger[0]]
    config = hta.ScoringConfig(positions=["blocks.0"])  # 4 x 4 and 8 x 8: both keep 3 x 3, nothing to refuse
    assert score_round(model, mixed, config, F.cross_entropy).scores[0].kernel_size == 3

    class Unpooled(ShrinkingCNN):
        def forward(self, x):  # a 1 x 1 input keeps 1 x 1 maps, a 2 x 2 one 2 x 2 maps
            return self.fc(self.blocks[3](self.blocks[0](self.stem(x))).mean(dim=(2, 3)))

    tiny = Unpooled().double().eval()
    g = torch.Generator().manual_seed(1)
    sizes = [(torch.randn(3, 2, s, s, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])) for s in (1, 2)]
    with pytest.raises(ValueError, match="feature maps of different sizes.*calibrate on images of one size"):
        score_round(tiny, sizes, hta.ScoringConfig(positions=["blocks.0"]), F.cross_entropy)


def test_the_recipes_budget_counts_what_the_library_builds():
    assert neuron_cost(192, True, 3) == 192 * 9 + 1
    assert neuron_cost(192, True, 3, (1, 1)) == 193
    assert neuron_cost(192, True, 3, (2, 2)) == 192 * 9 + 1
    assert neuron_cost(192, False, 3, (1, 1)) == 193


def test_a_bf16_cnn_gets_the_small_kernel_and_trains_it():
    model, batches = cnn()
    model = model.to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    config = hta.TopoAdapterConfig(target_modules=["blocks.3"], modules_to_save=["fc"], line_search_steps=4)
    topo = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=F.cross_entropy)
    assert topo.peft_config["default"].adapter_shapes["blocks.3"]["kernel_size"] == 1
    (down,) = [p for n, p in topo.named_parameters() if n.endswith("topo_down.default.weight")]
    assert tuple(down.shape[2:]) == (1, 1)
    topo.train()
    x, y = batches[0]
    logits = topo(x)
    assert logits.dtype == torch.bfloat16  # the stream keeps the model's dtype, whatever the layer computes in
    F.cross_entropy(logits.float(), y).backward()
    assert down.grad is not None and torch.isfinite(down.grad).all() and down.grad.abs().sum() > 0
