"""Contracts users rely on: several adapters on one model (each with its own report, card and folder), a
task_type='CAUSAL_LM' TopoModel generating with and without the KV cache and after a reload, resuming training from a
Trainer checkpoint, and every numeric setting of the configs validated with a message naming it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings

import peft
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from models import BUILDERS

import hf_topoadapt as hta
from hf_topoadapt import persistence
from hf_topoadapt.config import _TopoAdapterFields
from hf_topoadapt.growth import GrowthConfig
from hf_topoadapt.tuner import TopoLayer

SAVED_FILES = {"adapter_config.json", "adapter_model.safetensors", "topo_report.json", "README.md"}


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    return torch.cat([model(**b).logits for b in batches])


def report_of(folder) -> dict:
    return json.loads((folder / "topo_report.json").read_text())


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# 1. several adapters


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Adapter A (two layers, ranked) and adapter B (one layer where A has none), each saved on its own."""
    root = tmp_path_factory.mktemp("two")
    _, batches, *_ = BUILDERS["hf_bert"]()
    a = hta.get_topo_model(
        BUILDERS["hf_bert"]()[0], hta.TopoAdapterConfig(num_adapters=2, line_search_steps=4,
        modules_to_save=["classifier"]), calibration_data=batches,
    )  # fmt: skip
    elsewhere = next(s["name"] for s in a.topo_report.scores if s["name"] not in a.topo_report.chosen)
    b = hta.get_topo_model(
        BUILDERS["hf_bert"]()[0], hta.TopoAdapterConfig(target_modules=[elsewhere], line_search_steps=4,
        modules_to_save=["classifier"]), calibration_data=batches,
    )  # fmt: skip
    a.save_pretrained(str(root / "A"))
    b.save_pretrained(str(root / "B"))
    return {
        "root": root,
        "batches": batches,
        "A": (root / "A", logits(a, batches), a.topo_report.as_dict()),
        "B": (root / "B", logits(b, batches), b.topo_report.as_dict()),
        "base": logits(BUILDERS["hf_bert"]()[0], batches),
    }


def load_both(two) -> hta.TopoModel:
    model = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(two["A"][0]))
    model.load_adapter(str(two["B"][0]), "B")
    return model


def test_each_adapter_has_its_own_outputs_and_report(two_adapters):
    two, batches = two_adapters, two_adapters["batches"]
    model = load_both(two)
    assert set(model.peft_config) == {"default", "B"} and set(model.topo_reports) == {"default", "B"}
    assert model.active_adapter == "default" and model.topo_report.as_dict() == two["A"][2]
    assert torch.equal(logits(model, batches), two["A"][1])
    model.set_adapter("B")
    assert model.topo_report.as_dict() == two["B"][2]
    assert torch.equal(logits(model, batches), two["B"][1])
    with model.disable_adapter():
        assert torch.equal(logits(model, batches), two["base"])
    model.set_adapter("default")
    assert model.topo_report.as_dict() == two["A"][2]
    assert torch.equal(logits(model, batches), two["A"][1])


def test_saving_several_adapters_writes_each_report_and_card_and_each_loads_back(two_adapters, tmp_path):
    two, batches = two_adapters, two_adapters["batches"]
    model = load_both(two)
    model.set_adapter("B")  # the active adapter must not leak into the other adapter's folder
    model.save_pretrained(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == SAVED_FILES | {"B"}
    assert {p.name for p in (tmp_path / "B").iterdir()} == SAVED_FILES
    assert report_of(tmp_path) == two["A"][2] and report_of(tmp_path / "B") == two["B"][2]
    b_config = json.loads((tmp_path / "B" / "adapter_config.json").read_text())
    assert b_config["target_modules"] == [i["position"] for i in two["B"][2]["insertions"]]
    a_card, b_card = ((folder / "README.md").read_text() for folder in (tmp_path, tmp_path / "B"))
    a_positions = [i["position"] for i in two["A"][2]["insertions"]]
    (b_position,) = (i["position"] for i in two["B"][2]["insertions"])
    assert all(p in a_card for p in a_positions) and all(p not in b_card for p in a_positions)
    assert f"| {b_position} |" in b_card
    assert f'TopoModel.from_pretrained(base, "{tmp_path / "B"}")' in b_card

    for folder, kwargs, name in [(tmp_path, {}, "A"), (tmp_path / "B", {}, "B"), (tmp_path, {"subfolder": "B"}, "B")]:
        loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(folder), **kwargs)
        assert torch.equal(logits(loaded, batches), two[name][1]), (folder, kwargs)
        assert loaded.topo_report.as_dict() == two[name][2]

    both = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(tmp_path))
    both.load_adapter(str(tmp_path), "B", subfolder="B")
    both.set_adapter("B")
    assert torch.equal(logits(both, batches), two["B"][1]) and both.topo_report.as_dict() == two["B"][2]
    theirs = peft.PeftModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(tmp_path), subfolder="B")
    assert torch.equal(logits(theirs, batches), two["B"][1])


