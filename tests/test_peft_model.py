"""The PEFT-style front door over tiny HF ViT, BERT, GPT-2, Llama and timm ViT models: insertion and trainable
parameters, disable / merge / unload, save and load in a fresh interpreter (ours and peft's loader), training with
the transformers Trainer and a plain loop, gradient checkpointing, torch.compile, fixed positions, push_to_hub
offline and clear errors for bad inputs that leave the base model as it was."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import peft
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from models import BUILDERS
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

import hf_topoadapt as hta
from hf_topoadapt.layers import ADAPTER_ATTRIBUTE, AdapterHook
from hf_topoadapt.locate import HEAD_INPUT, KNOWN_HEAD_INPUTS, find_block_list
from hf_topoadapt.tuner import TopoLayer

HAS_TIMM = importlib.util.find_spec("timm") is not None
TIMM = pytest.param("timm_vit", marks=pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed"))
HF_FAMILIES = ["hf_vit", "hf_bert", "hf_gpt2", "hf_llama"]
FAMILIES = [*HF_FAMILIES, TIMM]
HEADS = {"hf_vit": ["classifier"], "hf_bert": ["classifier"], "timm_vit": ["head"]}
SAVED_FILES = {"adapter_config.json", "adapter_model.safetensors", "topo_report.json", "README.md"}
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def make_config(family: str, **overrides) -> hta.TopoAdapterConfig:
    settings = {"num_adapters": 2, "modules_to_save": HEADS.get(family), "line_search_steps": 4, **overrides}
    return hta.TopoAdapterConfig(**settings)


def forward(model, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).logits
    return model(batch[0])


@torch.no_grad()
def outputs(model, batches) -> torch.Tensor:
    return torch.cat([forward(model, batch) for batch in batches])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def topo_layers(model) -> dict[tuple[str, str], TopoLayer]:
    """(module path, attribute) of every topo layer in the model."""
    found = {}
    for name, module in model.named_modules():
        for attribute in ADAPTER_ATTRIBUTE.values():
            layer = getattr(module, attribute, None)
            if isinstance(layer, TopoLayer):
                found[(name, attribute)] = layer
    return found


def peft_traces(model) -> list[str]:
    """Everything get_topo_model / from_pretrained may leave behind in a base model."""
    traces = []
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) or type(module).__module__.startswith("peft."):
            traces.append(f"{name}: {type(module).__name__}")
        hooks = {**module._forward_hooks, **module._forward_pre_hooks}
        if any(isinstance(hook, AdapterHook) for hook in hooks.values()):
            traces.append(f"{name}: adapter hook")
        if any(attribute in module._modules for attribute in ADAPTER_ATTRIBUTE.values()):
            traces.append(f"{name}: topo child")
    if "peft_config" in model.__dict__:
        traces.append("peft_config attribute")
    return traces


def snapshot(model) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_untouched(model, before: dict) -> None:
    assert peft_traces(model) == []
    state = model.state_dict()
    assert set(state) == set(before["state"])
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]


@dataclass
class Case:
    """One family adapted once with get_topo_model, saved, and its outputs before and after."""

    family: str
    original: torch.nn.Module  # a deep copy of the base model before get_topo_model
    model: hta.TopoModel
    batches: list
    loss_fn: object
    width: int
    path: Path
    base_outputs: torch.Tensor
    adapted: torch.Tensor
    outputs_file: Path


class Cases:
    def __init__(self, root: Path):
        self.root, self._cases = root, {}

    def __getitem__(self, family: str) -> Case:
        if family not in self._cases:
            model, batches, loss_fn, width, _ = BUILDERS[family]()
            original = copy.deepcopy(model)
            peft_model = hta.get_topo_model(model, make_config(family), calibration_data=batches, loss_fn=loss_fn)
            path = self.root / family
            peft_model.save_pretrained(str(path))
            adapted = outputs(peft_model, batches)
            outputs_file = self.root / f"{family}_outputs.safetensors"
            save_file({"adapted": adapted.contiguous()}, str(outputs_file))
            self._cases[family] = Case(
                family,
                original,
                peft_model,
                batches,
                loss_fn,
                width,
                path,
                outputs(original, batches),
                adapted,
                outputs_file,
            )
        return self._cases[family]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (restored after): the models are tiny, and on a shared two-core machine a second OpenMP
    thread waiting for a busy core only slows every op down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    return Cases(tmp_path_factory.mktemp("topo_cases"))


# 1. insertion, trainable parameters, checkpoint keys, hidden states


@pytest.mark.parametrize("family", FAMILIES)
def test_get_topo_model_inserts_at_the_chosen_positions(cases, family):
    case = cases[family]
    report, config = case.model.topo_report, case.model.peft_config["default"]
    assert isinstance(case.model, hta.TopoModel) and isinstance(case.model, peft.PeftModel)
    assert len(report.chosen) == 2 and len(set(report.chosen)) == 2
    assert set(report.chosen) == set(config.target_modules) == set(config.adapter_shapes)
    best = max(report.scores, key=lambda s: s["eigenvalue"])
    assert report.chosen[0] == best["name"]  # greedy: the first layer goes where the first round scored highest
    expected = {
        (shape["module"], ADAPTER_ATTRIBUTE[shape["where"]]): (position, shape)
        for position, shape in config.adapter_shapes.items()
    }
    layers = topo_layers(case.model.get_base_model())
    assert set(layers) == set(expected)
    for key, layer in layers.items():
        position, shape = expected[key]
        names = {"input": "embeddings", "output": shape["module"]}
        assert position == (HEAD_INPUT if position == HEAD_INPUT else names[shape["where"]])
        if position == HEAD_INPUT:  # the classifier's input: the output of the module that feeds it
            assert shape["module"] in KNOWN_HEAD_INPUTS and shape["where"] == "output"
        assert layer.width == shape["width"] == case.width
        assert layer.topo_up["default"].shape == (case.width, shape["neurons"])


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_and_modules_to_save_train(cases, family, capsys):
    case = cases[family]
    config = case.model.peft_config["default"]
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in case.model.named_parameters() if ".topo_down." in n or ".modules_to_save.default." in n}
    assert trainable == expected
    assert any(".topo_down." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable) == (family in HEADS)
    # the output directions U stay fixed (train_up=False), as in the paper
    assert not any(p.requires_grad for n, p in case.model.named_parameters() if ".topo_up." in n)

    case.model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", printed)
    assert match, printed
    heads = sum(p.numel() for name in HEADS.get(family, []) for p in case.original.get_submodule(name).parameters())
    adapters = sum(shape["neurons"] * (shape["width"] + 1) for shape in config.adapter_shapes.values())
    total = sum(p.numel() for p in case.model.parameters())
    assert int(match[1].replace(",", "")) == adapters + heads
    assert int(match[2].replace(",", "")) == total
    assert match[3] == f"{100 * (adapters + heads) / total:.4f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_checkpoint_keys_and_weights_are_unchanged(cases, family):
    case = cases[family]
    original = case.original.state_dict()
    state = case.model.get_base_model().state_dict()
    # modules_to_save is peft's own wrapper (original_module + a trainable copy); the topo layers add keys only
    own = {k.replace(".original_module.", "."): k for k in state if "topo_" not in k and ".modules_to_save." not in k}
    assert set(own) == set(original)
    assert all(torch.equal(state[own[k]], v) for k, v in original.items())
    modules = {shape["module"] for shape in case.model.peft_config["default"].adapter_shapes.values()}
    for key in (k for k in state if "topo_" in k):
        assert re.sub(r"\.topo_adapter(_input)?\..*", "", key) in modules, key


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_output_hidden_states_are_the_adapted_block_outputs(cases, family):
    case = cases[family]
    base = case.model.get_base_model()
    _, blocks = find_block_list(base)
    raw, adapted, handles = {}, {}, []

    def recorder(store, i):
        return lambda module, args, output: store.__setitem__(i, output[0] if isinstance(output, tuple) else output)

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(recorder(raw, i), prepend=True))  # before the adapter's hook
        handles.append(block.register_forward_hook(recorder(adapted, i)))  # after it
    try:
        with torch.no_grad():
            hidden_states = case.model(**case.batches[0], output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    assert len(hidden_states) == len(blocks) + 1
    final_norm = {"hf_gpt2": lambda: base.transformer.ln_f, "hf_llama": lambda: base.model.norm}.get(family)
    with torch.no_grad():
        for i in range(len(blocks)):
            expected = adapted[i]
            if i == len(blocks) - 1 and final_norm is not None:
                expected = final_norm()(expected)  # GPT-2 and Llama record the last state after the final norm
            assert torch.equal(hidden_states[i + 1], expected), i
    for name, attribute in topo_layers(base):
        host = base.get_submodule(name)
        if attribute == ADAPTER_ATTRIBUTE["output"] and any(block is host for block in blocks):
            i = next(i for i, block in enumerate(blocks) if block is host)
            assert not torch.equal(adapted[i], raw[i])  # the block's output adapter acts


# 2. disable, merge, unload


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_gives_the_base_outputs_exactly(cases, family):
    case = cases[family]
    assert max_diff(case.adapted, case.base_outputs) > 1e-8
    with case.model.disable_adapter():
        assert torch.equal(outputs(case.model, case.batches), case.base_outputs)
    assert torch.equal(outputs(case.model, case.batches), case.adapted)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_is_a_plain_model_with_the_same_outputs(cases, family):
    case = cases[family]
    merged = copy.deepcopy(case.model).merge_and_unload()
    assert type(merged) is type(case.original)
    assert not [n for n, m in merged.named_modules() if type(m).__module__.startswith("peft.")]
    assert not [n for n, m in merged.named_modules() if isinstance(m, (BaseTunerLayer, TopoLayer))]
    assert sum(isinstance(m, hta.TopoAdapter) for m in merged.modules()) == 2
    assert torch.equal(outputs(merged, case.batches), case.adapted)
    baked = {
        f"{shape['module']}.{ADAPTER_ATTRIBUTE[shape['where']]}.{tensor}"
        for shape in case.model.peft_config["default"].adapter_shapes.values()
        for tensor in ("down.weight", "down.bias", "up")
    }
    assert set(merged.state_dict()) == set(case.original.state_dict()) | baked


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_returns_the_base_model(cases, family):
    case = cases[family]
    unloaded = copy.deepcopy(case.model).unload()
    assert type(unloaded) is type(case.original)
    assert peft_traces(unloaded) == []
    assert set(unloaded.state_dict()) == set(case.original.state_dict())
    assert torch.equal(outputs(unloaded, case.batches), case.base_outputs)


# 3. save and load


FRESH_PROCESS_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file
import peft
import hf_topoadapt
from models import BUILDERS

@torch.no_grad()
def outputs(model, batches):
    return torch.cat([model(**b).logits if isinstance(b, dict) else model(b[0]) for b in batches])

results = {}
for family, folder, outputs_file in json.loads(sys.argv[1]):
    expected = load_file(outputs_file)["adapted"]
    batches = BUILDERS[family]()[1]
    ours = hf_topoadapt.TopoModel.from_pretrained(BUILDERS[family]()[0], folder)
    theirs = peft.PeftModel.from_pretrained(BUILDERS[family]()[0], folder)
    results[family] = {
        "ours": (outputs(ours, batches) - expected).abs().max().item(),
        "peft": (outputs(theirs, batches) - expected).abs().max().item(),
        "ours_class": type(ours).__name__,
        "peft_class": type(theirs).__name__,
        "report": json.dumps(ours.topo_report.as_dict(), sort_keys=True),
        "trainable": sum(p.requires_grad for p in ours.parameters()),
    }
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_process(cases) -> dict:
    """Loads every family's saved adapter in one new interpreter (with both loaders) and returns what it saw."""
    families = ["hf_vit", "hf_bert", "hf_gpt2", "hf_llama", *(["timm_vit"] if HAS_TIMM else [])]
    jobs = [(f, str(cases[f].path), str(cases[f].outputs_file)) for f in families]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_in_a_fresh_process(cases, fresh_process, family):
    case, seen = cases[family], fresh_process[family]
    assert seen["ours"] < 1e-12 and seen["peft"] < 1e-12
    assert seen["ours_class"] == "TopoModel"
    assert seen["peft_class"] == "PeftModel"  # peft's own loader, found through the "TOPO" registration
    assert seen["report"] == json.dumps(case.model.topo_report.as_dict(), sort_keys=True)
    assert seen["trainable"] == 0  # loaded for inference, as peft does without is_trainable=True


