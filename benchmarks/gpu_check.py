"""GPU check: scoring on CUDA agrees with the CPU, and how scoring, get_topo_model and training compare at scale.

One prepared run (about 5 to 8 minutes on an H200), every model built from a config with random init:

1. correctness: every tiny test family scored on CUDA and on the CPU (float64, default settings), insert_layer on
   CUDA, and get_topo_model inside torch.autocast('cuda', bfloat16) (issue 10: eigh on bfloat16 raised).
2. ratio: score_positions / one training pass (forward + backward of all parameters) over the same batches, with
   the profiler's figures of one scoring call (CPU and GPU time, kernel launches, stream synchronisations, item()
   calls, host-bound operators): MiniLM- and ViT-Tiny-sized (float32), ViT-B/16 at 224 px with 4 x 64 images and a
   1.1B Llama config (hidden 2048, 16 layers) with 4 x 8 x 512 tokens (bfloat16).
3. position: one d = 4096 position with 65,536 noise-like pairs: Lanczos on every token in float32 and TF32, the
   default settings (blocks ranked on a token sample, the best refined on every token), and the old fixed
   8192-token cap; TF32 accuracy against float32.
4. cap: ViT-B's eigenvalues and ranking under the default settings and the old 8192-token cap against every token,
   and the TF32 products' effect on every position.
5. vit_b: time and peak memory of score_positions, get_topo_model(3) (bfloat16, float32, float32 under bfloat16
   autocast) and one training step (forward, backward, AdamW) of the TopoModel, LoRA r=8 on the query and value
   projections, and full fine-tuning.

Run:  PYTHONPATH=$PWD python3 benchmarks/gpu_check.py OUT_DIR          (on the GPU machine)
      .venv/bin/python benchmarks/gpu_check.py OUT_DIR --device cpu --quick   (tiny sizes: a smoke test of the script)
Writes OUT_DIR/scoring_gpu.json and OUT_DIR/scoring_gpu.md after every section (copy them to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import hf_topoadapt as hta  # noqa: E402
from hf_topoadapt.scoring import position_generator, score_round, solve  # noqa: E402
from hf_topoadapt.sensitivity.operators import TokenPairs  # noqa: E402
from hf_topoadapt.sensitivity.solvers import lanczos_spectrum  # noqa: E402

TARGET_RATIO = 1.0  # scoring / training pass (issue 10); 2.0 as a first step
TARGET_POSITION_S = 0.5  # d = 4096, 64k tokens, every token
TARGET_TF32 = 1e-3  # largest relative difference of a top eigenvalue, TF32 against float32 products
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
CPU_WAITS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique2",
    "aten::masked_select",
    "aten::_linalg_eigh",
)


class Check:
    """Settings of one run: the device, sizes (quick or full), and where results go."""

    def __init__(self, device: str, quick: bool, out: Path):
        self.device, self.quick, self.out = torch.device(device), quick, out
        self.cuda = self.device.type == "cuda"
        self.results: dict = {"device": torch.cuda.get_device_name(0) if self.cuda else "cpu", "quick": quick}
        self.results["torch"] = torch.__version__
        self.start = time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def best_time(self, fn, repeats: int = 3) -> float:
        fn()  # warm-up
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return min(times)

    def peak(self, fn) -> tuple[float, float]:
        """(seconds, peak allocated GB) of one call after a warm-up."""
        fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        self.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return seconds, peak

    def profile(self, fn) -> dict:
        """The profiler's figures of one call: CPU vs GPU time, launches, synchronisations, host-bound operators."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            fn()
            self.sync()
        events = prof.events()
        names = collections.Counter(e.name for e in events)
        averages = prof.key_averages()
        device_time = sum(getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0)) for a in averages)
        return {
            "cpu_ms": sum(a.self_cpu_time_total for a in averages) / 1e3,
            "gpu_ms": device_time / 1e3,
            "kernel_launches": sum(names[n] for n in LAUNCHES),
            "stream_syncs": sum(names[n] for n in HOST_WAITS),
            "item_calls": names["aten::item"],
            "host_bound_ops": sum(names[n] for n in CPU_WAITS),
            "aten_ops": sum(c for n, c in names.items() if n.startswith("aten::")),
        }

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["wall_s"] = time.perf_counter() - self.start
        (self.out / "scoring_gpu.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "scoring_gpu.md").write_text(render(self.results))

    def section(self, name: str, fn) -> None:
        print(f"== {name} ({time.perf_counter() - self.start:.0f} s in)", flush=True)
        try:
            self.results[name] = fn(self)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others' figures
            self.results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            print(self.results[name]["traceback"], flush=True)
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()


def to_device(batches, device, dtype=None):
    def move(v):
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            return v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return v

    return [{k: move(v) for k, v in b.items()} if isinstance(b, dict) else tuple(move(v) for v in b) for b in batches]


# ---------------------------------------------------------------------------------------------- 1. correctness


def correctness(check: Check) -> dict:
    from models import BUILDERS

    rows = []
    for name, build in BUILDERS.items():
        try:
            model, batches, loss_fn, *_ = build()
        except ImportError as error:  # timm may be missing
            rows.append({"model": name, "skipped": str(error)})
            continue
        cpu = hta.score_positions(model, batches, loss_fn=loss_fn)
        device_model = model.to(check.device)
        on_device = hta.score_positions(device_model, batches, loss_fn=loss_fn)
        worst = max(abs(g.eigenvalue / c.eigenvalue - 1) for c, g in zip(cpu, on_device, strict=True))
        record = hta.insert_layer(device_model, batches, loss_fn=loss_fn)
        rows.append(
            {
                "model": name,
                "positions": len(cpu),
                "max_rel_diff_eigenvalue": worst,
                "inserted": record.position if record.accepted else None,
                "measured_decrease": record.measured_decrease,
            }
        )
    # get_topo_model under the user's bfloat16 autocast, on a float32 model (issue 10: eigh on bfloat16 raised)
    model, batches, loss_fn, *_ = BUILDERS["hf_vit"]()
    model = model.float().to(check.device)
    batches = to_device(batches, check.device, torch.float32)
    reference = hta.score_positions(model, batches)
    with torch.autocast(check.device.type, dtype=torch.bfloat16):
        scores = hta.score_positions(model, batches)
        adapted = hta.get_topo_model(copy.deepcopy(model), hta.TopoAdapterConfig(num_adapters=2), batches)
    autocast = {
        "get_topo_model_chosen": adapted.topo_report.chosen,
        "max_rel_diff_eigenvalue_bf16_autocast": max(
            abs(a.eigenvalue / b.eigenvalue - 1) for a, b in zip(scores, reference, strict=True)
        ),
    }
    return {"families": rows, "autocast": autocast}


# ---------------------------------------------------------------------------------------------- 2. ratio


def text_case(check: Check):
    from transformers import BertConfig, BertForSequenceClassification

    count, length, batch = (64, 32, 32) if check.quick else (256, 64, 32)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    if check.quick:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    config.num_labels = 4
    model = BertForSequenceClassification(config).to(check.device)
    ids = torch.randint(1000, 30000, (count, length))
    labels = torch.randint(0, 4, (count,))
    batches = [
        {
            "input_ids": ids[i : i + batch],
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "labels": labels[i : i + batch],
        }
        for i in range(0, count, batch)
    ]
    return (
        f"MiniLM-sized BERT ({config.hidden_size} hidden, {config.num_hidden_layers} layers), "
        f"{count} x {length} tokens",
        model,
        to_device(batches, check.device),
    )


def vit_tiny_case(check: Check):
    from transformers import ViTConfig, ViTForImageClassification

    count, batch = (64, 32) if check.quick else (256, 32)
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=192,
        num_hidden_layers=12 if not check.quick else 2,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=4,
        num_labels=10,
    )
    model = ViTForImageClassification(config).to(check.device)
    images, labels = torch.randn(count, 3, 32, 32), torch.randint(0, 10, (count,))
    batches = [{"pixel_values": images[i : i + batch], "labels": labels[i : i + batch]} for i in range(0, count, batch)]
    return (
        f"ViT-Tiny-sized (192 hidden, {config.num_hidden_layers} layers), {count} images 32x32",
        model,
        to_device(batches, check.device),
    )


