"""The transfer-learning recipe code path: datasets-based few-shot splits, the shipped evaluate metrics, the matched
parameter budget, training through the transformers Trainer (best epoch chosen on validation, test once, AdaLoRA's
allocation), the command line with local files, saving with a Hub card, and several processes under accelerate
(a BERT built in code with a word-level tokenizer; no downloads)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from huggingface_hub import ModelCard
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
    TrainerCallback,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipes/ is not installed

from recipes import training  # noqa: E402
from recipes.budget import match_budget  # noqa: E402
from recipes.data import DataError, few_shot_splits, text_source, tokenize, with_class_labels  # noqa: E402
from recipes.experiment import Task, calibration_batches, load_runs, run_experiment  # noqa: E402
from recipes.methods import build_method  # noqa: E402
from recipes.metrics import load_metrics  # noqa: E402
from recipes.results import write_results  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WORDS = {
    0: "printer screen laptop keyboard mouse cable driver update",
    1: "president war king river mountain capital ocean century",
    2: "python function loop class variable compile debug recursion",
}
NAMES = ["tech", "history", "code"]


def toy_rows(per_class: int = 12) -> list[dict]:
    rows = []
    for label, words in WORDS.items():
        vocab = words.split()
        for i in range(per_class):
            rows.append({"text": " ".join(vocab[(i + j) % len(vocab)] for j in range(4 + i % 3)), "label": label})
    return rows


def toy_dataset(per_class: int = 12) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=NAMES)})
    return Dataset.from_list(toy_rows(per_class), features=features)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = sorted({w for line in WORDS.values() for w in line.split()})
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def tiny_bert(num_labels: int = 3, layers: int = 2) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, attn_implementation="eager",
    )  # fmt: skip
    return BertForSequenceClassification(config)


def tiny_task(tokenizer, per_class: int = 12) -> Task:
    return Task(
        "tiny",
        toy_dataset(per_class),
        lambda splits: tokenize(splits, tokenizer, 16),
        DataCollatorWithPadding(tokenizer),
        tiny_bert,
        ["query", "value"],
    )


def quiet_setup(**overrides) -> training.TrainingSetup:
    return training.TrainingSetup(**{"epochs": 2, "batch_size": 4, "device": "cpu", "progress": False, **overrides})


# ------------------------------------------------------------------------------------------------ data
def test_few_shot_splits_are_balanced_disjoint_seeded_and_nested():
    rows = [{"x": i, "label": label} for i, label in enumerate([0] * 30 + [1] * 20 + [2] * 12)]
    data = Dataset.from_list(rows, features=Features({"x": Value("int64"), "label": ClassLabel(names=list("abc"))}))
    splits = few_shot_splits(data, per_class=4, seed=0)
    ids = {name: set(split["x"]) for name, split in splits.items()}
    assert [len(ids[n]) for n in ("train", "validation")] == [12, 12]
    assert len(ids["test"]) == 62 - 24 and not (ids["train"] & ids["validation"] or ids["train"] & ids["test"])
    assert not ids["validation"] & ids["test"]
    for name in ("train", "validation"):
        assert np.bincount(splits[name]["label"]).tolist() == [4, 4, 4]
    again = few_shot_splits(data, per_class=4, seed=0)
    assert all(set(again[n]["x"]) == ids[n] for n in ids)
    assert set(few_shot_splits(data, 4, seed=1)["train"]["x"]) != ids["train"]
    capped = few_shot_splits(data, 4, seed=0, validation_per_class=2, test_per_class=5)
    assert np.bincount(capped["test"]["label"]).tolist() == [5, 5, 5] and len(capped["validation"]) == 6
    assert set(capped["train"]["x"]) == ids["train"]
    assert ids["train"] <= set(few_shot_splits(data, 5, seed=0)["train"]["x"])  # nested within a seed
    with pytest.raises(DataError, match="class 'c' has 12 examples: 6 to train and 6 to validate leave none"):
        few_shot_splits(data, 6, seed=0)


def test_text_sources_from_csv_tsv_jsonl_with_class_labels(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,greet\nbye,leave\nhi,greet\n")
    data = text_source(str(tmp_path / "d.csv"))
    assert data["text"] == ["hello", "bye", "hi"] and data["label"] == [0, 1, 0]
    assert data.features["label"].names == ["greet", "leave"]
    (tmp_path / "d.tsv").write_text("sentence\tcategory\nx y\tb\nz\ta\n")
    data = text_source(str(tmp_path / "d.tsv"))
    assert data["text"] == ["x y", "z"] and data.features["label"].names == ["a", "b"] and data["label"] == [1, 0]
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = text_source(str(tmp_path / "d.jsonl"))
    assert data.features["label"].names == ["2", "10"] and data["label"] == [1, 0, 0]  # numbers sort numerically
    (tmp_path / "bad.csv").write_text("words,label\nx,1\n")
    with pytest.raises(DataError, match="needs a 'text' column"):
        text_source(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match="cannot load the Hub dataset 'nobody/nothing'.*Offline, pass a local file"):
        text_source("nobody/nothing")


def test_integer_labels_become_class_labels_in_order():
    data = with_class_labels(Dataset.from_dict({"label": [7, 3, 7, 5]}))
    assert data.features["label"].names == ["3", "5", "7"] and data["label"] == [2, 0, 2, 1]


def test_chatterbot_topics_are_distinct_texts_with_room_for_validation():
    pytest.importorskip("chatterbot_corpus")
    from recipes.minilm_topics import CHATTERBOT_TOPICS, chatterbot_dataset

    data = chatterbot_dataset()
    assert data.features["label"].names == list(CHATTERBOT_TOPICS)
    counts = np.bincount(data["label"]).tolist()
    assert counts == [261, 105, 98, 63]  # distinct conversations per topic
    assert len(set(data["text"])) == len(data)
    splits = few_shot_splits(data, 16, seed=0)  # the largest default size: 16 to train, 16 to validate
    assert min(np.bincount(splits["test"]["label"])) == 63 - 32


# --------------------------------------------------------------------------------------------- metrics
def test_shipped_metrics_load_offline_and_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    predictions, references = [0, 1, 2, 2, 1, 0, 3], [0, 2, 2, 2, 1, 1, 1]
    scores = load_metrics().compute(predictions=predictions, references=references)
    assert scores["accuracy"] == pytest.approx(accuracy_score(references, predictions), abs=1e-15)
    assert scores["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"), abs=1e-15)
    with pytest.raises(ValueError, match="cannot load the metric 'no_such_metric'.*shipped metrics are"):
        load_metrics(["no_such_metric"])


# ----------------------------------------------------------------------------------------------- budget
def test_budget_arithmetic_for_minilm_shapes():
    """all-MiniLM-L6-v2 shapes (hidden 384, 6 layers), random weights: LoRA r=2 on query/value + head is 19,972
    trainable parameters and 3 topo adapters of 16 neurons 20,020."""
    import peft

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    config.num_labels = 4
    model = BertForSequenceClassification(config)
    budget = match_budget(model, lora_rank=2, num_adapters=3, lora_targets=("query", "value"))
    assert (budget.target, budget.topo_neurons, budget.topo_expected) == (19972, 16, 20020)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == budget.target


def tiny_method(tokenizer, method: str):
    """`method` built on the tiny BERT at LoRA r=1 / one adapter, from 2 examples per class of the tiny task:
    (built, budget, task, splits)."""
    task = tiny_task(tokenizer, 5)
    splits = task.preprocess(few_shot_splits(task.source, 2, seed=0))
    batches = calibration_batches(splits["train"], task.collator, 3, 0, "cpu")
    torch.manual_seed(0)
    model = tiny_bert()
    budget = match_budget(model, lora_rank=1, num_adapters=1, lora_targets=("query", "value"), batch=batches[0])
    return build_method(method, model, batches, budget, total_steps=20, seed=0), budget, task, splits


@pytest.mark.parametrize("method", ["lora", "adalora", "topo", "topo_last_blocks", "topo_random_positions"])
def test_matched_methods_within_ten_percent(method, tokenizer):
    built, budget, _, _ = tiny_method(tokenizer, method)
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget)


def test_spend_lever_adds_ranked_positions_until_the_budget_is_spent(tokenizer):
    """One layer of a 32-wide model holds at most 32 neurons, less than LoRA r=8's budget: without `spend` most of it
    is left unspent; the default (`spend` in it) adds the next-ranked position from the same scoring round (the first
    layer unchanged) until the budget is met."""
    from recipes.methods import DEFAULT_LEVERS, lever_off

    assert "spend" in DEFAULT_LEVERS and lever_off("spend") == "topo_no_spend"

    task = tiny_task(tokenizer, 5)
    splits = task.preprocess(few_shot_splits(task.source, 2, seed=0))
    batches = calibration_batches(splits["train"], task.collator, 3, 0, "cpu")
    built = {}
    for name in ("topo_no_spend", "topo"):
        torch.manual_seed(0)
        model = tiny_bert()
        budget = match_budget(model, lora_rank=8, num_adapters=1, lora_targets=("query", "value"), batch=batches[0])
        built[name] = build_method(name, model, batches, budget, total_steps=20, seed=0)
    plain, spent = built.values()
    assert budget.relative_gap(plain.trainable) < -0.3 and len(plain.positions) == 1
    assert abs(budget.relative_gap(spent.trainable)) <= 0.10, (spent.trainable, budget.target)
    assert len(spent.positions) == 2 and spent.positions[0] == plain.positions[0]
    assert "2 positions to spend the budget" in spent.note


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_end_to_end_through_the_trainer(tokenizer, tmp_path):
    """Every run trains with the Trainer, keeps the best validation epoch and reports the test metrics of exactly
    that model (measured again here on the run's test split)."""
    task = tiny_task(tokenizer)
    measured = {}

    @torch.no_grad()
    def measure(result, built):
        splits = task.preprocess(few_shot_splits(task.source, result.per_class, result.seed, test_per_class=5))
        batch = task.collator([splits["test"][i] for i in range(len(splits["test"]))])
        model = built.model.eval()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        measured[result.method, result.per_class] = (logits.argmax(-1) == batch["labels"]).double().mean().item()

    methods = ["head", "lora", "adalora", "topo", "bottleneck_at_topo"]
    results = run_experiment(
        task, methods, per_class=[2, 4], seeds=[0], setup=quiet_setup(epochs=3), test_per_class=5,
        output_dir=str(tmp_path), results_path=str(tmp_path / "runs.jsonl"), after_run=measure, log=lambda _: None,
    )  # fmt: skip
    assert {(r.method, r.per_class) for r in results} == {(m, k) for m in methods for k in (2, 4)}
    by = {(r.method, r.per_class): r for r in results}
    assert by["head", 2].trainable == 32 * 3 + 3 and by["head", 2].budget_gap is None
    for k in (2, 4):
        assert set(by["bottleneck_at_topo", k].positions) == set(by["topo", k].positions)  # same places
        phases = by["topo", k].setup_phases  # where the one-shot setup's time went
        assert set(phases) == {"capture", "eigen_solves", "directions", "line_search"}
        assert 0 < sum(phases.values()) <= by["topo", k].setup_seconds
        assert by["bottleneck_at_topo", k].setup_phases == {} and by["lora", k].setup_phases == {}
    for r in results:
        assert r.accuracy == pytest.approx(measured[r.method, r.per_class], abs=1e-12)  # 15 test texts
        assert r.test_metrics["accuracy"] == r.accuracy and 0 < r.test_metrics["macro_f1"] <= 1
        assert [c["epoch"] for c in r.curves] == [1.0, 2.0, 3.0]
        assert all({"train_loss", "loss", "accuracy", "macro_f1"} <= set(c) for c in r.curves)
        best = max(r.curves, key=lambda c: c["accuracy"])  # the first epoch with the best validation accuracy
        assert (r.best_epoch, r.validation) == (best["epoch"], best["accuracy"])
        assert r.train_seconds_per_epoch > 0 and r.inference_seconds_per_batch > 0
    assert not os.path.exists(tmp_path / "checkpoints")  # the runs' checkpoints are removed
    assert set(load_runs(str(tmp_path / "runs.jsonl"))) == {r.key for r in results}
    rows = write_results(results, str(tmp_path / "out"), "tiny", {"epochs": 3})
    assert len(rows) == 10 and {"out.md", "out.json", "out.png"} <= set(os.listdir(tmp_path))
    assert "| topo | 2 | 1 |" in (tmp_path / "out.md").read_text()


def test_adalora_restores_an_earlier_best_epoch(tokenizer, tmp_path, monkeypatch):
    """AdaLoRA's final allocation cuts ranks; the best checkpoint of an earlier epoch was saved with the ranks of its
    own step and must load (peft would resize to the final pattern and fail)."""
    scores = iter([0.9, 0.5, 0.1, 0.7])  # validation accuracy per epoch (the first is best), then the test's

    def decreasing(names):
        return lambda prediction: {"accuracy": next(scores)}

    monkeypatch.setattr(training, "classification_metrics", decreasing)
    task = tiny_task(tokenizer)
    splits = task.preprocess(few_shot_splits(task.source, 4, seed=0))
    batches = calibration_batches(splits["train"], task.collator, 4, 0, "cpu")
    model = tiny_bert()
    budget = match_budget(model, lora_rank=4, num_adapters=1, lora_targets=("query", "value"), batch=batches[0])
    built = build_method("adalora", model, batches, budget, total_steps=9, seed=0)
    assert built.callbacks, "AdaLoRA needs its allocation callback"
    patterns = []

    class FinalPattern(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            patterns.append(copy.deepcopy(model.peft_config["default"].rank_pattern))

    setup = quiet_setup(epochs=3, metrics=["accuracy"])
    callbacks = [*built.callbacks, FinalPattern()]
    outcome = training.fit(built.model, splits, task.collator, 1e-2, 0, setup, str(tmp_path / "run"), callbacks)
    assert outcome.best_epoch == 1.0 and outcome.validation == 0.9
    assert patterns[2] != patterns[-1] and any(not all(kept) for kept in patterns[-1].values())  # ranks were cut


@pytest.mark.parametrize("method", ["head", "full", "topo"])
def test_the_best_validation_epoch_is_the_model_that_is_tested(method, tokenizer, tmp_path, monkeypatch):
    """BestEpoch puts back exactly the trainable tensors of the best epoch (the second here) before the test."""
    scores = iter([0.2, 0.9, 0.5, 0.7])  # validation accuracy per epoch, then the test's

    monkeypatch.setattr(training, "classification_metrics", lambda names: lambda p: {"accuracy": next(scores)})
    task = tiny_task(tokenizer)
    splits = task.preprocess(few_shot_splits(task.source, 4, seed=0))
    batches = calibration_batches(splits["train"], task.collator, 4, 0, "cpu")
    model = tiny_bert()
    budget = match_budget(model, lora_rank=1, num_adapters=1, lora_targets=("query", "value"), batch=batches[0])
    built = build_method(method, model, batches, budget, total_steps=9, seed=0)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    outcome = training.fit(
        built.model, splits, task.collator, 1e-2, 0, quiet_setup(epochs=3), str(tmp_path), [Snapshot()]
    )
    assert (outcome.best_epoch, outcome.validation, outcome.test["accuracy"]) == (2.0, 0.9, 0.7)
    now = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    assert now.keys() == snapshots[1].keys()
    assert all(torch.equal(now[n], snapshots[1][n]) for n in now)
    assert not all(torch.equal(now[n], snapshots[2][n]) for n in now)  # the last epoch differed


def test_command_line_with_local_model_folder_and_csv_saves_a_hub_folder(tokenizer, tmp_path, capsys):
    """The user path: --model a save_pretrained folder, --data a CSV file with text,label, --save-dir."""
    from recipes.minilm_topics import main

    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = ["text,label"] + [f"{r['text']},{NAMES[r['label']]}" for r in toy_rows(8)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out, save = tmp_path / "out", tmp_path / "saved"
    rows = main(
        ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--per-class", "2",
         "--methods", "head", "topo", "--epochs", "1", "--device", "cpu", "--output-dir", str(out),
         "--save-dir", str(save), "--no-progress"]
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"head", "topo"}
    assert {"results.md", "results.json", "results.png", "runs.jsonl", "model_card.md"} <= set(os.listdir(out))
    files = set(os.listdir(save))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "topo_report.json"} <= files
    assert "tokenizer_config.json" in files
    config = json.loads((save / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "model")
    card = ModelCard.load(save / "README.md")
    # a local base or data file is named in the card's text; the Hub metadata takes only Hub ids
    assert card.data.library_name == "peft" and card.data.base_model is None and card.data.datasets is None
    assert str(tmp_path / "model") in card.text
    result = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert {(e.metric_type, e.metric_value) for e in card.data.eval_results} == {
        (name, round(result["test_metrics"][name], 4)) for name in ("accuracy", "macro_f1")
    }
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text and "num_labels=3" in card.text
    recipe_card = ModelCard.load(out / "model_card.md")
    assert recipe_card.data.eval_results[0].metric_value == round(result["accuracy"], 4)
    assert "| head | 2 |" in recipe_card.text  # every method's results in the body
    printed = capsys.readouterr().out
    assert "hf upload" in printed and "push_to_hub" in printed and "| topo |" in printed
    import hf_topoadapt as hta

    loaded = hta.TopoModel.from_pretrained(tiny_bert(), str(save))
    assert loaded.topo_report.chosen


def test_resume_skips_finished_runs_and_reuses_topo_positions(tokenizer, tmp_path):
    task = tiny_task(tokenizer, 8)
    calls = []

    def factory():
        calls.append(1)
        return tiny_bert()

    task.model_factory = factory
    options = dict(per_class=[2], seeds=[0], setup=quiet_setup(epochs=1), test_per_class=3, log=lambda _: None)
    runs = str(tmp_path / "runs.jsonl")
    first = run_experiment(task, ["head", "topo"], results_path=runs, resume=True, output_dir=str(tmp_path), **options)
    assert len(calls) == 2
    second = run_experiment(
        task, ["head", "topo", "bottleneck_at_topo"], results_path=runs, resume=True, output_dir=str(tmp_path),
        **options,
    )  # fmt: skip
    assert len(calls) == 3  # only bottleneck_at_topo ran
    assert [(r.method, r.accuracy) for r in second[:2]] == [(r.method, r.accuracy) for r in first]  # topo first
    assert set(second[2].positions) == set(first[0].positions)  # topo's positions, read back from the file


def test_unknown_method_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown method.*'lorra'"):
        run_experiment(tiny_task(tokenizer), ["lorra"], [2], [0], quiet_setup())
    budget = match_budget(tiny_bert(), 1, 1, ("query", "value"))
    with pytest.raises(ValueError, match="unknown method"):
        build_method("prefix", tiny_bert(), [], budget, 1, 0)


def test_hub_id_of_the_packaged_minilm_is_its_hub_name_not_a_local_path():
    from recipes.minilm_topics import MINILM_HUB_ID, hub_id, model_path

    assert hub_id("minilm") == MINILM_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("you/encoder") == "you/encoder" == model_path("you/encoder")


def recipe_files(tokenizer, tmp_path) -> list[str]:
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = ["text,label"] + [f"{r['text']},{NAMES[r['label']]}" for r in toy_rows(8)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--per-class", "2"]


def test_bf16_trains_every_method_on_the_cpu(tokenizer, tmp_path):
    """--bf16: the Trainer's bf16 mixed precision (CPU autocast here), topo adapters included."""
    from recipes.minilm_topics import main

    rows = main(
        [*recipe_files(tokenizer, tmp_path), "--methods", "head", "lora", "topo", "--epochs", "1", "--bf16",
         "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"head", "lora", "topo"}
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["curves"][0]["train_loss"]) for r in runs)


def test_accelerate_launch_runs_the_recipe_unchanged_on_two_processes(tokenizer, tmp_path):
    """`accelerate launch -m recipes.minilm_topics`: 2 CPU processes (gloo) train every run together; only the main
    process writes results, and they match the methods asked for."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launch, "-m", "recipes.minilm_topics", *recipe_files(tokenizer, tmp_path)]
    command += ["--methods", "head", "topo", "--epochs", "1", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == ["topo", "head"]  # once each: the second process writes nothing


def test_topo_grown_adds_layers_during_training_up_to_the_budget(tokenizer, tmp_path):
    """topo_grown starts from the head alone and inserts one layer every GROW_EVERY epochs, scored with the trained
    head, until num_adapters layers; the run records where, when, and the time growth took as setup time."""
    from recipes.methods import GROW_EVERY

    task = dataclasses.replace(tiny_task(tokenizer), model_factory=lambda: tiny_bert(layers=3))  # 3 candidates
    (result,) = run_experiment(
        task, ["topo_grown"], per_class=[4], seeds=[0], setup=quiet_setup(epochs=2 * GROW_EVERY + 1), lora_rank=1,
        num_adapters=2, test_per_class=5, output_dir=str(tmp_path), log=lambda _: None,
    )  # fmt: skip
    assert len(result.positions) == 2 and len(set(result.positions)) == 2
    assert f"grown every {GROW_EVERY} epochs: epochs [{GROW_EVERY:.1f}, {2 * GROW_EVERY:.1f}]" in result.note
    assert abs(result.budget_gap) <= 0.10 and result.setup_seconds > 0
    assert len(result.curves) == 2 * GROW_EVERY + 1


def test_grow_every_lever_sets_growths_interval_and_one_shot_methods_refuse_it(tokenizer, tmp_path):
    """`topo_grown+grow_every=1` inserts a layer every epoch (transfer_training.md, round 19); a one-shot method has no
    schedule, so the lever there is an error that says what to name instead, and the interval is a whole number."""
    from recipes.methods import GROWN, grown_variant

    assert grown_variant("topo_grown+grow_every=1") == {**GROWN["topo_grown"], "grow_every": 1}
    with pytest.raises(ValueError, match="whole number"):
        grown_variant("topo_grown+grow_every=0.5")
    with pytest.raises(ValueError, match="topo_grown\\+grow_every=1"):
        tiny_method(tokenizer, "topo+grow_every=1")
    task = dataclasses.replace(tiny_task(tokenizer), model_factory=lambda: tiny_bert(layers=3))
    (result,) = run_experiment(
        task, ["topo_grown+grow_every=1"], per_class=[4], seeds=[0], setup=quiet_setup(epochs=3), lora_rank=1,
        num_adapters=2, test_per_class=5, output_dir=str(tmp_path), log=lambda _: None,
    )  # fmt: skip
    assert "grown every 1 epochs: epochs [1.0, 2.0]" in result.note and len(result.positions) == 2


def test_start_lever_grows_from_one_shot_layers_and_refuses_what_leaves_nothing_to_grow(tokenizer, tmp_path):
    """`topo_grown+start=1` places one layer before training as one-shot topo does, then grows the rest on the
    schedule; the run meets the same budget, start >= the layer count is an error that says what to use, and one-shot
    methods refuse the lever with the name of a grown one."""
    from recipes.methods import GROW_EVERY, grown_variant

    assert grown_variant("topo_grown+start=1")["start_adapters"] == 1
    with pytest.raises(ValueError, match="topo_grown\\+start=1"):
        tiny_method(tokenizer, "topo+start=1")
    task = dataclasses.replace(tiny_task(tokenizer), model_factory=lambda: tiny_bert(layers=3))
    kwargs = dict(per_class=[4], seeds=[0], lora_rank=1, num_adapters=2, test_per_class=5, log=lambda _: None)
    with pytest.raises(ValueError, match="start=2 leaves nothing to grow.*start=1"):
        run_experiment(task, ["topo_grown+start=2"], setup=quiet_setup(epochs=1), output_dir=str(tmp_path), **kwargs)
    (result,) = run_experiment(
        task, ["topo_grown+start=1"], setup=quiet_setup(epochs=GROW_EVERY + 1), output_dir=str(tmp_path / "a"),
        **kwargs,
    )  # fmt: skip
    assert result.note.startswith(f"one-shot layers at ['{result.positions[0]}'], then grown every {GROW_EVERY} epochs")
    assert f"epochs: epochs [{GROW_EVERY:.1f}]" in result.note  # one layer grown, at the first growth epoch
    assert len(result.positions) == 2 and len(set(result.positions)) == 2
    assert abs(result.budget_gap) <= 0.10


def test_topo_paper_is_the_papers_layer_whatever_the_library_defaults(tokenizer):
    """Levers that are off are set explicitly: topo_paper keeps coordinate directions although TopoAdapterConfig's
    default became the chosen lever (optimised directions), and topo follows the chosen levers."""
    import hf_topoadapt as hta
    from recipes.methods import DEFAULT_LEVERS

    directions = {}
    for method in ("topo_paper", "topo"):
        built, *_ = tiny_method(tokenizer, method)
        directions[method] = built.model.peft_config["default"].directions
    assert hta.TopoAdapterConfig().directions == "optimized" and "optimized" in DEFAULT_LEVERS
    assert directions == {"topo_paper": "coordinate", "topo": "optimized"}


def test_value_levers_set_the_step_and_the_adapters_learning_rate(tokenizer, tmp_path):
    """`topo+optimized+step=0.5+adapter_lr=0.2`: the layers take half the line-searched step (the config records
    it) and train at a fifth of the method's rate in their own optimizer group; a bad value names the lever."""
    from recipes.methods import topo_options

    assert topo_options(["optimized", "step=0.5", "adapter_lr=0.2"]) == {
        "include_head": False, "include_embeddings": True, "directions": "optimized", "step_scale": 0.5,
        "optimize_solver": "dense", "score_once": False, "shrink_kernel": False, "adapter_lr_ratio": 0.2,
    }  # fmt: skip
    with pytest.raises(ValueError, match="lever 'step=half' needs a number"):
        topo_options(["step=half"])
    with pytest.raises(ValueError, match=r"unknown lever 'speed=2'.*'step=<number>'"):
        topo_options(["speed=2"])
    built, _, task, splits = tiny_method(tokenizer, "topo+optimized+step=0.5+adapter_lr=0.2")
    assert built.model.peft_config["default"].step_scale == 0.5 and built.adapter_lr_ratio == 0.2
    rates = []

    class Rates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            rates.append([g["lr"] for g in optimizer.param_groups if g["params"]])

    training.fit(
        built.model, splits, task.collator, 1e-2, 0, quiet_setup(epochs=1), str(tmp_path),
        trainer_hook=lambda trainer: trainer.add_callback(Rates()), adapter_lr_ratio=built.adapter_lr_ratio,
    )  # fmt: skip
    assert len(rates[0]) == 4 and max(rates[0]) > 0  # adapters and head, each with and without weight decay
    assert all(max(r) / min(r) == pytest.approx(5.0) for r in rates if min(r) > 0)


def test_budget_adjusted_for_trained_up_directions_and_more_positions():
    """MiniLM shapes: with U trained a neuron costs 2 * 384 + 1, so 3 adapters get 8 neurons; spread over 6
    positions each gets 8 (frozen U); the target and head never change."""
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    config.num_labels = 4
    budget = match_budget(BertForSequenceClassification(config), 2, 3, ("query", "value"))
    assert budget.adjusted() is budget
    up = budget.adjusted(train_up=True)
    assert (up.target, up.head_params, up.num_adapters, up.topo_neurons) == (19972, 1540, 3, 8)
    assert set(up.costs.values()) == {769} and up.expected(list(up.costs)[:3], 8) == 3 * 8 * 769 + 1540
    spread = budget.adjusted(num_adapters=6)
    assert (spread.num_adapters, spread.topo_neurons, set(spread.costs.values())) == (6, 8, {385})


def test_up_and_adapters_levers_change_what_trains_within_the_budget(tokenizer):
    """`topo+optimized+up` trains U as well and still meets the budget; `adapters=N` is a whole number that sets the
    positions the budget spreads over; bad values name the lever."""
    from recipes.methods import topo_options

    assert topo_options(["up", "adapters=2"]) == {
        "include_head": False, "include_embeddings": True, "directions": "coordinate", "step_scale": 1.0,
        "optimize_solver": "dense", "score_once": False, "shrink_kernel": False, "train_up": True,
            "num_adapters": 2,
    }  # fmt: skip
    for bad in ("adapters=1.5", "adapters=0"):
        with pytest.raises(ValueError, match=f"lever '{bad}' needs a whole number >= 1"):
            topo_options([bad])
    built, budget, _, _ = tiny_method(tokenizer, "topo+optimized+up")
    ups = [p for n, p in built.model.named_parameters() if "topo_up" in n]
    assert ups and all(p.requires_grad for p in ups) and built.model.peft_config["default"].train_up
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget)
    built, budget, _, _ = tiny_method(tokenizer, "topo+optimized+adapters=2")
    assert len(built.model.peft_config["default"].adapter_shapes) == 2
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget)


def test_adapters_lever_beyond_the_candidates_spreads_over_all_of_them(tokenizer):
    """The tiny BERT has 3 candidate positions besides the head input: `adapters=9` uses those 3 at the full
    budget instead of sizing 9 adapters' neurons for 3 positions."""
    built, budget, _, _ = tiny_method(tokenizer, "topo+optimized+adapters=9")
    config = built.model.peft_config["default"]
    # all 3 positions are tried (whether each lowers this tiny model's loss, ~1e-4, depends on the machine's rounding)
    assert config.num_adapters == 3 and len({i["position"] for i in built.model.topo_report.insertions}) == 3
    assert config.neurons == budget.adjusted(3, False).request() > budget.adjusted(9, False).request()
    # each position gets the 3-adapter request, or one neuron fewer where trimming meets the budget (whether it must
    # depends on which of the tiny model's insertions lower its loss, which depends on the machine's rounding)
    neurons = [shape["neurons"] for shape in config.adapter_shapes.values()]
    assert all(config.neurons - 1 <= n <= config.neurons for n in neurons), neurons
    assert sum(neurons) > 3 * budget.adjusted(9, False).request()
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget)