def test_the_report_times_the_setup_by_phase_and_does_not_save_the_times(cases):
    case = cases["hf_bert"]
    seconds = case.model.topo_report.seconds
    assert list(seconds) == ["capture", "eigen_solves", "directions", "line_search"]  # no head warm-up here
    assert all(value >= 0 for value in seconds.values()) and seconds["capture"] > 0 and seconds["line_search"] > 0
    phases = ", ".join(f"{name.replace('_', ' ')} {value:.2f} s" for name, value in seconds.items())
    assert str(case.model.topo_report).endswith(f"Setup {sum(seconds.values()):.2f} s: {phases}.")
    saved = json.loads((case.path / "topo_report.json").read_text())
    assert "seconds" not in saved and all("seconds" not in i for i in saved["insertions"])  # machine-dependent
    loaded = hta.TopoReport.from_dict(saved)
    assert loaded.seconds == {} and loaded == case.model.topo_report  # the times do not take part in equality


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_holds_safetensors_report_and_a_card(cases, family):
    case = cases[family]
    files = {p.name for p in case.path.rglob("*") if p.is_file()}
    assert files == SAVED_FILES
    tensors = load_file(str(case.path / "adapter_model.safetensors"))
    heads = HEADS.get(family, [])
    assert all(
        ".topo_down." in k or k.endswith(".topo_up") or any(f".{head}." in k for head in heads) for k in tensors
    ), sorted(tensors)
    assert sum("topo_" in k for k in tensors) == 3 * 2  # D, b and U of two layers
    assert {k for k in tensors if "topo_" not in k} == {
        f"base_model.model.{h}.{p}" for h in heads for p in ("weight", "bias")
    }

    saved_config = json.loads((case.path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "TOPO"
    assert saved_config["target_modules"] == case.model.topo_report.chosen
    assert saved_config["adapter_shapes"] == case.model.peft_config["default"].adapter_shapes
    report = json.loads((case.path / "topo_report.json").read_text())
    assert json.dumps(report, sort_keys=True) == json.dumps(case.model.topo_report.as_dict(), sort_keys=True)

    card = ModelCard.load(str(case.path / "README.md"))
    assert card.data.library_name == "peft"
    assert "hf_topoadapt" in card.data.tags
    assert all(position in card.text for position in case.model.topo_report.chosen)
    how_to_load = card.text.split("## How to load", 1)[1]
    assert f'TopoModel.from_pretrained(base, "{case.path}")' in how_to_load


def test_loaded_model_can_keep_training_and_its_trained_state_round_trips(cases, tmp_path):
    case = cases["hf_bert"]
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(case.path), is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in case.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for parameter in loaded.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)
    trained = outputs(loaded, case.batches)
    loaded.save_pretrained(str(tmp_path))
    again = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(tmp_path))
    assert torch.equal(outputs(again, case.batches), trained)
    assert max_diff(trained, case.adapted) > 1e-6


