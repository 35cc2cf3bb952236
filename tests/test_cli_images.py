"""`hf-topoadapt score` / `adapt` on image classification: a tiny ViT saved with its image processor and a tiny
image folder of PNGs (3 classes x 4 images) written in the test, loaded through datasets' imagefolder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import calibration_loss, one_line_error, report_losses, table_rows

from hf_topoadapt import ScoringConfig, TopoModel, score_positions
from hf_topoadapt.cli import main
from hf_topoadapt.cli.data import image_batches, load_image_dataset
from hf_topoadapt.cli.models import load_image_classifier

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A 2-label ViT: the 3 classes of the data then need a fresh head, as when adapting a pretrained model."""
    directory = tmp_path_factory.mktemp("tiny_vit")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).eval().save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return str(directory)


def _write_images(folder, classes, per_class=4, seed=0):
    generator = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for image in range(per_class):
            # 40 px so that the processor resizes to the model's 32; each class has its own mean colour
            pixels = generator.integers(0, 128, size=(40, 40, 3)) + 40 * index
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{image}.png")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("images"), CLASSES)


@pytest.fixture
def cache(tmp_path):
    """datasets caches the prepared folder; keep it out of the user's cache."""
    return ["--cache-dir", str(tmp_path / "cache")]


def _block_names(rows) -> list[str]:
    return sorted(row[1] for row in rows)


