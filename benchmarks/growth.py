"""Growing a residual MLP from scratch on scikit-learn's diabetes regression (METHOD.md section 7).

Every method starts from the same one-hidden-layer ResidualMLP (stem only, no blocks), trains with Adam
for the same total number of epochs and may insert a layer at the end of each stage of Proposed (I)'s
schedule. "fixed" is the network of the final size of the topological run (same layer shapes), freshly
initialised and trained from scratch for the same epochs. Small training set (the low-data regime of the
paper's claims); targets and features standardised with training statistics.

Writes benchmarks/results/growth{_quick}.{md,json,png}: mean +- std test MSE over seeds, final depth,
parameters, wall time and the fraction of it spent scoring and inserting; the PNG shows validation-loss
curves with the insertions marked.

Run:  .venv/bin/python benchmarks/growth.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from hf_topoadapt.growth import GrowthConfig, ResidualMLP, evaluate, grow, rebuild  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def diabetes_splits(seed: int, train_size: int, val_size: int, batch_size: int):
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)[:, None]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val, test = order[:train_size], order[train_size : train_size + val_size], order[train_size + val_size :]
    mean_x, std_x = x[train].mean(0), x[train].std(0)
    mean_y, std_y = y[train].mean(), y[train].std()
    x, y = (x - mean_x) / std_x, (y - mean_y) / std_y

    def batches(index, size):
        return [(x[index[i : i + size]], y[index[i : i + size]]) for i in range(0, len(index), size)]

    return batches(train, batch_size), batches(val, len(val)), batches(test, len(test))


def reinitialise_new_layers(model: ResidualMLP, generator: torch.Generator) -> None:
    """The fixed baseline's extra layers: ordinary random init (rebuild leaves them at zero, and a zero D is dead)."""
    with torch.no_grad():
        for block in model.blocks:
            fan_in = block.down.weight.shape[1]
            block.down.weight.copy_(torch.randn(block.down.weight.shape, generator=generator) * fan_in**-0.5)
            block.up.copy_(torch.randn(block.up.shape, generator=generator) * block.num_neurons**-0.5)


def run(method: str, seed: int, settings: dict, fixed_shapes: dict | None = None) -> dict:
    train, val, test = diabetes_splits(seed, settings["train_size"], settings["val_size"], settings["batch_size"])
    torch.manual_seed(seed)
    model = ResidualMLP(10, 1, width=settings["width"], depth=0).double()
    if method == "fixed":
        rebuild(model, fixed_shapes)
        reinitialise_new_layers(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    config = GrowthConfig(
        method=method,
        schedule=[settings["stage_epochs"]] if method != "fixed" else None,
        max_insertions=settings["insertions"],
        calibration_batches=None,
        neurons=settings["neurons"],
        seed=seed,
        scoring={"max_neurons": settings["neurons"]},
    )
    start = time.perf_counter()
    grower, history = grow(
        model,
        train,
        val,
        F.mse_loss,
        optimizer,
        None,
        config,
        epochs=settings["epochs"],
        epoch_callback=lambda epoch, model: {"test_loss": evaluate(model, test, F.mse_loss)},
    )
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seed": seed,
        "test_mse": history[-1]["test_loss"],
        # Early stopping on the validation set: the test error at the epoch of the lowest validation error.
        "test_mse_at_best_val": min(history, key=lambda h: h["val_loss"])["test_loss"],
        "val_mse": history[-1]["val_loss"],
        "depth": model.depth,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "growth_fraction": grower.growth_seconds / seconds,
        "val_curve": [h["val_loss"] for h in history],
        "insertion_epochs": [e["epoch"] for e in grower.log if e["accepted"]],
        "positions": [e["position"] for e in grower.log if e["accepted"]],
        "neurons": [e.get("neurons") for e in grower.log if e["accepted"]],
        "growth_state": grower.state_dict() if method == "topological" else None,
    }


def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]

        def stat(key, mine=mine):
            values = [r[key] for r in mine]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        rows.append(
            {
                "method": method,
                "test_mse": stat("test_mse"),
                "test_mse_at_best_val": stat("test_mse_at_best_val"),
                "depth": stat("depth"),
                "params": stat("params"),
                "seconds": stat("seconds"),
                "growth_fraction": stat("growth_fraction"),
            }
        )
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in (r for r in runs if r["seed"] == runs[0]["seed"]):
        (line,) = ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], label=r["method"])
        for epoch in r["insertion_epochs"]:
            ax.axvline(epoch, color=line.get_color(), linestyle=":", alpha=0.6)
            ax.plot([epoch], [r["val_curve"][int(epoch) - 1]], "o", color=line.get_color())
    ax.set(xlabel="epoch", ylabel="validation MSE (standardised)", yscale="log", title="diabetes, seed 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 methods, under 3 minutes on 2 cores")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dict(
        train_size=100, val_size=60, batch_size=20, width=16, neurons=8, lr=1e-3, stage_epochs=25, insertions=4
    )
    settings["epochs"] = settings["stage_epochs"] * (settings["insertions"] + 1)
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    methods = ["topological", "random", "net2deeper", "fixed"]
    if not args.quick:
        methods[3:3] = ["sensli", "td_random", "td_zero"]
    runs = []
    for seed in seeds:
        proposed = run("topological", seed, settings)
        runs.append(proposed)
        for method in methods[1:]:
            runs.append(run(method, seed, settings, fixed_shapes=proposed["growth_state"]))
        print(f"seed {seed}: " + ", ".join(f"{r['method']} {r['test_mse']:.4f}" for r in runs if r["seed"] == seed))
    rows = summarise(runs, methods)
    name = "growth_quick" if args.quick else "growth"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in runs:
        r.pop("growth_state")
    meta = {"settings": settings, "seeds": seeds, "torch": torch.__version__, "machine": platform.processor() or "cpu"}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2))
    lines = [
        "# Growing a residual MLP on diabetes (scikit-learn)",
        "",
        f"Train {settings['train_size']}, validation {settings['val_size']}, test the remaining "
        f"{442 - settings['train_size'] - settings['val_size']} samples; standardised MSE; seeds {seeds}. "
        f"Width {settings['width']}, start depth 0, up to {settings['insertions']} insertions (one every "
        f"{settings['stage_epochs']} epochs, Proposed (I)), {settings['epochs']} epochs in all, "
        f"Adam lr {settings['lr']}, "
        f"new layers of <= {settings['neurons']} neurons. 'fixed' = the topological run's final architecture, "
        "freshly initialised, trained from scratch for the same epochs. CPU, 1 thread, float64.",
        "",
        "| method | final test MSE (mean +- std) | test MSE at best val epoch | final depth | params | wall s "
        "| scoring+insertion share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        mse, best, depth, params = row["test_mse"], row["test_mse_at_best_val"], row["depth"], row["params"]
        lines.append(
            f"| {row['method']} | {mse[0]:.4f} +- {mse[1]:.4f} | {best[0]:.4f} +- {best[1]:.4f} | "
            f"{depth[0]:.1f} | {params[0]:.0f} | "
            f"{row['seconds'][0]:.2f} | {100 * row['growth_fraction'][0]:.1f}% |"
        )
    lines += ["", f"Loss curves (seed {seeds[0]}, dots = insertions): `{name}.png`.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    plot(runs, RESULTS / f"{name}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