# 4. training, gradient checkpointing, torch.compile


def _split_rows(batches) -> list[dict]:
    """Per-example rows (float32 features) for a Trainer dataset."""
    rows = []
    for batch in batches:
        for i in range(len(batch["labels"])):
            rows.append({k: v[i].float() if v.is_floating_point() else v[i] for k, v in batch.items()})
    return rows


def _assert_trained_only_the_adapters(model, before: dict) -> None:
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        if ".topo_down." in name or ".modules_to_save." in name:
            assert changed, f"{name} did not train"
        else:
            assert not changed, f"{name} changed"  # base weights, the frozen original head, U


@pytest.mark.parametrize("family", ["hf_bert", "hf_llama"])
def test_transformers_trainer_trains_the_topo_model(cases, family, tmp_path):
    from transformers import Trainer, TrainingArguments

    if family == "hf_bert":  # created in float32 by get_topo_model
        base, batches, *_ = BUILDERS[family]()
        model = hta.get_topo_model(base.float(), make_config(family), calibration_data=batches)
    else:  # a saved adapter loaded for training onto a float32 base
        batches = cases[family].batches
        model = hta.TopoModel.from_pretrained(BUILDERS[family]()[0].float(), str(cases[family].path), is_trainable=True)
    assert model.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_split_rows(batches))
    result = trainer.train()
    assert trainer.model is model and trainer.state.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses) and math.isfinite(result.training_loss)
    _assert_trained_only_the_adapters(model, before)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_plain_loop_trains_the_timm_model(cases):
    case = cases["timm_vit"]
    model = copy.deepcopy(case.model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        inputs, targets = case.batches[step % len(case.batches)]
        loss = case.loss_fn(model(inputs), targets)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _assert_trained_only_the_adapters(model, before)


def _adapter_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return grads


@pytest.mark.parametrize(("family", "when"), [("hf_llama", "before"), ("hf_llama", "after"), ("hf_vit", "after")])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(cases, family, when, monkeypatch):
    import transformers.modeling_utils

    case = cases[family]  # no dropout in these two, so train mode is deterministic
    reference = hta.TopoModel.from_pretrained(BUILDERS[family]()[0], str(case.path), is_trainable=True)
    expected = _adapter_grads(reference, case.batches[0])

    checkpoint, calls = transformers.modeling_utils.checkpoint, []
    monkeypatch.setattr(
        transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    base, batches, loss_fn, *_ = BUILDERS[family]()
    if when == "before":
        base.gradient_checkpointing_enable()
        model = hta.get_topo_model(base, make_config(family), calibration_data=batches, loss_fn=loss_fn)
        for name, parameter in model.named_parameters():  # scoring is unaffected by checkpointing
            if "topo_" in name:
                assert torch.equal(parameter, reference.get_parameter(name)), name
    else:
        model = hta.TopoModel.from_pretrained(base, str(case.path), is_trainable=True)
        base.gradient_checkpointing_enable()
    grads = _adapter_grads(model, case.batches[0])
    assert len(calls) == len(find_block_list(base)[1])  # every block ran through the checkpoint
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert expected[name].abs().max() > 0
        assert max_diff(grad, expected[name]) <= 1e-10, name


@pytest.mark.parametrize("family", ["hf_bert", TIMM])
def test_torch_compile_matches_eager(cases, family):
    case = cases[family]
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(case.model), backend="aot_eager")
    assert max_diff(outputs(compiled, case.batches), case.adapted) < 1e-12
    torch._dynamo.reset()


# 5. fixed positions


@pytest.mark.parametrize("family", ["hf_gpt2", TIMM])
def test_target_modules_insert_exactly_there(cases, family):
    case = cases[family]
    blocks = [s for s in case.model.topo_report.scores if s["kind"] == "block" and s["eigenvalue"] > 0]
    target = min(blocks, key=lambda s: s["eigenvalue"])["name"]  # the block ranking liked least
    model, batches, loss_fn, *_ = BUILDERS[family]()
    config = hta.TopoAdapterConfig(target_modules=[target], line_search_steps=4)
    peft_model = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=loss_fn)
    assert peft_model.topo_report.chosen == [target]
    assert [s["name"] for s in peft_model.topo_report.scores] == [target]  # nothing else competed
    assert list(peft_model.peft_config["default"].adapter_shapes) == [target]
    assert set(topo_layers(model)) == {(target, ADAPTER_ATTRIBUTE["output"])}


