"""TopoAdapterConfig.topo_dropout: dropout on each inserted layer's input to D while training (peft's
lora_dropout), never on the residual stream, never while scoring, and kept through save, load and merge."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS
from torch import nn
from torch.nn import functional as F

import hf_topoadapt as hta
from hf_topoadapt.layers import TopoAdapter
from hf_topoadapt.tuner import TopoLayer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(dropout: float):
    model, batches, loss_fn, _, _ = BUILDERS["hf_bert"]()
    config = hta.TopoAdapterConfig(
        num_adapters=2, modules_to_save=["classifier"], line_search_steps=4, topo_dropout=dropout
    )
    return hta.get_topo_model(model, config, calibration_data=batches, loss_fn=loss_fn), batches


def layers(model) -> list[TopoLayer]:
    return [m for m in model.modules() if isinstance(m, TopoLayer)]


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    return torch.cat([model(**batch).logits for batch in batches])


@pytest.fixture(scope="module")
def dropped():
    return build(0.5)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_config_rejects_a_dropout_that_is_not_a_probability(value):
    with pytest.raises(ValueError, match="topo_dropout"):
        hta.TopoAdapterConfig(topo_dropout=value)


def test_scoring_and_eval_do_not_see_the_dropout(dropped):
    """The same layers as without dropout (scoring runs in eval mode) and, in eval mode, the same outputs."""
    model, batches = dropped
    plain, _ = build(0.0)
    assert model.peft_config["default"].adapter_shapes == plain.peft_config["default"].adapter_shapes
    for ours, theirs in zip(layers(model), layers(plain), strict=True):
        assert torch.equal(ours.topo_down["default"].weight, theirs.topo_down["default"].weight)
        assert ours.topo_dropout_p == {"default": 0.5} and theirs.topo_dropout_p == {"default": 0.0}
    model.eval(), plain.eval()
    assert torch.equal(logits(model, batches), logits(plain, batches))


def test_training_drops_the_input_to_d_and_never_the_stream(dropped):
    model, _ = dropped
    layer = layers(model)[0]
    layer.train()
    h = torch.randn(2, 5, layer.width, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer(h)
    torch.manual_seed(3)
    kept = F.dropout(h, 0.5, training=True)
    down, up = layer.topo_down["default"], layer.topo_up["default"]
    expected = h + F.linear(layer.topo_activation["default"](down(kept)), up)
    assert torch.allclose(got, expected, atol=1e-12)
    assert not torch.allclose(got, h + F.linear(layer.topo_activation["default"](down(h)), up))
    layer.eval()


def test_dropout_is_saved_loaded_and_kept_by_merge(dropped, tmp_path):
    model, batches = dropped
    model.save_pretrained(str(tmp_path))
    base, _, _, _, _ = BUILDERS["hf_bert"]()
    loaded = hta.TopoModel.from_pretrained(base, str(tmp_path))
    assert loaded.peft_config["default"].topo_dropout == 0.5
    assert [layer.topo_dropout_p["default"] for layer in layers(loaded)] == [0.5, 0.5]
    loaded.eval(), model.eval()
    assert torch.equal(logits(loaded, batches), logits(model, batches))
    merged = loaded.merge_and_unload()
    plain = [m for m in merged.modules() if isinstance(m, TopoAdapter)]
    assert [adapter.dropout_p for adapter in plain] == [0.5, 0.5]


def test_plain_adapter_without_dropout_is_unchanged():
    adapter = TopoAdapter(4, 2)
    assert adapter.dropout_p == 0.0 and [name for name, _ in adapter.named_children()] == ["activation", "down"]
    assert set(adapter.state_dict()) == {"down.weight", "down.bias", "up"}


def test_a_head_whose_name_ends_like_ours_is_still_the_only_module_to_save():
    """peft wraps every module whose name ends with a modules_to_save entry: no child of a topo layer may end with a
    user's head name (a head called `out` against a child called `topo_dropout`)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            for layer in self.layers:
                x = x + torch.tanh(layer(x))
            return self.out(x)

    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(2)]
    config = hta.TopoAdapterConfig(
        num_adapters=1, block_path="layers", modules_to_save=["out"], topo_dropout=0.1, line_search_steps=4
    )
    model = hta.get_topo_model(Net(), config, calibration_data=batches, loss_fn=F.mse_loss)
    wrapped = [name for name, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert [name.rsplit(".", 1)[-1] for name in wrapped] == ["out"]


def test_recipes_name_the_dropout_as_a_lever():
    from recipes.methods import is_method, topo_options

    assert topo_options(["dropout=0.1"])["topo_dropout"] == 0.1
    assert is_method("topo+no_embeddings+dropout=0.3")
    with pytest.raises(ValueError, match="needs a number"):
        topo_options(["dropout=high"])