def test_head_lr_head_rate_and_no_embeddings_levers(tokenizer, tmp_path, monkeypatch):
    """`head_lr`: the head trains at the recipe's head-only rate and the topo layers at the method's (run_one passes
    the head's as the base rate and the layers' as a ratio of it); `head_rate=R`: the head at R times the method's
    rate; `no_embeddings`: the embedding output never competes."""
    from recipes import experiment
    from recipes.methods import DEFAULT_LRS, topo_options

    assert topo_options(["no_embeddings"])["include_embeddings"] is False
    assert topo_options([])["include_embeddings"] is True  # off: the paper's candidates, whatever the library default
    built, *_ = tiny_method(tokenizer, "topo+optimized+no_embeddings")
    assert "embeddings" not in built.model.peft_config["default"].adapter_shapes
    assert built.model.peft_config["default"].include_embeddings is False
    built, *_ = tiny_method(tokenizer, "topo+optimized+head_lr+adapter_lr=0.5")
    assert built.head_lr == DEFAULT_LRS["head"] and built.adapter_lr_ratio == 0.5
    calls = []

    def recording_fit(model, splits, collator, lr, *args, adapter_lr_ratio=1.0, **kwargs):
        calls.append((lr, adapter_lr_ratio))
        return real_fit(model, splits, collator, lr, *args, adapter_lr_ratio=adapter_lr_ratio, **kwargs)

    real_fit = experiment.fit
    monkeypatch.setattr(experiment, "fit", recording_fit)
    task = tiny_task(tokenizer, 5)
    for method in (
        "topo+optimized+head_lr+adapter_lr=0.5", "topo+optimized+adapter_lr=0.5", "topo+optimized+head_rate=4",
    ):  # fmt: skip
        run_experiment(
            task, [method], [2], [0], quiet_setup(epochs=1), lrs={"head": 0.04, "topo": 0.01},
            lora_rank=1, num_adapters=1, output_dir=str(tmp_path), log=lambda line: None,
        )  # fmt: skip
    # head at 0.04 with the layers at 0.01 * 0.5 = 0.04 * 0.125; without the lever both start from the method's 0.01;
    # head_rate=4: the head at 4 * 0.01, the layers at the method's 0.01 = 0.04 * 0.25
    assert calls == [(0.04, pytest.approx(0.125)), (0.01, 0.5), (pytest.approx(0.04), pytest.approx(0.25))]