def test_random_init_at_fixed_positions_needs_no_data(tmp_path):
    model, batches, *_ = BUILDERS["hf_bert"]()
    original = copy.deepcopy(model)
    config = hta.TopoAdapterConfig(target_modules=["bert.encoder.layer.1"], init="random", neurons=3)
    peft_model = hta.get_topo_model(model, config)
    shape = peft_model.peft_config["default"].adapter_shapes["bert.encoder.layer.1"]
    assert shape["width"] == model.config.hidden_size and shape["neurons"] == 3
    (layer,) = topo_layers(model).values()
    down = layer.topo_down["default"].weight
    assert down.dtype == torch.float64 and 0 < down.abs().max() < 10 * config.init_scale
    adapted = outputs(peft_model, batches)
    assert max_diff(adapted, outputs(original, batches)) > 0
    with peft_model.disable_adapter():
        assert torch.equal(outputs(peft_model, batches), outputs(original, batches))
    peft_model.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(tmp_path))
    assert torch.equal(outputs(loaded, batches), adapted)


def test_adapter_inside_a_head_round_trips(tmp_path):
    """'head.1' is the SiLU of an MLP head: a module without parameters of its own."""
    model, batches, loss_fn, *_ = BUILDERS["residual_mlp"]()
    config = hta.TopoAdapterConfig(target_modules=["head.1"], line_search_steps=4)
    peft_model = hta.get_topo_model(model, config, calibration_data=batches, loss_fn=loss_fn)
    (layer,) = topo_layers(model).values()
    assert layer.topo_down["default"].weight.dtype == torch.float64  # the model's dtype, not torch's default
    adapted = outputs(peft_model, batches)
    peft_model.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(BUILDERS["residual_mlp"]()[0], str(tmp_path))
    assert torch.equal(outputs(loaded, batches), adapted)


