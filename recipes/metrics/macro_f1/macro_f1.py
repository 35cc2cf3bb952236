"""Macro-averaged F1: the unweighted mean over classes of 2 TP / (2 TP + FP + FN), over every class that occurs in
the references or the predictions (scikit-learn's f1_score(average="macro")). A local `evaluate` metric module, so
recipes work offline: `evaluate.load("recipes/metrics/macro_f1")`."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Macro F1 = mean over classes of the per-class F1 score; every class counts the same."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
Returns:
    macro_f1 (`float`): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        scores = []
        for label in np.union1d(predictions, references):
            true_positive = np.sum((predictions == label) & (references == label))
            false_positive = np.sum((predictions == label) & (references != label))
            false_negative = np.sum((predictions != label) & (references == label))
            scores.append(2 * true_positive / (2 * true_positive + false_positive + false_negative))
        return {"macro_f1": float(np.mean(scores)) if scores else float("nan")}