def test_the_default_takes_a_tenth_of_the_step_and_its_ablation_and_growth_the_full_one():
    """step=0.1 joined the default (transfer_training.md, round 4): the library's TopoAdapterConfig and the recipes'
    `topo` agree on it; `topo_full_step` switches only it off; `topo_grown` keeps the paper's full step, as measured."""
    import hf_topoadapt as hta
    from recipes.methods import DEFAULT_LEVERS, GROWN, TOPO_VARIANTS, lever_off

    assert "step=0.1" in DEFAULT_LEVERS and lever_off("step=0.1") == "topo_full_step"
    assert TOPO_VARIANTS["topo"]["step_scale"] == hta.TopoAdapterConfig().step_scale == 0.1
    assert TOPO_VARIANTS["topo_full_step"] == {**TOPO_VARIANTS["topo"], "step_scale": 1.0}
    budgeted = ("neuron_budget", "max_neurons", "spend_budget")  # growth sizes its layers itself
    grown_levers = {k: v for k, v in TOPO_VARIANTS["topo_full_step"].items() if k not in budgeted}
    assert GROWN["topo_grown"] == {
        **grown_levers, "optimize_solver": "dense", "score_once": False, "shrink_kernel": False
    }  # fmt: skip
    assert TOPO_VARIANTS["topo_paper"]["step_scale"] == 1.0


