"""`hf-topoadapt score` / `adapt` on causal language modelling: tiny GPT-2 and Llama decoders saved with a
word-level tokenizer trained in the test (no download), calibrated on plain text with labels = inputs."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import calibration_loss, one_line_error, report_losses, table_rows

from hf_topoadapt import ScoringConfig, TopoModel, score_positions
from hf_topoadapt._demo_data import demo_examples
from hf_topoadapt.cli import main
from hf_topoadapt.cli.data import lm_batches, lm_sequences
from hf_topoadapt.cli.models import load_causal_lm

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = demo_examples()[0]


def _tokenizer():
    """A word-level tokenizer with an eos but no pad token (as GPT-2's and Llama's)."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def _save(directory, model_class, config, tokenizer):
    torch.manual_seed(0)
    model_class(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    tokenizer = _tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    return _save(tmp_path_factory.mktemp("tiny_gpt2"), transformers.GPT2LMHeadModel, config, tokenizer)


@pytest.fixture(scope="module")
def tiny_llama_lm(tmp_path_factory):
    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    return _save(tmp_path_factory.mktemp("tiny_llama_lm"), transformers.LlamaForCausalLM, config, tokenizer)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES[:24]) + "\n\n")
    return path


def test_score_plain_text_in_blocks(tiny_gpt2, text_file, tmp_path, capsys):
    out_dir = tmp_path / "score"
    argv = ["score", "--model", tiny_gpt2, "--lm-text-file", str(text_file), "--max-length", "16"]
    code = main(argv + ["--output-dir", str(out_dir)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "GPT2LMHeadModel (causal-lm)" in stdout and "freshly initialised" not in stdout

    model, tokenizer, fresh = load_causal_lm(tiny_gpt2, seed=0)
    assert fresh == [] and tokenizer.pad_token == "[EOS]"  # the pad token comes from eos
    tokens = len(tokenizer(text_file.read_text())["input_ids"])
    sequences, note = lm_sequences(tokenizer, text_file.read_text(), 16, line_by_line=False)
    assert len(sequences) == tokens // 16 and all(len(sequence) == 16 for sequence in sequences)
    assert note == f"the last {tokens % 16} of {tokens} tokens dropped: fewer than --max-length"
    assert f"{len(sequences)} sequences, {-(-len(sequences) // 16)} batches ({note})" in stdout

    rows = table_rows(stdout)
    assert sorted(row[1] for row in rows) == ["embeddings", "transformer.h.0", "transformer.h.1"]
    assert all(row[5] == f"{15 * len(sequences)}/{16 * len(sequences)}" for row in rows)  # no target: last token
    payload = json.loads((out_dir / "scores.json").read_text())
    assert payload["task"] == "causal-lm" and payload["num_examples"] == len(sequences)
    assert payload["num_labels"] is None and payload["label_names"] == [] and payload["max_length"] == 16
    assert f"({len(sequences)} sequences, max length 16, batch size 16)" in (out_dir / "scores.md").read_text()

    batches = lm_batches(model, tokenizer, sequences, 16)
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])
    expected = score_positions(model, batches, ScoringConfig())
    for score, reference in zip(payload["scores"], expected, strict=True):
        assert score["eigenvalue"] == pytest.approx(reference.eigenvalue, rel=1e-9, abs=1e-12)


def test_line_by_line_batches_pad_right_with_ignored_labels(tiny_gpt2):
    model, tokenizer, _ = load_causal_lm(tiny_gpt2, seed=0)
    text = "the cat\n\nthe striker scored twice in the final\nrain\n"
    sequences, note = lm_sequences(tokenizer, text, 6, line_by_line=True)
    assert [len(sequence) for sequence in sequences] == [2, 6] and note == "1 one-token lines skipped"
    batch = lm_batches(model, tokenizer, sequences, 8)[0]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["input_ids"][0, 2:].tolist() == [tokenizer.pad_token_id] * 4
    assert batch["labels"][0].tolist() == sequences[0] + [-100] * 4
    assert batch["labels"][1].tolist() == sequences[1]


