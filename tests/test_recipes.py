"""The transfer-learning recipe code path: few-shot split, the matched parameter budget, data loading and a
tiny end-to-end run (a BERT built in code with a word-level tokenizer; no downloads)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes/ is not installed

from recipes.common import (  # noqa: E402
    batches_of,
    build_method,
    encode,
    few_shot_split,
    match_budget,
    run_experiment,
    text_encoder,
    write_results,
)
from recipes.minilm_topics import CHATTERBOT_TOPICS, load_chatterbot, load_table  # noqa: E402

WORDS = {
    0: "printer screen laptop keyboard mouse cable driver update",
    1: "president war king river mountain capital ocean century",
    2: "python function loop class variable compile debug recursion",
}


def toy_data(per_class: int = 12) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, words in WORDS.items():
        vocab = words.split()
        for i in range(per_class):
            texts.append(" ".join(vocab[(i + j) % len(vocab)] for j in range(4 + i % 3)))
            labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = sorted({w for line in WORDS.values() for w in line.split()})
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def tiny_bert(num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, attn_implementation="eager",
    )  # fmt: skip
    return BertForSequenceClassification(config)


# ------------------------------------------------------------------------------------------------ split
def test_few_shot_split_sizes_disjoint_stratified_seeded():
    labels = [0] * 30 + [1] * 20 + [2] * 12
    train, test = few_shot_split(labels, per_class=4, seed=0)
    assert len(train) == 12 and len(test) == len(labels) - 12
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in train) for c in range(3)] == [4, 4, 4]
    assert few_shot_split(labels, 4, seed=0) == (train, test)
    assert few_shot_split(labels, 4, seed=1)[0] != train

    capped_train, capped_test = few_shot_split(labels, 4, seed=0, test_per_class=5)
    assert capped_train == train
    assert [sum(labels[i] == c for i in capped_test) for c in range(3)] == [5, 5, 5]
    assert set(capped_test) <= set(test)

    bigger, _ = few_shot_split(labels, 8, seed=0)
    assert set(train) <= set(bigger)  # nested training sets within a seed

    with pytest.raises(ValueError, match="class 2"):
        few_shot_split(labels, 12, seed=0)


def test_chatterbot_topics_are_distinct_texts():
    pytest.importorskip("chatterbot_corpus")
    texts, labels, names = load_chatterbot()
    assert names == list(CHATTERBOT_TOPICS)
    counts = [labels.count(i) for i in range(len(names))]
    assert min(counts) >= 60  # enough for 32 training texts per class plus a test set
    assert len(set(texts)) == len(texts)


def test_load_table_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,greet\nbye,leave\nhi,greet\n")
    texts, labels, names = load_table(str(tmp_path / "d.csv"))
    assert texts == ["hello", "bye", "hi"] and labels == [0, 1, 0] and names == ["greet", "leave"]
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts, labels, names = load_table(str(tmp_path / "d.jsonl"))
    assert texts == ["a", "b"] and labels == [1, 0] and names == ["0", "1"]
    (tmp_path / "bad.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError, match="text"):
        load_table(str(tmp_path / "bad.csv"))


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


@pytest.mark.parametrize("method", ["lora", "adalora", "topo", "topo_last_blocks", "topo_random_positions"])
def test_matched_methods_within_ten_percent(method, tokenizer):
    texts, labels = toy_data(4)
    batches = batches_of(encode(tokenizer, texts, labels, 16), 6)
    torch.manual_seed(0)
    model = tiny_bert()
    budget = match_budget(model, lora_rank=1, num_adapters=1, lora_targets=("query", "value"))
    built = build_method(method, model, batches, budget, total_steps=20, seed=0)
    assert abs(budget.relative_gap(built.trainable)) <= 0.10, (built.trainable, budget)


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_end_to_end_head_lora_topo(tokenizer, tmp_path):
    texts, labels = toy_data(12)
    results = run_experiment(
        lambda: tiny_bert(),
        text_encoder(tokenizer, texts, labels, 16),
        labels,
        methods=["head", "lora", "topo", "bottleneck_at_topo"],
        per_class=[2, 4],
        seeds=[0],
        epochs=2,
        batch_size=4,
        test_per_class=5,
        log=lambda _: None,
    )
    assert {(r.method, r.per_class) for r in results} == {
        (m, k) for m in ("head", "lora", "topo", "bottleneck_at_topo") for k in (2, 4)
    }
    by = {(r.method, r.per_class): r for r in results}
    assert by["head", 2].trainable == 32 * 3 + 3
    assert by["head", 2].budget_gap is None
    for k in (2, 4):
        assert set(by["bottleneck_at_topo", k].positions) == set(by["topo", k].positions)  # same places
    for r in results:
        assert 0.0 <= r.accuracy <= 1.0 and r.train_seconds_per_epoch > 0 and r.inference_seconds_per_batch > 0
    rows = write_results(results, str(tmp_path / "out"), "tiny", {"epochs": 2})
    assert len(rows) == 8
    assert {"out.md", "out.json", "out.png"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "out.json").read_text())
    assert len(saved["runs"]) == 8 and saved["settings"] == {"epochs": 2}


def test_command_line_with_local_model_folder_and_csv(tokenizer, tmp_path):
    """The user path: --model a save_pretrained folder, --data a CSV file with text,label."""
    from recipes.minilm_topics import main

    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    texts, labels = toy_data(6)
    lines = ["text,label"] + [f"{t},{['tech', 'history', 'code'][y]}" for t, y in zip(texts, labels, strict=True)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rows = main(
        ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--per-class", "2",
         "--methods", "head", "lora", "--epochs", "1", "--device", "cpu", "--output-dir", str(out)]
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"head", "lora"}
    assert {"results.md", "results.json", "results.png", "runs.jsonl"} <= set(os.listdir(out))
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2


def test_resume_skips_finished_runs_and_reuses_topo_positions(tokenizer, tmp_path):
    texts, labels = toy_data(8)
    calls = []

    def factory():
        calls.append(1)
        return tiny_bert()

    options = dict(per_class=[2], seeds=[0], epochs=1, batch_size=4, test_per_class=3, log=lambda _: None)
    runs = tmp_path / "runs.jsonl"
    encode_fn = text_encoder(tokenizer, texts, labels, 16)
    first = run_experiment(factory, encode_fn, labels, ["head", "topo"], results_path=str(runs), resume=True, **options)
    assert len(calls) == 2 and len(runs.read_text().splitlines()) == 2
    second = run_experiment(
        factory, encode_fn, labels, ["head", "topo", "bottleneck_at_topo"], results_path=str(runs), resume=True,
        **options,
    )  # fmt: skip
    assert len(calls) == 3  # only bottleneck_at_topo ran
    assert [(r.method, r.accuracy) for r in second[:2]] == [(r.method, r.accuracy) for r in first]
    assert set(second[2].positions) == set(first[0].positions)  # read back from the file
    assert len(runs.read_text().splitlines()) == 3


def test_unknown_method_is_a_clear_error(tokenizer):
    texts, labels = toy_data(4)
    with pytest.raises(ValueError, match="unknown method.*'lorra'"):
        run_experiment(lambda: tiny_bert(), text_encoder(tokenizer, texts, labels), labels, ["lorra"], [2], [0], 1)
    budget = match_budget(tiny_bert(), 1, 1, ("query", "value"))
    with pytest.raises(ValueError, match="unknown method"):
        build_method("prefix", tiny_bert(), [], budget, 1, 0)


def test_save_dir_writes_hub_files_and_prints_how_to_push(tokenizer, tmp_path, capsys):
    from recipes.minilm_topics import main

    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    texts, labels = toy_data(6)
    lines = ["text,label"] + [f"{t},{['tech', 'history', 'code'][y]}" for t, y in zip(texts, labels, strict=True)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    save = tmp_path / "saved"
    main(
        ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.csv"), "--per-class", "2",
         "--methods", "head", "topo", "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out"),
         "--save-dir", str(save)]
    )  # fmt: skip
    files = set(os.listdir(save))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "topo_report.json"} <= files
    assert "tokenizer_config.json" in files
    config = json.loads((save / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "model")  # the saver's base_model, as given
    out = capsys.readouterr().out
    assert "hf upload" in out and "push_to_hub" in out and "| topo |" in out
    import hf_topoadapt as hta

    loaded = hta.TopoModel.from_pretrained(tiny_bert(), str(save))
    assert loaded.topo_report.chosen


def test_hub_id_of_the_packaged_minilm_is_its_hub_name_not_a_local_path():
    from recipes.minilm_topics import MINILM_HUB_ID, hub_id, model_path

    assert hub_id("minilm") == MINILM_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("you/encoder") == "you/encoder" == model_path("you/encoder")