def test_selected_adapters_and_a_hub_id_in_the_card(two_adapters, tmp_path):
    two = two_adapters
    model = load_both(two)
    model.save_pretrained(str(tmp_path), selected_adapters=["B"], adapter_id="someone/topo-adapters")
    assert not (tmp_path / "adapter_config.json").exists() and not (tmp_path / "topo_report.json").exists()
    assert {p.name for p in (tmp_path / "B").iterdir()} == SAVED_FILES
    assert report_of(tmp_path / "B") == two["B"][2]
    card = (tmp_path / "B" / "README.md").read_text()
    assert 'TopoModel.from_pretrained(base, "someone/topo-adapters", subfolder="B")' in card
    assert 'peft.PeftModel.from_pretrained(base, "someone/topo-adapters", subfolder="B")' in card


def test_deleting_the_active_adapter_falls_back_to_the_other(two_adapters):
    two, batches = two_adapters, two_adapters["batches"]
    model = load_both(two)
    model.set_adapter("B")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft says which adapter it activates
        model.delete_adapter("B")
    assert list(model.peft_config) == ["default"] and list(model.topo_reports) == ["default"]
    assert model.active_adapter == "default" and model.topo_report.as_dict() == two["A"][2]
    assert not any("B" in layer.topo_down for layer in model.modules() if isinstance(layer, TopoLayer))
    assert torch.equal(logits(model, batches), two["A"][1])
    assert not any(p.requires_grad for p in model.parameters())  # A was loaded for inference and stays so


def test_adding_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(two_adapters, tmp_path):
    two, batches = two_adapters, two_adapters["batches"]
    model = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(two["A"][0]))
    before = state(model)
    wide, wide_batches, *_ = BUILDERS["hf_bert"](width=12)
    hta.get_topo_model(wide, hta.TopoAdapterConfig(line_search_steps=4), wide_batches).save_pretrained(
        str(tmp_path / "wide")
    )
    with pytest.raises(ValueError, match=r"does not fit this base model.*adapter width 12"):
        model.load_adapter(str(tmp_path / "wide"), "wide")
    lora = peft.get_peft_model(BUILDERS["hf_bert"]()[0], peft.LoraConfig(target_modules=["query"], r=2))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="'LORA' adapter, not a topo adapter"):
        model.load_adapter(str(tmp_path / "lora"), "lora")
    shutil.copytree(two["B"][0], tmp_path / "pickled")
    (tmp_path / "pickled" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        model.load_adapter(str(tmp_path / "pickled"), "pickled")
    assert list(model.peft_config) == ["default"] and list(model.topo_reports) == ["default"]
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model, batches), two["A"][1])