def vit_base_case(check: Check, dtype=torch.bfloat16):
    """ViT-B/16 at 224 px, 4 batches of 64 images (quick: a 2-layer, 64-wide ViT at 32 px)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if check.quick:
        config, size, count, batch = (
            ViTConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                image_size=32,
                patch_size=8,
                num_labels=10,
            ),
            32,
            32,
            16,
        )
    else:
        config, size, count, batch = ViTConfig(image_size=224, patch_size=16, num_labels=10), 224, 256, 64
    with torch.device(check.device):
        model = ViTForImageClassification(config).to(dtype)
    images, labels = torch.randn(count, 3, size, size), torch.randint(0, 10, (count,))
    batches = [{"pixel_values": images[i : i + batch], "labels": labels[i : i + batch]} for i in range(0, count, batch)]
    name = f"ViT-B/16 at {size} px, {count // batch} x {batch} images" if not check.quick else "tiny ViT (quick)"
    return name, model, to_device(batches, check.device, dtype)


def llama_case(check: Check, dtype=torch.bfloat16):
    """A 1.1B Llama config: hidden 2048, 16 layers, 32 heads (8 key/value), MLP 8192, vocab 32000; 4 x 8 x 512
    tokens (quick: 2 layers of 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if check.quick:
        config = LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=128,
        )
        batches_n, batch, length = 2, 2, 32
    else:
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            max_position_embeddings=2048,
        )
        batches_n, batch, length = 4, 8, 512
    with torch.device(check.device):
        model = LlamaForCausalLM(config).to(dtype)
    batches = []
    for _ in range(batches_n):
        ids = torch.randint(0, config.vocab_size, (batch, length))
        batches.append({"input_ids": ids, "labels": ids.clone()})
    params = sum(p.numel() for p in model.parameters()) / 1e9
    return (
        f"Llama config ({params:.2f}B params, hidden {config.hidden_size}, {config.num_hidden_layers} layers), "
        f"{batches_n} x {batch} x {length} tokens",
        model,
        to_device(batches, check.device),
    )