# 6. push_to_hub offline


def hub_api(root: Path, namespace: str = "fake-user"):
    """An `HfApi` mock with HfApi's real signatures (an unknown or misplaced argument is a TypeError): create_repo
    returns the RepoUrl the Hub would, upload_folder copies the folder under `root`."""
    api = mock.create_autospec(HfApi, instance=True)

    def create_repo(repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else f'{namespace}/{repo_id}'}")

    def upload_folder(*, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, root / repo_id)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    api.create_repo.side_effect = create_repo
    api.upload_folder.side_effect = upload_folder
    return api


def arguments(method, call) -> dict:
    """Every argument of a recorded call by parameter name, defaults filled in, as the real method receives them."""
    bound = inspect.signature(method).bind(None, *call.args, **call.kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


PUSH_SETTINGS = [
    {},
    {"private": True, "token": "hf_secret", "commit_message": "topo v2", "revision": "dev", "create_pr": True},
    {"private": False, "token": "hf_other"},
]


@pytest.mark.parametrize("settings", PUSH_SETTINGS, ids=["defaults", "private", "public"])
def test_push_to_hub_uploads_the_adapter_folder_with_its_card(cases, tmp_path, settings):
    case = cases["hf_bert"]
    api = hub_api(tmp_path)
    case.model.push_to_hub("topo-bert", api=api, **settings)
    api.create_repo.assert_called_once()
    api.upload_folder.assert_called_once()
    assert [c[0] for c in api.method_calls] == ["create_repo", "upload_folder"]  # the repo exists before the upload
    created = arguments(HfApi.create_repo, api.create_repo.call_args)
    assert created["repo_id"] == "topo-bert" and created["exist_ok"] is True
    assert created["private"] is settings.get("private") and created["token"] == settings.get("token")
    assert created["repo_type"] in (None, "model") and created["visibility"] is None
    uploaded = arguments(HfApi.upload_folder, api.upload_folder.call_args)
    assert uploaded["repo_id"] == "fake-user/topo-bert"  # the full id create_repo returned
    assert uploaded["token"] == settings.get("token") and uploaded["repo_type"] in (None, "model")
    assert uploaded["commit_message"] == settings.get("commit_message", "Upload topo adapter")
    assert uploaded["revision"] == settings.get("revision") and bool(uploaded["create_pr"]) == settings.get(
        "create_pr", False
    )
    assert uploaded["path_in_repo"] in (None, "", ".") and uploaded["run_as_future"] is False
    assert uploaded["delete_patterns"] is None and uploaded["allow_patterns"] is None

    folder = tmp_path / "fake-user" / "topo-bert"
    assert {p.name for p in folder.iterdir()} == SAVED_FILES
    local, remote = (load_file(str(p / "adapter_model.safetensors")) for p in (case.path, folder))
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    card = ModelCard.load(str(folder / "README.md"))
    assert card.data.library_name == "peft" and "hf_topoadapt" in card.data.tags
    assert 'TopoModel.from_pretrained(base, "fake-user/topo-bert")' in card.text.split("## How to load", 1)[1]
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0], str(folder))
    assert torch.equal(outputs(loaded, case.batches), case.adapted)


