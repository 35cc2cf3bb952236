"""Precisions people fine-tune in: bf16 and fp16 weights, and float32 weights under autocast. A topo layer computes
in its own dtype and returns the stream's; a half-precision TopoModel scores, inserts, runs in every mode, trains
(the loss goes down), merges, saves and reloads; scoring and insertion run under CPU autocast with float32 numerics.
The CUDA autocast test runs only where a GPU is present."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from models import BUILDERS
from torch.nn import functional as F

import hf_topoadapt as hta
from hf_topoadapt.scoring import score_with_operators
from hf_topoadapt.tuner import TopoLayer

HALF = [torch.bfloat16, torch.float16]
BF16_AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}


def cast(batches, dtype):
    """The batches with their floating tensors in `dtype` (ids and labels unchanged)."""

    def one(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    return [{k: one(v) for k, v in b.items()} if isinstance(b, dict) else tuple(one(v) for v in b) for b in batches]


def logits(model, batches) -> torch.Tensor:
    return torch.cat([model(**b).logits if isinstance(b, dict) else model(b[0]) for b in batches])


def loss_of(model, batch, loss_fn=None) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return loss_fn(model(batch[0]), batch[1])


def config(**overrides) -> hta.TopoAdapterConfig:
    return hta.TopoAdapterConfig(**{"num_adapters": 2, "line_search_steps": 4, **overrides})


# 1. the layer: its own dtype inside, the stream's outside


def random_layer(width, neurons, layout, dtype) -> TopoLayer:
    layer = TopoLayer(width, layout, kernel_size=3)
    layer.update_layer("default", neurons, "silu_tanh", train_up=True, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g))
    return layer


def reference(layer: TopoLayer, h: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64."""
    exact = copy.deepcopy(layer).double()
    return exact(h.double())


@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("stream", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_topo_layer_and_plain_adapter_return_the_stream_dtype(layout, stream, weights, autocast):
    layer = random_layer(4, 2, layout, weights)
    shape = (2, 4, 3, 3) if layout == "channels" else (2, 5, 4)
    h = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(stream)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(h)
        plain = layer.to_plain("default")(h)
    assert out.dtype == plain.dtype == stream
    assert torch.equal(out, plain)  # merge_and_unload's layer is the same function, bit for bit
    rounding = max(torch.finfo(d).eps for d in (stream, weights, torch.bfloat16 if autocast else weights))
    expected = reference(layer, h)
    assert (out.double() - expected).abs().max() <= 40 * rounding * expected.abs().max()
    layer.enable_adapters(False)
    assert layer(h) is h


# 2. a half-precision TopoModel: every mode, training, merge, save and load


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_topo_model_runs_trains_merges_and_round_trips(dtype, tmp_path):
    model, batches, *_ = BUILDERS["hf_bert"]()
    model = model.to(dtype)
    original = copy.deepcopy(model)
    # peft keeps a modules_to_save copy in the model's dtype, and Adam's eps (1e-8) is 0 in fp16: an fp16 head
    # cannot train with plain Adam (peft's LoRA alike), so the fp16 case trains the float32 adapters only.
    heads = ["classifier"] if dtype == torch.bfloat16 else None
    peft_model = hta.get_topo_model(model, config(modules_to_save=heads), calibration_data=batches)
    topo = {n: p for n, p in peft_model.named_parameters() if "topo_" in n}
    assert topo and all(p.dtype == torch.float32 for p in topo.values())  # as peft keeps LoRA weights
    assert {n for n, p in topo.items() if p.requires_grad} == {n for n in topo if ".topo_down." in n}  # U frozen
    assert all(p.dtype == dtype for n, p in peft_model.named_parameters() if "topo_" not in n)

    # inference: eval mode, no_grad and inference_mode all run in the model's dtype
    peft_model.eval()
    with torch.no_grad():
        adapted = logits(peft_model, batches)
        with peft_model.disable_adapter():
            assert torch.equal(logits(peft_model, batches), logits(original, batches))
    with torch.inference_mode():
        assert torch.equal(logits(peft_model, batches), adapted)
    assert adapted.dtype == dtype and torch.isfinite(adapted).all()
    assert (adapted.float() - logits(original, batches).float()).abs().max() > 0  # the adapters act

    merged = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        assert torch.equal(logits(merged, batches), adapted)

    # training: a plain loop on float32 adapter weights; the loss goes down
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        loss = loss_of(peft_model, batches[step % 2])
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == p.dtype for p in optimizer.param_groups[0]["params"])
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses

    peft_model.eval()
    with torch.no_grad():
        trained = logits(peft_model, batches)
    peft_model.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0].to(dtype), str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, peft's upcast included
    with torch.no_grad():
        assert torch.equal(logits(loaded, batches), trained)