def test_adapt_causal_lm_saves_a_loadable_adapter(tiny_gpt2, text_file, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out_dir = tmp_path / "adapted"
    argv = ["adapt", "--model", tiny_gpt2, "--lm-text-file", str(text_file), "--line-by-line"]
    code = main(argv + ["--max-length", "12", "--batch-size", "8", "--output-dir", str(out_dir)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "24 sequences, 3 batches" in stdout and "with the tokenizer" in stdout
    assert f"AutoModelForCausalLM.from_pretrained({tiny_gpt2!r})" in stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"):
        assert (out_dir / name).is_file(), name
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOPO" and saved["task_type"] == "CAUSAL_LM"
    assert saved["modules_to_save"] is None  # the LM head is tied to the embeddings and stays frozen
    assert transformers.AutoTokenizer.from_pretrained(str(out_dir)).pad_token == "[EOS]"

    # Onto a fresh base, through our loader and peft's (which builds a PeftModelForCausalLM from the task
    # type), the adapter gives the calibration loss the report measured after the last insertion.
    model, tokenizer, _ = load_causal_lm(tiny_gpt2, seed=0)
    sequences, _ = lm_sequences(tokenizer, text_file.read_text(), 12, line_by_line=True)
    batches = lm_batches(model, tokenizer, sequences, 8)
    before, after = report_losses(out_dir)
    assert after < before
    loaded = TopoModel.from_pretrained(model, str(out_dir))
    assert calibration_loss(loaded, batches) == pytest.approx(after, rel=1e-6)
    with loaded.disable_adapter():
        assert calibration_loss(loaded, batches) == pytest.approx(before, rel=1e-6)
    through_peft = peft.PeftModel.from_pretrained(load_causal_lm(tiny_gpt2, seed=0)[0], str(out_dir))
    assert type(through_peft).__name__ == "PeftModelForCausalLM"
    assert calibration_loss(through_peft, batches) == pytest.approx(after, rel=1e-6)


def test_causal_lm_task_from_the_model_config(tiny_llama_lm, tmp_path, capsys):
    """No data option: a causal LM is calibrated on the embedded sentences as plain text, one per line."""
    code = main(["score", "--model", tiny_llama_lm, "--line-by-line", "--output-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "LlamaForCausalLM (causal-lm)" in stdout and "64 sequences, 4 batches" in stdout
    assert sorted(row[1] for row in table_rows(stdout)) == ["embeddings", "model.layers.0", "model.layers.1"]


def test_bad_lm_inputs_are_one_line_exit_2(tiny_gpt2, text_file, tmp_path, capsys):
    def run(*extra):
        return main(["score", "--model", tiny_gpt2, "--output-dir", str(tmp_path / "out")] + list(extra))

    one_line_error(capsys, run("--lm-text-file", str(tmp_path / "nope.txt")), "nope.txt", "does not exist")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    one_line_error(capsys, run("--lm-text-file", str(blank)), "holds no text")
    one_word = tmp_path / "one_word.txt"
    one_word.write_text("rain\n")
    one_line_error(capsys, run("--lm-text-file", str(one_word)), "no sequence of two tokens")
    one_line_error(capsys, run("--lm-text-file", str(text_file), "--max-length", "65"), "model's 64 positions")
    one_line_error(capsys, run("--lm-text-file", str(text_file), "--num-labels", "3"), "--num-labels does not apply")
    one_line_error(capsys, run("--split", "test"), "--split does not apply to causal-lm")
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    one_line_error(
        capsys, run("--image-dataset", str(images.parent)), "--image-dataset needs", "give its data with --lm-text-file"
    )
    tsv = tmp_path / "data.tsv"
    tsv.write_text("0\tsome text\n")
    one_line_error(capsys, run("--text-file", str(tsv), "--line-by-line"), "--line-by-line does not apply")
    assert not (tmp_path / "out").exists()
