"""The evaluation's pictures and files: the confusion matrix, the most confident errors, CSVs.

>>> paths = write_reports(evaluation, "reports/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path

import numpy as np

from mlflow_clip.evaluation.data import LabelledImage
from mlflow_clip.evaluation.metrics import ZeroShotEvaluation

_logger = logging.getLogger(__name__)

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
CONFIDENT_ERRORS_PNG = "most_confident_errors.png"
PREDICTIONS_CSV = "predictions.csv"
PER_CLASS_CSV = "per_class_metrics.csv"
FAILED_IMAGES_JSON = "failed_images.json"
MAX_ERROR_THUMBNAILS = 16


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(evaluation: ZeroShotEvaluation, path: str | Path, title: str = "") -> Path:
    """A heatmap of the confusion matrix: counts in the cells, colour by share of the true class."""
    classes, counts = evaluation.classes, evaluation.confusion
    n = len(classes)
    side = min(3.5 + 0.45 * n, 30.0)
    figure = _figure(side + 1.5, side)
    ax = figure.add_subplot()
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = 9 if n <= 20 else 7 if n <= 60 else 4
    labels = [textwrap.shorten(c, 32, placeholder="...") for c in classes]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    if n <= 40:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title or f"Top-1 accuracy {evaluation.accuracy_top1:.1%} on {evaluation.num_scored} images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_confident_errors(evaluation: ZeroShotEvaluation, path: str | Path, limit: int = MAX_ERROR_THUMBNAILS) -> Path:
    """A grid of the `limit` most confidently wrong images, each titled with predicted and true label."""
    table = evaluation.predictions
    wrong = table[table["predicted_label"].notna() & ~table["correct"]].sort_values(
        "score", ascending=False, kind="stable"
    )
    shown = wrong.head(limit)
    if shown.empty:
        figure = _figure(6, 2)
        figure.text(
            0.5, 0.5, f"No misclassified images ({evaluation.num_scored} scored)", ha="center", va="center", fontsize=13
        )
        figure.savefig(path, dpi=110)
        return Path(path)
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = _figure(3.2 * columns, 3.5 * rows)
    for n, (position, row) in enumerate(shown.iterrows()):
        ax = figure.add_subplot(rows, columns, n + 1)
        ax.imshow(_thumbnail(evaluation.items[position] if evaluation.items else None))
        ax.set_axis_off()
        ax.set_title(
            f"predicted: {textwrap.shorten(str(row.predicted_label), 30, placeholder='...')} ({row.score:.0%})\n"
            f"true: {textwrap.shorten(str(row.true_label), 30, placeholder='...')}\n"
            f"{textwrap.shorten(str(row.path), 36, placeholder='...')}",
            fontsize=8,
            color="darkred",
        )
    figure.suptitle(f"Most confident errors: {len(shown)} of {len(wrong)} misclassified", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def _thumbnail(item: LabelledImage | None, side: int = 192) -> np.ndarray:
    from mlflow_clip.serving.images import ImageInputError, decode_image

    try:
        image = decode_image(item.read())
    except (AttributeError, OSError, ImageInputError):
        return np.full((side, side, 3), 200, dtype=np.uint8)
    image.thumbnail((side, side))
    return np.asarray(image)


def write_reports(evaluation: ZeroShotEvaluation, directory: str | Path) -> dict[str, Path]:
    """Write the PNGs, the predictions and per-class CSVs and failed_images.json into `directory`."""
    directory = Path(directory)
    paths = {
        "confusion_matrix": plot_confusion_matrix(evaluation, directory / CONFUSION_MATRIX_PNG),
        "most_confident_errors": plot_confident_errors(evaluation, directory / CONFIDENT_ERRORS_PNG),
        "predictions": directory / PREDICTIONS_CSV,
        "per_class_metrics": directory / PER_CLASS_CSV,
        "failed_images": directory / FAILED_IMAGES_JSON,
    }
    evaluation.predictions.to_csv(paths["predictions"], index=False)
    evaluation.per_class.to_csv(paths["per_class_metrics"], index=False)
    paths["failed_images"].write_text(json.dumps(evaluation.failed, indent=2, ensure_ascii=False), encoding="utf-8")
    return paths