def test_bf16_model_trains_with_the_trainer_in_bf16_end_to_end(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, batches, *_ = BUILDERS["hf_bert"]()
    model = model.to(torch.bfloat16)
    peft_model = hta.get_topo_model(model, config(modules_to_save=["classifier"]), calibration_data=batches)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), bf16=True, use_cpu=True, max_steps=10, per_device_train_batch_size=6,
        learning_rate=2e-2, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    for name, parameter in peft_model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (".topo_down." in name or ".modules_to_save." in name), name

    # Accelerate left its bf16 autocast (and float32 outputs) wrapped around forward; the plain model is compared
    plain = trainer.accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        trained = logits(plain, batches)
    assert trained.dtype == torch.bfloat16
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_bert"]()[0].to(torch.bfloat16), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(logits(loaded, batches), trained)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_scoring_a_half_precision_model_computes_in_float32(dtype):
    model, batches, *_ = BUILDERS["hf_bert"]()
    single = score_with_operators(model.float(), batches, hta.ScoringConfig())[0]
    half = score_with_operators(model.to(dtype), batches, hta.ScoringConfig())[0]
    assert [s.name for s in half] == [s.name for s in single]
    for ours, full in zip(half, single, strict=True):
        assert ours.spectrum.eigenvalues.dtype == ours.spectrum.vectors.dtype == torch.float32
        assert math.isfinite(ours.eigenvalue)
        assert ours.eigenvalue == pytest.approx(full.eigenvalue, rel=0.15)  # the forward pass ran in half


# 3. float32 weights under autocast


FAMILIES = ["hf_bert", "hf_llama", "residual_cnn"]


def float32_case(family):
    model, batches, loss_fn, *_ = BUILDERS[family]()
    return model.float(), cast(batches, torch.float32), loss_fn


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_and_insertion_under_cpu_autocast(family):
    model, batches, loss_fn = float32_case(family)
    plain = score_with_operators(model, batches, hta.ScoringConfig(), loss_fn)[0]
    with torch.autocast(**BF16_AUTOCAST):
        scores = score_with_operators(model, batches, hta.ScoringConfig(), loss_fn)[0]
        record = hta.insert_layer(copy.deepcopy(model), batches, hta.ScoringConfig(line_search_steps=4), loss_fn)
    assert [s.name for s in scores] == [s.name for s in plain]
    for ours, full in zip(scores, plain, strict=True):
        assert ours.spectrum.eigenvalues.dtype == ours.spectrum.vectors.dtype == torch.float32
        assert ours.eigenvalue == pytest.approx(full.eigenvalue, rel=3e-2)  # states and adjoints came in bf16
    assert record.accepted and record.position == max(plain, key=lambda s: s.eigenvalue).name
    assert record.measured_decrease > 0 and math.isfinite(record.eps)