def train_pass(model, batches) -> None:
    model.train()
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def ratio_row(check: Check, name: str, model, batches, repeats: int = 3) -> dict:
    for p in model.parameters():
        p.requires_grad_(True)
    train = check.best_time(lambda: train_pass(model, batches), repeats)
    score = check.best_time(lambda: hta.score_positions(model, batches), repeats)
    scores = hta.score_positions(model, batches)
    row = {
        "model": name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "train_pass_s": train,
        "scoring_s": score,
        "ratio": score / train,
        "positions": len(scores),
        "tokens_seen": max(s.tokens for s in scores),
        "tokens_used": max(s.tokens_used for s in scores),
        "best_position": max(scores, key=lambda s: s.eigenvalue).name,
        "profile_scoring": check.profile(lambda: hta.score_positions(model, batches)),
        "profile_training": check.profile(lambda: train_pass(model, batches)),
    }
    print(f"  {name}: train {train:.3f} s, score {score:.3f} s, ratio {row['ratio']:.2f}", flush=True)
    return row


def ratios(check: Check) -> list[dict]:
    rows = []
    for build in (text_case, vit_tiny_case, vit_base_case, llama_case):
        name, model, batches = build(check)
        rows.append(ratio_row(check, name, model, batches))
        model = batches = None  # free the model before the next one is built
        if check.cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- 3. one wide position