def test_score_image_folder(tiny_vit, image_folder, tmp_path, cache, capsys):
    out_dir = tmp_path / "score"
    code = main(
        ["score", "--model", tiny_vit, "--image-dataset", str(image_folder), "--output-dir", str(out_dir)] + cache
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "ViTForImageClassification (image-classification)" in stdout
    assert "12 images, 3 labels, 1 batches" in stdout and "freshly initialised" in stdout

    rows = table_rows(stdout)
    names = _block_names(rows)  # sorted: embeddings, head_input (the classifier input), the blocks
    assert names[:2] == ["embeddings", "head_input"] and len(names) == 4
    assert all(name.rsplit(".", 1)[0] in ("vit.layers", "vit.encoder.layer") for name in names[2:])
    assert rows[0][-2:] == ["<-", "best"] and all(row[6] == "exact" for row in rows)

    payload = json.loads((out_dir / "scores.json").read_text())
    assert payload["task"] == "image-classification" and payload["model_class"] == "ViTForImageClassification"
    assert payload["num_examples"] == 12 and payload["num_labels"] == 3
    assert payload["label_names"] == list(CLASSES) and payload["fresh_head"] is True
    assert payload["max_length"] is None and payload["data"] == f"{image_folder} (train split)"
    assert "(12 images, 3 labels, batch size 16)" in (out_dir / "scores.md").read_text()

    # The numbers are those of the Python API on the model's own image processor and the same batches.
    images = load_image_dataset(str(image_folder), cache_dir=cache[1])
    model, processor, fresh = load_image_classifier(tiny_vit, 3, seed=0, label_names=images.names)
    assert fresh == ["classifier.bias", "classifier.weight"] and model.config.id2label[2] == "fox"
    batches = image_batches(model, processor, images, 16)
    assert batches[0]["pixel_values"].shape == (12, 3, 32, 32)
    assert sorted(batches[0]["labels"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    expected = score_positions(model, batches, ScoringConfig())
    for score, reference in zip(payload["scores"], expected, strict=True):
        assert score["name"] == reference.name
        assert score["eigenvalue"] == pytest.approx(reference.eigenvalue, rel=1e-9, abs=1e-12)


def test_adapt_image_folder_saves_a_loadable_adapter(tiny_vit, image_folder, tmp_path, cache, capsys):
    out_dir = tmp_path / "adapted"
    argv = ["adapt", "--model", tiny_vit, "--image-dataset", str(image_folder), "--output-dir", str(out_dir)]
    code = main(argv + ["--batch-size", "6"] + cache)
    stdout = capsys.readouterr().out
    assert code == 0
    assert "trainable params:" in stdout and "with the image processor" in stdout
    assert "AutoModelForImageClassification.from_pretrained(" in stdout and "num_labels=3" in stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "preprocessor_config.json"):
        assert (out_dir / name).is_file(), name
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOPO" and saved["task_type"] is None  # peft has no image task type
    assert saved["modules_to_save"] == ["classifier"] and saved["base_model_name_or_path"] == tiny_vit
    assert 1 <= len(saved["target_modules"]) <= 2
    assert isinstance(transformers.AutoImageProcessor.from_pretrained(str(out_dir)), transformers.ViTImageProcessor)

    # Onto a fresh base (its own fresh head: the saved classifier replaces it), the loaded adapter gives the
    # calibration loss the report measured after the last insertion; disabled, the loss before the first.
    images = load_image_dataset(str(image_folder), cache_dir=cache[1])
    base, processor, _ = load_image_classifier(tiny_vit, 3, seed=0, label_names=images.names)
    batches = image_batches(base, processor, images, 6)
    loaded = TopoModel.from_pretrained(base, str(out_dir))
    assert loaded.topo_report.chosen == saved["target_modules"]
    before, after = report_losses(out_dir)
    assert after < before
    assert calibration_loss(loaded, batches) == pytest.approx(after, rel=1e-6)
    with loaded.disable_adapter():
        assert calibration_loss(loaded, batches) == pytest.approx(before, rel=1e-6)


def test_image_subset_columns_and_split(tiny_vit, image_folder, tmp_path, cache, capsys):
    argv = ["score", "--model", tiny_vit, "--image-dataset", str(image_folder), "--output-dir", str(tmp_path)]
    options = ["--split", "train", "--image-column", "image", "--label-column", "label", "--max-examples", "7"]
    code = main(argv + options + ["--batch-size", "4"] + cache)
    stdout = capsys.readouterr().out
    assert code == 0
    assert "7 images, 3 labels, 2 batches" in stdout
    payload = json.loads((tmp_path / "scores.json").read_text())
    assert payload["num_examples"] == 7 and payload["num_labels"] == 3

    # A folder with train/ and test/ splits: --split picks one.
    splits = tmp_path / "splits"
    _write_images(splits / "train", ("a", "b"), per_class=2)
    _write_images(splits / "test", ("a", "b"), per_class=1, seed=1)
    code = main(["score", "--model", tiny_vit, "--image-dataset", str(splits), "--split", "test"] + cache)
    assert code == 0, capsys.readouterr().err
    assert "2 images, 2 labels" in capsys.readouterr().out


def test_bad_image_folders_are_one_line_exit_2(tiny_vit, image_folder, tmp_path, cache, capsys):
    def run(*extra):
        return main(["score", "--model", tiny_vit, "--output-dir", str(tmp_path / "out")] + list(extra) + cache)

    one_line_error(capsys, run("--image-dataset", str(tmp_path / "missing")), "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, run("--image-dataset", str(tmp_path / "empty")), "holds no images")
    one_class = _write_images(tmp_path / "one", ("cat",))
    one_line_error(capsys, run("--image-dataset", str(one_class)), "one class only", "at least 2 classes")
    afile = tmp_path / "images.zip"
    afile.write_bytes(b"")
    one_line_error(capsys, run("--image-dataset", str(afile)), "is a file")
    one_line_error(capsys, run("--image-dataset", str(image_folder), "--split", "validation"), "Unknown split")
    one_line_error(capsys, run("--image-dataset", str(image_folder), "--label-column", "klass"), "no such column")
    one_line_error(
        capsys, run("--image-dataset", str(image_folder), "--num-labels", "2"), "--num-labels 2 is too small"
    )
    one_line_error(
        capsys, run("--image-dataset", str(image_folder), "--max-length", "8"), "--max-length does not apply"
    )
    one_line_error(capsys, run(), "is an image classifier", "--image-dataset")
    tsv = tmp_path / "data.tsv"
    tsv.write_text("0\tsome text\n1\tmore text\n")
    one_line_error(capsys, run("--text-file", str(tsv)), "--text-file needs", "give its data with --image-dataset")
    assert not (tmp_path / "out").exists()


def test_image_data_for_a_text_model_is_one_line_exit_2(image_folder, tmp_path, cache, capsys):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    code = main(["score", "--model", str(tmp_path / "bert"), "--image-dataset", str(image_folder)] + cache)
    one_line_error(capsys, code, "--image-dataset needs a model AutoModelForImageClassification can load", "bert")


def test_model_without_image_processor_is_one_line_exit_2(image_folder, tmp_path, cache, capsys):
    config = transformers.ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=16, patch_size=8
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    capsys.readouterr()
    code = main(["score", "--model", str(tmp_path / "vit"), "--image-dataset", str(image_folder)] + cache)
    one_line_error(capsys, code, "holds no image processor", "preprocessor_config.json")


@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="a hub lookup takes long to fail online")
def test_hub_dataset_offline_is_one_line_exit_2(tiny_vit, cache, capsys):
    code = main(["score", "--model", tiny_vit, "--image-dataset", "no-such-org/no-such-images-hf-topoadapt"] + cache)
    one_line_error(capsys, code, "cannot load image dataset", "not found on the Hugging Face Hub", "OFFLINE=1")
