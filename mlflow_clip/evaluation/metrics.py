"""Scoring a classifier on labelled images: top-1 and top-k accuracy, per-class precision and
recall, macro F1, the confusion matrix and the per-image table.

    >>> evaluation = evaluate_classifier(classifier, items)  # doctest: +SKIP
    >>> evaluation.accuracy_top1  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from mlflow_clip.evaluation.data import EvaluationError, LabelledImage, listing

_logger = logging.getLogger(__name__)

TOP_K = 5
DEFAULT_BATCH_SIZE = 32


class Scorer(Protocol):
    """What evaluation needs of a classifier: `ZeroShotClassifier`, or anything shaped like it."""

    @property
    def classes(self) -> list[str]: ...

    def predict(self, images: Any, top_k: int = 0, on_error: str = "raise") -> pd.DataFrame: ...


@dataclass
class ZeroShotEvaluation:
    """Scores of one classifier on one labelled set. Accuracy, precision and recall are over
    the images that could be scored; `failed` lists the others with their reasons."""

    classes: list[str]
    top_k: int
    accuracy_top1: float
    accuracy_topk: float
    macro_f1: float
    confusion: np.ndarray  # [true class, predicted class] counts
    per_class: pd.DataFrame  # class, support, predicted, precision, recall, f1
    predictions: pd.DataFrame  # path, true_label, predicted_label, score, correct, in_top_k, error
    failed: list[dict[str, str]]
    items: list[LabelledImage] = field(default_factory=list, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.predictions)

    @property
    def num_scored(self) -> int:
        return self.num_images - len(self.failed)

    @property
    def accuracy_top5(self) -> float:
        """Top-5 accuracy (top-k with k = min(5, number of classes))."""
        return self.accuracy_topk

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """`accuracy_top1`, `accuracy_top5`, `macro_f1`, `failed_images`, and `precision_<class>`
        / `recall_<class>` for every class that occurs in the truth or the predictions."""
        out = {
            "accuracy_top1": self.accuracy_top1,
            "accuracy_top5": self.accuracy_topk,
            "macro_f1": self.macro_f1,
            "failed_images": float(len(self.failed)),
        }
        for key, row in zip(metric_keys(self.classes), self.per_class.itertuples()):
            if row.support or row.predicted:
                out[f"precision_{key}"] = float(row.precision)
                out[f"recall_{key}"] = float(row.recall)
        return {prefix + name: value for name, value in out.items()}


def evaluate_classifier(
    classifier: Scorer,
    items: Sequence[LabelledImage],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> ZeroShotEvaluation:
    """Score `items` in batches with `on_error="null"` and compute the metrics.

    Images that cannot be read or decoded are counted and listed in `.failed`, not fatal.

        >>> classifier = mlflow_clip.load_model("models:/clip-zero-shot/3")  # doctest: +SKIP
        >>> items = load_labelled_images("val", classifier.classes)  # doctest: +SKIP
        >>> evaluation = evaluate_classifier(classifier, items)  # doctest: +SKIP
    """
    if batch_size < 1:
        raise EvaluationError(f"Received batch_size={batch_size}; expected a whole number of at least 1.")
    classes = list(classifier.classes)
    k = min(TOP_K, len(classes))
    rows: list[dict[str, Any]] = []
    with _progress(len(items), progress) as advance:
        for start in range(0, len(items), batch_size):
            rows.extend(_score_batch(classifier, items[start : start + batch_size], k))
            advance(min(batch_size, len(items) - start))
    return summarize(classes, list(items), rows, k)


def _score_batch(classifier: Scorer, batch: Sequence[LabelledImage], k: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"label": None, "score": None, "top_labels": None, "error": None} for _ in batch]
    payloads = {}
    for i, item in enumerate(batch):
        try:
            payloads[i] = item.read()
        except OSError as e:
            rows[i]["error"] = f"could not read the file: {e.strerror or type(e).__name__}"
    if payloads:
        out = classifier.predict(list(payloads.values()), top_k=k, on_error="null")
        for i, row in zip(payloads, out.to_dict("records")):
            rows[i] = {name: row.get(name) for name in ("label", "score", "top_labels", "error")}
    return rows


def summarize(
    classes: Sequence[str], items: Sequence[LabelledImage], rows: Sequence[Mapping[str, Any]], k: int
) -> ZeroShotEvaluation:
    """The metrics from per-image outputs (`label`, `score`, `top_labels`, `error`), one per item."""
    index = {name: i for i, name in enumerate(classes)}
    ok = [_is_scored(row) for row in rows]
    if not any(ok):
        reasons = "; ".join(f"{item.name}: {row.get('error')}" for item, row in list(zip(items, rows))[:5])
        raise EvaluationError(f"None of the {len(items)} images could be scored ({reasons}); check the data.")
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    in_top_k = []
    for item, row, good in zip(items, rows, ok):
        if good:
            confusion[index[item.label], _class_index(index, row["label"])] += 1
        in_top_k.append(bool(good and item.label in list(row.get("top_labels") or [row["label"]])[:k]))
    per_class = per_class_metrics(classes, confusion)
    present = (per_class["support"] > 0) | (per_class["predicted"] > 0)
    scored = int(sum(ok))
    return ZeroShotEvaluation(
        classes=list(classes),
        top_k=k,
        accuracy_top1=float(np.trace(confusion) / scored),
        accuracy_topk=float(sum(in_top_k) / scored),
        macro_f1=float(per_class.loc[present, "f1"].mean()),
        confusion=confusion,
        per_class=per_class,
        predictions=_predictions_table(items, rows, ok, in_top_k),
        failed=[
            {"path": item.name, "reason": str(row.get("error"))} for item, row, good in zip(items, rows, ok) if not good
        ],
        items=list(items),
    )


def _is_scored(row: Mapping[str, Any]) -> bool:
    label = row.get("label")
    return label is not None and not (isinstance(label, float) and math.isnan(label)) and not row.get("error")


def _class_index(index: Mapping[str, int], label: str) -> int:
    if label not in index:
        raise EvaluationError(
            f"The classifier predicted {label!r}, which is not one of its classes {listing(list(index))}."
        )
    return index[label]


def per_class_metrics(classes: Sequence[str], confusion: np.ndarray) -> pd.DataFrame:
    """Precision, recall and F1 per class (0 where undefined, as scikit-learn's zero_division=0)."""
    tp = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return pd.DataFrame(
        {
            "class": list(classes),
            "support": support,
            "predicted": predicted,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    )


def _predictions_table(items, rows, ok, in_top_k) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [item.name for item in items],
            "true_label": [item.label for item in items],
            "predicted_label": pd.Series([row["label"] if good else None for row, good in zip(rows, ok)], dtype=object),
            "score": [float(row["score"]) if good else float("nan") for row, good in zip(rows, ok)],
            "correct": [bool(good and row["label"] == item.label) for item, row, good in zip(items, rows, ok)],
            "in_top_k": in_top_k,
            "error": pd.Series([None if good else str(row.get("error")) for row, good in zip(rows, ok)], dtype=object),
        }
    )