def test_a_hub_adapter_brings_its_report(two_adapters, monkeypatch):
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if kwargs.get("subfolder") == "missing":
            raise EntryNotFoundError("no such file")
        if kwargs.get("subfolder") == "uncached":
            raise LocalEntryNotFoundError("offline")
        return str(two_adapters["B"][0] / filename)

    monkeypatch.setattr(persistence, "hf_hub_download", download)
    report = persistence.read_report("someone/topo", subfolder="B", revision="v1", token="hf_x")
    assert report.as_dict() == two_adapters["B"][2]
    assert calls == [("someone/topo", "topo_report.json", {"subfolder": "B", "revision": "v1", "token": "hf_x"})]
    assert persistence.read_report("someone/topo", subfolder="missing") is None
    with pytest.warns(UserWarning, match="not in the local cache"):
        assert persistence.read_report("someone/topo", subfolder="uncached") is None


# 2. a causal LM: generation with and without the KV cache, and after a reload


@pytest.mark.parametrize("family", ["hf_gpt2", "hf_llama"])
def test_causal_lm_generates_the_same_with_and_without_the_cache_and_after_reload(family, tmp_path):
    model, batches, *_ = BUILDERS[family]()
    config = hta.TopoAdapterConfig(num_adapters=2, line_search_steps=4, task_type="CAUSAL_LM")
    adapted = hta.get_topo_model(model, config, calibration_data=batches)
    prompt = batches[0]["input_ids"][:, :3]

    def generate(m, use_cache=True):
        out = m.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
            do_sample=False, use_cache=use_cache, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    tokens, scores = generate(adapted)
    assert tokens.shape == (prompt.shape[0], prompt.shape[1] + 6)
    uncached_tokens, uncached_scores = generate(adapted, use_cache=False)
    assert torch.equal(uncached_tokens, tokens) and (uncached_scores - scores).abs().max() < 1e-6  # float32 logits
    with adapted.disable_adapter():
        assert (generate(adapted)[1] - scores).abs().max() > 1e-3  # the adapters act on every generated token
    with torch.no_grad():  # the first generated token's scores are the adapted model's last-position logits
        last = adapted(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits[:, -1]
    assert (scores[0] - last.float()).abs().max() < 1e-6

    adapted.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    ours = hta.TopoModel.from_pretrained(BUILDERS[family]()[0], str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(BUILDERS[family]()[0], str(tmp_path))
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    for loaded in (ours, theirs):
        for use_cache in (True, False):
            again_tokens, again_scores = generate(loaded, use_cache)
            assert torch.equal(again_tokens, tokens) and (again_scores - scores).abs().max() < 1e-6


# 3. resuming training from a Trainer checkpoint


def test_training_resumes_from_a_trainer_checkpoint(tmp_path):
    from transformers import Trainer, TrainingArguments

    _, batches, *_ = BUILDERS["hf_llama"]()  # no dropout: a resumed run can match an uninterrupted one exactly
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]

    def adapted():
        config = hta.TopoAdapterConfig(num_adapters=2, line_search_steps=4, task_type="CAUSAL_LM")
        return hta.get_topo_model(BUILDERS["hf_llama"]()[0].float(), config, calibration_data=batches)

    def trainer(model, folder):
        args = TrainingArguments(
            output_dir=str(tmp_path / folder), use_cpu=True, max_steps=4, per_device_train_batch_size=2,
            learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=rows)

    start = {n: p.detach().clone() for n, p in adapted().named_parameters() if p.requires_grad}
    full = adapted()
    trainer(full, "full").train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert SAVED_FILES <= {p.name for p in checkpoint.iterdir()}  # our save_pretrained wrote the checkpoint

    resumed = adapted()
    resumed_trainer = trainer(resumed, "resumed")
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_trainer.state.global_step == 4
    ours, theirs = dict(resumed.named_parameters()), dict(full.named_parameters())
    assert {n for n, p in ours.items() if p.requires_grad} == set(start)
    for name, value in start.items():
        assert (theirs[name] - value).abs().max() > 1e-4, name  # it trained
        assert (ours[name] - theirs[name]).abs().max() <= 1e-6, name  # and the resumed run continued it exactly
    assert resumed.topo_report.as_dict() == full.topo_report.as_dict()


# 4. every numeric setting is validated


def numeric_fields(*classes) -> list[tuple[str, str]]:
    """(name, 'int' or 'float') of every field annotated int or float (optional ones included; bool excluded)."""
    found = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            kinds = {part.strip() for part in str(f.type).split("|")}
            if "float" in kinds:
                found.append((f.name, "float"))
            elif "int" in kinds:
                found.append((f.name, "int"))
    return found


SCORING_FIELDS = numeric_fields(hta.ScoringConfig)
CONFIG_FIELDS = [(cls, *f) for f in SCORING_FIELDS for cls in (hta.ScoringConfig, hta.TopoAdapterConfig)] + [
    (hta.TopoAdapterConfig, *f) for f in numeric_fields(_TopoAdapterFields)
]
GROWTH_FIELDS = [f for f in numeric_fields(GrowthConfig) if f[0] != "neurons"]  # neurons: int or a list of them


@pytest.mark.parametrize(("cls", "name", "kind"), CONFIG_FIELDS, ids=[f"{c.__name__}-{n}" for c, n, _ in CONFIG_FIELDS])
def test_every_numeric_scoring_and_adapter_setting_is_validated(cls, name, kind):
    bad = [float("nan"), "3"] + ([2.5, True] if kind == "int" else [float("inf")])
    for value in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            cls(**{name: value})


@pytest.mark.parametrize(("name", "kind"), GROWTH_FIELDS, ids=[f[0] for f in GROWTH_FIELDS])
def test_every_numeric_growth_setting_is_validated(name, kind):
    bad = [float("nan"), "3"] + ([2.5, True] if kind == "int" else [float("inf")])
    for value in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            GrowthConfig(schedule=[1], **{name: value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calibration_batches": -1}, r"calibration_batches must be >= 1 or None \(None: all batches\), got -1"),
        ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
        ({"init_scale": 0.0}, r"init_scale must be > 0\.0 .*exactly zero gradients"),
        ({"init_scale": -0.01}, r"init_scale must be > 0\.0"),
        ({"optimize_iterations": -1}, "optimize_iterations must be >= 0"),
        ({"rank_by": "tokens"}, r"rank_by must be one of \('eigenvalue', 'per_token'\), got 'tokens'"),
        ({"step_scale": 0.0}, r"step_scale must be > 0\.0 \(1: the line search's step\)"),
        ({"step_scale": 1.5}, r"step_scale must be in \(0, 1\]"),
        ({"exact_max_features": -5}, "exact_max_features must be >= 0"),
        ({"threshold": -0.5}, r"threshold must be >= 0\.0 .*largest eigenvalue is positive"),
        ({"lanczos_refine_rows": -2}, "lanczos_refine_rows must be >= 1"),
        ({"lanczos_screen_iterations": 0}, r"lanczos_screen_iterations must be >= 1 \(a Lanczos run needs a step\)"),
        ({"lanczos_refine_iterations": -3}, "lanczos_refine_iterations must be >= 1"),
        ({"lanczos_refine_iterations": 0, "lanczos_refine_rows": 0}, "lanczos_refine_iterations must be >= 1"),
        ({"num_adapters": 1.5}, "num_adapters must be a whole number >= 1"),
        ({"compute_dtype": "float16"}, "compute_dtype 'float16' is not supported"),
    ],
    ids=lambda v: str(v),
)
def test_adapter_config_rejects_what_would_fail_or_do_nothing(settings, message):
    with pytest.raises(ValueError, match=message):
        hta.TopoAdapterConfig(**settings)


def test_smallest_accepted_solver_settings_run():
    """The lower bounds are real: at them the Lanczos solver and the optimised directions still work."""
    model, batches, *_ = BUILDERS["hf_bert"]()
    config = hta.ScoringConfig(
        solver="lanczos", lanczos_screen_iterations=1, lanczos_refine_iterations=1, lanczos_refine_rows=1,
        optimize_iterations=0, directions="optimized", exact_max_features=0, threshold=0.0, line_search_steps=1,
    )  # fmt: skip
    scores = hta.score_positions(model, batches, config)
    assert all(math.isfinite(s.eigenvalue) for s in scores)
    record = hta.insert_layer(model, batches, config)
    assert record.position in {s.name for s in scores}
