"""What `hf-topoadapt score` shows and writes: the ranked table, the markdown report and the bar chart."""

from __future__ import annotations

from pathlib import Path

from .models import CAUSAL_LM, IMAGE, TEXT

UNITS = {TEXT: "texts", IMAGE: "images", CAUSAL_LM: "sequences"}


def ranked(scores: list) -> list:
    return sorted(scores, key=lambda score: score.eigenvalue, reverse=True)


def _tokens(score) -> str:
    return str(score.tokens) if score.tokens_used in (0, score.tokens) else f"{score.tokens_used}/{score.tokens}"


TABLE_HEADER = ("rank", "position", "depth", "eigenvalue", "neurons", "tokens", "solver")


def table_rows(scores: list) -> list[tuple[str, ...]]:
    rows = []
    for rank, score in enumerate(ranked(scores), start=1):
        rows.append(
            (
                str(rank),
                score.name,
                str(score.index),
                f"{score.eigenvalue:.6g}",
                str(len(score.neurons)),
                _tokens(score),
                score.solver,
            )
        )
    return rows


def format_table(scores: list) -> str:
    """The positions ranked by eigenvalue, the best one marked with '<- best'."""
    rows = table_rows(scores)
    widths = [max(len(row[i]) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    left = {1, 6}  # names and solver read better left-aligned

    def line(row):
        cells = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [line(TABLE_HEADER), line(tuple("-" * width for width in widths))]
    for rank, row in enumerate(rows, start=1):
        lines.append(line(row) + ("  <- best" if rank == 1 else ""))
    return "\n".join(lines)


TABLE_LEGEND = (
    "depth: 0 is after the embeddings, l after block l, then positions inside an MLP head.\n"
    "neurons: those the eps_s rule keeps for a new layer.\n"
    "tokens: used by the solver / seen when they differ (tokens the loss does not depend on, such as padding,\n"
    "add nothing; beyond --max-tokens a uniform subsample is used)."
)


def best_note(scores: list) -> str:
    best = ranked(scores)[0]
    if best.eigenvalue <= 0:
        return "No position has a positive eigenvalue: no new layer lowers the loss to second order."
    return (
        f"Best position: {best.name} (depth {best.index}), eigenvalue {best.eigenvalue:.6g}: a layer inserted there "
        f"with step eps lowers the calibration loss by about (eps^2 / 2) * {best.gain:.6g} "
        f"with {len(best.neurons)} neurons."
    )


def data_summary(meta: dict) -> str:
    """'64 texts, 4 labels, max length 64, batch size 16' (labels and length where the task has them)."""
    parts = [f"{meta['num_examples']} {UNITS.get(meta.get('task'), 'examples')}"]
    if meta.get("num_labels"):
        parts.append(f"{meta['num_labels']} labels")
    if meta.get("max_length"):
        parts.append(f"max length {meta['max_length']}")
    parts.append(f"batch size {meta['batch_size']}")
    return ", ".join(parts)


def markdown_report(scores: list, meta: dict) -> str:
    rows = table_rows(scores)
    lines = [
        "# Topological-derivative scores",
        "",
        f"- model: `{meta['model']}`" + (f" ({meta['task']})" if meta.get("task") else ""),
        f"- calibration data: {meta['data']} ({data_summary(meta)})",
        f"- solver: {meta['config']['solver']}",
        "",
        "Positions ranked by eigenvalue (the largest eigenvalue of the topological derivative; larger means a new "
        "layer there lowers the loss more).",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---:" if i not in (1, 6) else "---" for i in range(len(TABLE_HEADER))) + "|",
    ]
    for rank, row in enumerate(rows, start=1):
        cells = list(row)
        cells[1] = f"`{cells[1]}`" + (" **best**" if rank == 1 else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", TABLE_LEGEND, "", best_note(scores), ""]
    return "\n".join(lines)


def plot_scores(scores: list, path: Path, title: str) -> None:
    """Bar chart of the eigenvalue by depth, the best position highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ordered = sorted(scores, key=lambda score: score.index)
    best = ranked(scores)[0].name
    figure, axes = plt.subplots(figsize=(max(6.0, 0.55 * len(ordered) + 2.0), 4.0))
    colors = ["tab:orange" if score.name == best else "tab:blue" for score in ordered]
    axes.bar([score.index for score in ordered], [score.eigenvalue for score in ordered], color=colors)
    axes.set_xticks([score.index for score in ordered])
    axes.set_xticklabels([score.name for score in ordered], rotation=45, ha="right", fontsize=8)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("position (depth order)")
    axes.set_ylabel("eigenvalue (topological derivative)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