def test_push_to_hub_without_an_api_makes_one_with_the_token(cases, tmp_path, monkeypatch):
    api_class = mock.create_autospec(HfApi)
    api_class.return_value = hub_api(tmp_path)
    monkeypatch.setattr("hf_topoadapt.model.HfApi", api_class)
    cases["hf_bert"].model.push_to_hub("someone/topo-bert", token="hf_secret", private=True)
    assert arguments(HfApi.__init__, api_class.call_args)["token"] == "hf_secret"
    created = arguments(HfApi.create_repo, api_class.return_value.create_repo.call_args)
    assert created["repo_id"] == "someone/topo-bert" and created["private"] is True
    assert (tmp_path / "someone" / "topo-bert" / "adapter_model.safetensors").is_file()


# 7. bad inputs: a clear error, and the base model as it was


def test_get_topo_model_without_calibration_data_is_an_error():
    model = BUILDERS["hf_bert"]()[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs calibration_data"):
        hta.get_topo_model(model, hta.TopoAdapterConfig(num_adapters=2))
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [
        ({"num_adapters": 0}, "num_adapters must be >= 1"),
        ({"init": "x"}, "init must be one of"),
        ({"target_modules": []}, "target_modules is an empty list"),
    ],
)
def test_config_rejects_invalid_values(settings, phrase):
    with pytest.raises(ValueError, match=phrase):
        hta.TopoAdapterConfig(**settings)