def test_the_default_ascent_is_matrix_free_on_wide_positions_and_its_ablation_and_growth_dense():
    """wide_matrix_free joined the default (transfer_training.md, round 6): TopoAdapterConfig and the recipes' `topo`
    agree on optimize_solver="auto"; `topo_formed_matrix` switches only it off; ScoringConfig, the paper's layer and
    `topo_grown` keep the dense ascent their runs were made with."""
    import hf_topoadapt as hta
    from recipes.methods import DEFAULT_LEVERS, GROWN, TOPO_VARIANTS, lever_off

    assert "wide_matrix_free" in DEFAULT_LEVERS and lever_off("wide_matrix_free") == "topo_formed_matrix"
    assert TOPO_VARIANTS["topo"]["optimize_solver"] == hta.TopoAdapterConfig().optimize_solver == "auto"
    assert TOPO_VARIANTS["topo_formed_matrix"] == {**TOPO_VARIANTS["topo"], "optimize_solver": "dense"}
    assert hta.ScoringConfig().optimize_solver == "dense" and TOPO_VARIANTS["topo_paper"]["optimize_solver"] == "dense"
    assert GROWN["topo_grown"]["optimize_solver"] == "dense"
    assert hta.TopoAdapterConfig().scoring_config().optimize_solver == "auto"  # what get_topo_model scores with


def test_grown_methods_take_levers_on_top_of_growths_own():
    """`topo_grown+step=0.1` is growth with a tenth of the step (transfer_training.md, round 5); its other options are
    topo_grown's; a bad lever names itself, and a name that only starts like it is no method."""
    from recipes.methods import GROWN, grown_variant, is_matched, is_method

    assert grown_variant("topo_grown") == GROWN["topo_grown"]
    assert grown_variant("topo_grown+step=0.1") == {**GROWN["topo_grown"], "step_scale": 0.1}
    assert is_method("topo_grown+step=0.1") and is_matched("topo_grown+step=0.1")
    assert grown_variant("topo_grownish") is None and not is_method("topo_grownish")
    with pytest.raises(ValueError, match="unknown lever 'fast'"):
        grown_variant("topo_grown+fast")
