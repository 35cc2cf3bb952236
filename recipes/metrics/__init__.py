"""Metrics through `evaluate`: the modules shipped here (accuracy, macro_f1) load from their local folders, so the
recipes work offline; any other name is an `evaluate` Hub metric (online)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = ("accuracy", "macro_f1")
DEFAULT_METRICS = SHIPPED


def metric_path(name: str) -> str:
    """The local folder of a shipped metric, or the name itself (a Hub metric or a path the user gave)."""
    return os.path.join(HERE, name) if name in SHIPPED else name


def load_metrics(names: Sequence[str] = DEFAULT_METRICS):
    """`evaluate.combine` of the named metrics; a clear error when a Hub metric cannot be fetched."""
    import evaluate

    modules = []
    for name in names:
        try:
            modules.append(evaluate.load(metric_path(name)))
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise ValueError(
                f"cannot load the metric {name!r} ({type(error).__name__}): the shipped metrics are {list(SHIPPED)}; "
                "other names are fetched from the Hub, which needs a connection"
            ) from None
    return evaluate.combine(modules)


def classification_metrics(names: Sequence[str] = DEFAULT_METRICS) -> Callable:
    """A Trainer `compute_metrics`: the combined metrics of the argmax predictions against the labels."""
    combined = load_metrics(names)

    def compute(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(-1)
        return combined.compute(predictions=predictions, references=np.asarray(eval_prediction.label_ids))

    return compute