def metric_keys(classes: Sequence[str]) -> list[str]:
    """Metric-name suffixes per class: the sanitized class name (`a_red_circle`), or the class
    index for every class when sanitized names would be empty or collide."""
    keys = [re.sub(r"[^0-9a-z]+", "_", name.casefold()).strip("_")[:80] for name in classes]
    if all(keys) and len(set(keys)) == len(keys):
        return keys
    return [str(i) for i in range(len(classes))]


class _ProgressLine:
    """A one-line progress report on stderr, rewritten in place (when tqdm is not installed)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        end = "\n" if self.done >= self.total else ""
        print(f"\r[mlflow-clip] evaluated {self.done}/{self.total} images", end=end, file=sys.stderr, flush=True)


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total == 0:
        yield lambda n: None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _ProgressLine(total)
        return
    with tqdm(total=total, unit="img", desc="evaluating", file=sys.stderr) as bar:
        yield bar.update


def compare_with_reference(evaluation: ZeroShotEvaluation, reference: ZeroShotEvaluation) -> dict[str, float]:
    """The reference's accuracy, the difference (this model minus the reference, as a fraction)
    and the share of images both scored on which they predict the same class."""
    ours, theirs = evaluation.predictions, reference.predictions
    both = ours["predicted_label"].notna() & theirs["predicted_label"].notna()
    same = ours.loc[both, "predicted_label"] == theirs.loc[both, "predicted_label"]
    agreement = float(same.mean()) if both.any() else float("nan")
    return {
        "reference_accuracy_top1": reference.accuracy_top1,
        "reference_accuracy_top5": reference.accuracy_topk,
        "reference_macro_f1": reference.macro_f1,
        "accuracy_diff_vs_reference": evaluation.accuracy_top1 - reference.accuracy_top1,
        "reference_top1_agreement": agreement,
    }