def test_unknown_target_module_is_an_error_with_suggestions(cases):
    model, batches, *_ = BUILDERS["hf_bert"]()
    before = snapshot(model)
    config = hta.TopoAdapterConfig(target_modules=["bert.encoder.layr.1"])
    with pytest.raises(hta.PositionsNotFoundError, match=r"does not exist.*Did you mean.*bert\.encoder\.layer\.1"):
        hta.get_topo_model(model, config, calibration_data=batches)
    assert_untouched(model, before)


def _copy_saved(case: Case, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(case.path, folder)
    return folder


def test_loading_refuses_a_folder_without_safetensors(cases, tmp_path):
    folder = _copy_saved(cases["hf_bert"], tmp_path)
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), folder / "adapter_model.bin")
    weights.unlink()
    model = BUILDERS["hf_bert"]()[0]
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="missing.*adapter_model.safetensors"):
        hta.TopoModel.from_pretrained(model, str(folder))
    assert_untouched(model, before)


@pytest.mark.parametrize("loader", ["hf_topoadapt", "peft"])
def test_loading_refuses_settings_from_a_newer_version(cases, tmp_path, loader):
    folder = _copy_saved(cases["hf_bert"], tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(future_knob=3, topo_version="99.0")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = BUILDERS["hf_bert"]()[0]
    before = snapshot(model)
    load = hta.TopoModel.from_pretrained if loader == "hf_topoadapt" else peft.PeftModel.from_pretrained
    with pytest.raises(ValueError, match=r"does not know: \['future_knob'\].*99\.0"):
        load(model, str(folder))
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["hf_bert", TIMM])
def test_loading_onto_a_different_hidden_size_is_an_error(cases, family):
    model = BUILDERS[family](width=12)[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not fit this base model.*adapter width 8"):
        hta.TopoModel.from_pretrained(model, str(cases[family].path))
    assert_untouched(model, before)


def test_loading_a_lora_adapter_is_an_error(tmp_path):
    lora = peft.get_peft_model(BUILDERS["hf_bert"]()[0], peft.LoraConfig(target_modules=["query", "value"], r=2))
    lora.save_pretrained(str(tmp_path))
    model = BUILDERS["hf_bert"]()[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'LORA' adapter, not a topo adapter"):
        hta.TopoModel.from_pretrained(model, str(tmp_path))
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["hf_bert", TIMM])
def test_weights_missing_a_tensor_fail_and_restore_the_base(cases, tmp_path, family):
    folder = _copy_saved(cases[family], tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in sorted(tensors) if k.endswith("topo_down.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    model = BUILDERS[family]()[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match="miss adapter tensors"):
        hta.TopoModel.from_pretrained(model, str(folder))
    assert_untouched(model, before)  # no half-loaded hooks, wrappers or frozen parameters are left behind