@pytest.mark.parametrize("precision", ["bf16_weights", "autocast"])
def test_matrix_free_directions_in_bf16_reach_the_dense_objective_in_float32(precision):
    """The matrix-free ascent (token pairs, Lanczos products) works from a bf16 model or under autocast: its
    directions stay float32 and reach the dense ascent's objective, and the layer is inserted."""
    from hf_topoadapt.insertion import plan_directions

    model, batches, loss_fn = float32_case("hf_bert")
    if precision == "bf16_weights":
        model, batches = model.to(torch.bfloat16), cast(batches, torch.bfloat16)
    settings = {"directions": "optimized", "solver": "lanczos", "line_search_steps": 4}
    free_config = hta.ScoringConfig(**settings, optimize_solver="matrix_free")
    context = torch.autocast(**BF16_AUTOCAST) if precision == "autocast" else contextlib.nullcontext()
    with context:
        scores = score_with_operators(model, batches, free_config, loss_fn)[0]
        score = max(scores, key=lambda s: s.eigenvalue)
        assert score.operator.matrix_free
        free = plan_directions(score, free_config)
        dense = plan_directions(score, hta.ScoringConfig(**settings))
        record = hta.insert_layer(copy.deepcopy(model), batches, free_config, loss_fn)
    assert free.down.dtype == free.up.dtype == torch.float32
    assert free.value == pytest.approx(dense.value, rel=1e-3)
    assert record.accepted and record.directions in ("optimized", "coordinate") and math.isfinite(record.eps)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_model_under_cpu_autocast_adapts_trains_and_round_trips(family, tmp_path):
    model, batches, loss_fn = float32_case(family)
    settings = {"modules_to_save": ["classifier"]} if family == "hf_bert" else {}
    with torch.autocast(**BF16_AUTOCAST):
        peft_model = hta.get_topo_model(model, config(**settings), calibration_data=batches, loss_fn=loss_fn)
    # bf16 losses resolve ~0.4%: a second layer's smaller decrease may not be measurable, the first one's is
    accepted = [i for i in peft_model.topo_report.insertions if i["accepted"]]
    assert 1 <= len(accepted) <= 2 and all(i["measured_decrease"] > 0 for i in accepted)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())

    seen = []  # (input dtype, output dtype) of every topo layer call
    handles = [
        m.register_forward_hook(lambda _, args, out: seen.append((args[0].dtype, out.dtype)))
        for m in peft_model.modules()
        if isinstance(m, TopoLayer)
    ]
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        with torch.autocast(**BF16_AUTOCAST):
            loss = loss_of(peft_model, batches[step % 2], loss_fn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for handle in handles:
        handle.remove()
    assert seen and all(dtype_in == dtype_out for dtype_in, dtype_out in seen)
    assert all(math.isfinite(x) for x in losses) and sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())  # autocast changed no weight

    peft_model.eval()
    with torch.no_grad():
        trained = logits(peft_model, batches)
    peft_model.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(float32_case(family)[0], str(tmp_path))
    with torch.no_grad():
        assert torch.equal(logits(loaded, batches), trained)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA autocast)")
def test_cuda_autocast_scores_inserts_and_trains():
    model, batches, *_ = BUILDERS["hf_llama"]()
    model = model.float().cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores = hta.score_positions(model, batches)
        peft_model = hta.get_topo_model(model, config(), calibration_data=batches)
    assert all(math.isfinite(s.eigenvalue) for s in scores) and peft_model.topo_report.chosen
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(**batches[step % 2]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_residual_cnn_in_bf16_adapts_and_trains():
    """The conv layout in bf16 weights (tuple batches and a loss_fn)."""
    model, batches, loss_fn, *_ = BUILDERS["residual_cnn"]()
    model = model.to(torch.bfloat16)
    batches = cast(batches, torch.bfloat16)
    peft_model = hta.get_topo_model(model, config(num_adapters=1), calibration_data=batches, loss_fn=loss_fn)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        loss = F.cross_entropy(peft_model(batches[step % 2][0]).float(), batches[step % 2][1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and sum(losses[-2:]) < sum(losses[:2]), losses
    (layer,) = [m for m in peft_model.modules() if isinstance(m, TopoLayer)]
    assert layer.layout == "channels" and layer.topo_down["default"].weight.dtype == torch.float32
    with torch.no_grad():
        assert peft_model(batches[0][0]).dtype == torch.bfloat16


def test_bf16_causal_lm_generates_and_reloads(tmp_path):
    model, batches, *_ = BUILDERS["hf_llama"]()
    model = model.to(torch.bfloat16)
    adapted = hta.get_topo_model(model, config(task_type="CAUSAL_LM"), calibration_data=batches)
    prompt = batches[0]["input_ids"][:, :3]

    def generate(m, use_cache):
        out = m.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
            do_sample=False, use_cache=use_cache, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    for use_cache in (True, False):
        tokens, scores = generate(adapted, use_cache)
        assert tokens.shape == (3, 7) and torch.isfinite(scores).all()
    adapted.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(BUILDERS["hf_llama"]()[0].to(torch.bfloat16), str(tmp_path))
    tokens, scores = generate(adapted, use_cache=True)
    again_tokens, again_scores = generate(loaded, use_cache=True)
    assert torch.equal(again_tokens, tokens) and torch.equal(again_scores, scores)
