"""GPU check: scoring on CUDA agrees with the CPU (float64, every tiny family) and GPU speed figures.

Run on a machine with a GPU: `python benchmarks/gpu_check.py OUT_DIR`. Writes OUT_DIR/scoring_gpu.json and
scoring_gpu.md (copied to benchmarks/results/ by hand) and prints the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import BUILDERS  # noqa: E402

import hf_topoadapt as hta  # noqa: E402
from hf_topoadapt.sensitivity.operators import TokenPairs  # noqa: E402
from hf_topoadapt.sensitivity.solvers import lanczos_spectrum  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def correctness() -> list[dict]:
    rows = []
    for name, build in BUILDERS.items():
        try:
            model, batches, loss_fn, *_ = build()
        except ImportError as error:  # timm may be missing on the GPU image
            rows.append({"model": name, "skipped": str(error)})
            continue
        cpu = hta.score_positions(model, batches, loss_fn=loss_fn)
        gpu = hta.score_positions(model.cuda(), batches, loss_fn=loss_fn)
        worst = max(abs(g.eigenvalue / c.eigenvalue - 1) for c, g in zip(cpu, gpu, strict=True))
        record = hta.insert_layer(model, batches, loss_fn=loss_fn)
        rows.append(
            {
                "model": name,
                "positions": len(cpu),
                "max_rel_diff_eigenvalue": worst,
                "inserted": record.position if record.accepted else None,
                "measured_decrease": record.measured_decrease,
            }
        )
    return rows


def text_case(count=256, length=64, batch=32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=4,
    )
    model = BertForSequenceClassification(config)
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
    return "MiniLM-sized BERT (384 hidden, 6 layers), 256 x 64 tokens", model, batches


def vit_case(count=256, batch=32):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=4,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    images = torch.randn(count, 3, 32, 32)
    labels = torch.randint(0, 10, (count,))
    batches = [{"pixel_values": images[i : i + batch], "labels": labels[i : i + batch]} for i in range(0, count, batch)]
    return "ViT-Tiny-sized (192 hidden, 12 layers), 256 images 32x32", model, batches


def train_pass(model, batches) -> None:
    model.train()
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def best_time(fn, repeats=3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def speed() -> list[dict]:
    rows = []
    for build in (text_case, vit_case):
        name, model, batches = build()
        model = model.cuda()
        batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
        train = best_time(lambda model=model, batches=batches: train_pass(model, batches))
        score = best_time(lambda model=model, batches=batches: hta.score_positions(model, batches))
        bf16 = model.to(torch.bfloat16)
        bf16_batches = [
            {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in b.items()} for b in batches
        ]
        bf16_scores = hta.score_positions(bf16, bf16_batches)
        rows.append(
            {
                "model": name,
                "train_pass_s": train,
                "scoring_s": score,
                "ratio": score / train,
                "bf16_best_position": max(bf16_scores, key=lambda s: s.eigenvalue).name,
            }
        )
    return rows


def wide_position(width=768, tokens=16384) -> dict:
    generator = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(tokens, width, generator=generator), torch.ones(tokens, 1)], 1).cuda()
    p = (torch.randn(tokens, width, generator=generator) * 1e-3).cuda()
    operator = TokenPairs(z, p, 1.0)
    seconds = best_time(lambda: lanczos_spectrum(operator, generator=torch.Generator().manual_seed(0)), repeats=2)
    return {
        "width": width,
        "tokens": tokens,
        "seconds": seconds,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "correctness": correctness(),
        "speed": speed(),
        "wide_position": wide_position(),
    }
    (out / "scoring_gpu.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Scoring on GPU ({results['device']}, torch {results['torch']})",
        "",
        "## CUDA vs CPU (float64 tiny models, default settings)",
        "",
        "| model | positions | max rel. diff of eigenvalues | insert_layer on CUDA | measured decrease |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["correctness"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['positions']} | {r['max_rel_diff_eigenvalue']:.1e} | {r['inserted']} | "
            f"{r['measured_decrease']:.3g} |"
        )
    lines += [
        "",
        "## Scoring time / one training pass (float32, fastest of 3)",
        "",
        "| model | train pass (s) | scoring (s) | ratio | best position in bf16 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["speed"]:
        lines.append(
            f"| {r['model']} | {r['train_pass_s']:.3f} | {r['scoring_s']:.3f} | **{r['ratio']:.2f}** | "
            f"{r['bf16_best_position']} |"
        )
    w = results["wide_position"]
    lines += [
        "",
        f"One position, d = {w['width']}, {w['tokens']} tokens (Lanczos, float32): {w['seconds']:.3f} s, "
        f"peak GPU memory {w['peak_gpu_mb']:.0f} MB.",
    ]
    (out / "scoring_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