def wide_position(check: Check) -> dict:
    """One d = 4096 position with 65,536 noise-like pairs (quick: d = 256, 4096 pairs)."""
    width, tokens = (256, 4096) if check.quick else (4096, 65536)
    generator = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(tokens, width, generator=generator), torch.ones(tokens, 1)], 1).to(check.device)
    p = (torch.randn(tokens, width, generator=generator) * 1e-3 / tokens).to(check.device)
    operator = TokenPairs(z, p, 1.0)
    del z, p
    config = hta.ScoringConfig()

    def run(screen_tokens, tf32, op=operator):
        return lanczos_spectrum(
            op,
            64,
            config.lanczos_screen_iterations,
            config.lanczos_refine_iterations,
            16,
            generator=position_generator(0, "wide", device=check.device),
            screen_tokens=screen_tokens,
            tf32=tf32,
        )

    rows = {}
    reference = None
    for label, screen_tokens, tf32, op in (
        ("every token, float32", None, False, operator),
        ("every token, TF32 products", None, True, operator),
        (
            "default (blocks ranked on 8192 tokens, best refined on every token, TF32)",
            config.screen_tokens,
            True,
            operator,
        ),
        (
            "old cap: 8192-token subsample, float32",
            None,
            False,
            operator.token_subsample(8192, torch.Generator(check.device).manual_seed(1)),
        ),
    ):
        if check.cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = check.best_time(lambda s=screen_tokens, t=tf32, o=op: run(s, t, o), repeats=2)
        top = run(screen_tokens, tf32, op).top
        reference = top if reference is None else reference
        rows[label] = {
            "seconds": seconds,
            "top_eigenvalue": top,
            "relative_to_every_token_float32": top / reference - 1,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if check.cuda else float("nan"),
        }
        print(f"  {label}: {seconds:.3f} s, top {top:.6g}", flush=True)
    return {"width": width, "tokens": tokens, "rows": rows}


# ---------------------------------------------------------------------------------------------- 4. the cap on ViT-B


def cap_effect(check: Check) -> dict:
    name, model, batches = vit_base_case(check)
    reference_config = hta.ScoringConfig(screen_tokens=None, tf32_products=False)
    scored = score_round(model, batches, reference_config)
    reference = [s.eigenvalue for s in scored.scores]

    def solved(config, prepare=lambda op, g: op):
        values = []
        for s in scored.scores:
            op = prepare(s.operator, position_generator(1, s.name, device=s.operator.device))
            values.append(solve(op, config, position_generator(config.seed, s.name, device=op.device)).top)
        return values

    settings = {
        "default": solved(hta.ScoringConfig()),
        "default without TF32": solved(hta.ScoringConfig(tf32_products=False)),
        "old cap: 8192-token subsample": solved(reference_config, lambda op, g: op.token_subsample(8192, g)),
    }
    out = {
        "model": name,
        "positions": [s.name for s in scored.scores],
        "reference": reference,
        "tokens_seen": [s.tokens for s in scored.scores],
        "tokens_used": [s.tokens_used for s in scored.scores],
        "settings": {},
    }
    best = max(range(len(reference)), key=reference.__getitem__)
    for label, values in settings.items():
        ratios = [v / r for v, r in zip(values, reference, strict=True)]
        out["settings"][label] = {
            "eigenvalues": values,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "same_best": max(range(len(values)), key=values.__getitem__) == best,
            "same_order": sorted(range(len(values)), key=lambda i: -values[i])
            == sorted(range(len(reference)), key=lambda i: -reference[i]),
        }
        print(f"  {label}: ratio {min(ratios):.3f}..{max(ratios):.3f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 5. ViT-B end to end


def lora_targets(model) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def training_step(model, batch, parameters) -> callable:
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def vit_b(check: Check) -> dict:
    from peft import LoraConfig, get_peft_model

    out = {}
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
        label = str(dtype).removeprefix("torch.") + (" under bfloat16 autocast" if autocast else "")
        name, model, batches = vit_base_case(check, dtype)
        out["model"] = name
        context = torch.autocast(check.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            score_s, score_gb = check.peak(lambda model=model, batches=batches: hta.score_positions(model, batches))
            config = hta.TopoAdapterConfig(num_adapters=3, modules_to_save=["classifier"])
            if check.cuda:
                torch.cuda.reset_peak_memory_stats()
            check.sync()
            start = time.perf_counter()
            adapted = hta.get_topo_model(copy.deepcopy(model), config, batches)
            check.sync()
            topo_s = time.perf_counter() - start
            topo_gb = torch.cuda.max_memory_allocated() / 2**30 if check.cuda else float("nan")
        row = {
            "score_s": score_s,
            "score_peak_gb": score_gb,
            "get_topo_model_s": topo_s,
            "get_topo_model_peak_gb": topo_gb,
            "get_topo_model_scoring_passes": topo_s / score_s,
            "chosen": adapted.topo_report.chosen,
        }
        print(f"  {label}: score {score_s:.3f} s, get_topo_model(3) {topo_s:.2f} s", flush=True)
        if dtype == torch.bfloat16:  # training steps in the dtype users fine-tune in here
            steps = {}
            lora = get_peft_model(
                copy.deepcopy(model),
                LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(model), modules_to_save=["classifier"]),
            )
            full = copy.deepcopy(model)
            for method, trained in (
                ("topo (3 adapters)", adapted),
                ("LoRA r=8 (q, v)", lora),
                ("full fine-tuning", full),
            ):
                parameters = (
                    [p for p in trained.parameters() if p.requires_grad]
                    if method != "full fine-tuning"
                    else list(trained.parameters())
                )
                for p in parameters:
                    p.requires_grad_(True)
                seconds, peak = check.peak(training_step(trained, batches[0], parameters))
                steps[method] = {"step_s": seconds, "peak_gb": peak, "trainable": sum(p.numel() for p in parameters)}
                print(f"  training step, {method}: {seconds:.4f} s, peak {peak:.1f} GB", flush=True)
            row["training_steps"] = steps
            del lora, full
        out[label] = row
        if check.cuda:
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- report


def render(results: dict) -> str:
    lines = [
        f"# Scoring on {results['device']} (torch {results['torch']})"
        + (" -- quick smoke run" if results["quick"] else ""),
        "",
        "Produced by `benchmarks/gpu_check.py` in one run "
        f"({results.get('wall_s', 0):.0f} s); models built from configs with random init.",
    ]
    c = results.get("correctness")
    if c:
        lines += ["", "## 1. Device vs CPU (float64 tiny models, default settings)", ""]
        if "error" in c:
            lines.append(f"failed: {c['error']}")
        else:
            lines += [
                "| model | positions | max rel. diff of eigenvalues | insert_layer on device | measured decrease |",
                "| --- | --- | --- | --- | --- |",
            ]
            for r in c["families"]:
                if "skipped" in r:
                    lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | |")
                    continue
                lines.append(
                    f"| {r['model']} | {r['positions']} | {r['max_rel_diff_eigenvalue']:.1e} | {r['inserted']} | "
                    f"{r['measured_decrease']:.3g} |"
                )
            a = c["autocast"]
            lines += [
                "",
                f"Under torch.autocast(bfloat16), float32 tiny ViT: get_topo_model chose {a['get_topo_model_chosen']}; "
                f"eigenvalues within {a['max_rel_diff_eigenvalue_bf16_autocast']:.1e} of float32 scoring.",
            ]
    r = results.get("ratio")
    if r:
        lines += ["", "## 2. Scoring time / one training pass (fastest of 3)", ""]
        if isinstance(r, dict) and "error" in r:
            lines.append(f"failed: {r['error']}")
        else:
            lines += [
                "| model | dtype | tokens seen / used | train pass (s) | scoring (s) | ratio | scoring: CPU / GPU ms, "
                "launches, syncs, item() | training pass: CPU / GPU ms, launches, syncs |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for row in r:
                s, t = row["profile_scoring"], row["profile_training"]
                lines.append(
                    f"| {row['model']} | {row['dtype']} | {row['tokens_seen']} / {row['tokens_used']} | "
                    f"{row['train_pass_s']:.3f} | {row['scoring_s']:.3f} | **{row['ratio']:.2f}** (target <= "
                    f"{TARGET_RATIO:.0f}; 2 first) | {s['cpu_ms']:.0f} / {s['gpu_ms']:.0f}, {s['kernel_launches']}, "
                    f"{s['stream_syncs']}, {s['item_calls']} | {t['cpu_ms']:.0f} / {t['gpu_ms']:.0f}, "
                    f"{t['kernel_launches']}, {t['stream_syncs']} |"
                )
    w = results.get("position")
    if w:
        lines += ["", "## 3. One wide position", ""]
        if "error" in w:
            lines.append(f"failed: {w['error']}")
        else:
            lines += [
                f"d = {w['width']}, {w['tokens']} noise-like pairs (target: < {TARGET_POSITION_S} s on every token).",
                "",
                "| setting | time (s) | top eigenvalue | relative to every token, float32 | peak GB |",
                "| --- | --- | --- | --- | --- |",
            ]
            for label, row in w["rows"].items():
                lines.append(
                    f"| {label} | **{row['seconds']:.3f}** | {row['top_eigenvalue']:.6g} | "
                    f"{row['relative_to_every_token_float32']:+.1e} | {row['peak_gb']:.1f} |"
                )
    cap = results.get("cap")
    if cap:
        lines += ["", "## 4. The token cap's effect on ViT-B (eigenvalue / every token, float32 products)", ""]
        if "error" in cap:
            lines.append(f"failed: {cap['error']}")
        else:
            lines += [
                f"{cap['model']}; tokens seen / used per position: {max(cap['tokens_seen'])} / "
                f"{max(cap['tokens_used'])}.",
                "",
                "| setting | ratio min..max | same best position | same order |",
                "| --- | --- | --- | --- |",
            ]
            for label, s in cap["settings"].items():
                lines.append(
                    f"| {label} | **{s['ratio_min']:.4f}..{s['ratio_max']:.4f}** | "
                    f"{'yes' if s['same_best'] else 'NO'} | {'yes' if s['same_order'] else 'no'} |"
                )
    v = results.get("vit_b")
    if v:
        lines += ["", "## 5. ViT-B/16: scoring, get_topo_model(3) and a training step", ""]
        if "error" in v:
            lines.append(f"failed: {v['error']}")
        else:
            lines += [
                f"{v['model']}.",
                "",
                "| dtype | score_positions (s, peak GB) | get_topo_model(3) (s, peak GB) | "
                "in scoring passes | chosen |",
                "| --- | --- | --- | --- | --- |",
            ]
            for label, row in v.items():
                if not isinstance(row, dict):
                    continue
                lines.append(
                    f"| {label} | {row['score_s']:.3f}, {row['score_peak_gb']:.1f} | {row['get_topo_model_s']:.2f}, "
                    f"{row['get_topo_model_peak_gb']:.1f} | **{row['get_topo_model_scoring_passes']:.2f}** | "
                    f"{', '.join(row['chosen'])} |"
                )
            steps = v.get("bfloat16", {}).get("training_steps", {})
            if steps:
                lines += [
                    "",
                    "| one training step (bfloat16, one batch) | time (s) | peak GB | trainable parameters |",
                    "| --- | --- | --- | --- |",
                ]
                for method, row in steps.items():
                    lines.append(f"| {method} | {row['step_s']:.4f} | {row['peak_gb']:.1f} | {row['trainable']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for scoring_gpu.json and scoring_gpu.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--sections", default="correctness,ratio,position,cap,vit_b", help="comma-separated subset")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick to smoke-test the script")
    check = Check(args.device, args.quick, args.out)
    sections = {
        "correctness": correctness,
        "ratio": ratios,
        "position": wide_position,
        "cap": cap_effect,
        "vit_b": vit_b,
    }
    for name in args.sections.split(","):
        check.section(name, sections[name])
    print(render(check.results))


if __name__ == "__main__":
    main()
