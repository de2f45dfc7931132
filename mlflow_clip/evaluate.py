"""Zero-shot evaluation: accuracy on a labelled image folder, with reports worth looking at.

Serving world: numpy, pandas, Pillow, matplotlib and MLflow only, never torch. The optional
comparison with CLIP's own PyTorch pipeline (`reference=`) lives in
`mlflow_clip.export.reference` and is imported only when asked for.

    >>> result = run_evaluation("models:/clip-zero-shot@production", "data/val")  # doctest: +SKIP
    >>> result.evaluation.accuracy_top1  # doctest: +SKIP
    0.97...

`data` is a folder with one subfolder per class (`val/a cat/001.jpg`, ...) or a CSV file with
`path,label` columns. Folder and label names are matched to the model's classes exactly, then
ignoring case, then ignoring a leading article ("red circle" finds "a red circle").
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from mlflow_clip.registry import ACCURACY_TAG
from mlflow_clip.serving.prompts import strip_article
from mlflow_clip.package_data import IMAGE_SUFFIXES
from mlflow_clip.tracking import active_or_new_run, log_new_params

_logger = logging.getLogger(__name__)

TOP_K = 5
DEFAULT_BATCH_SIZE = 32
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
CONFIDENT_ERRORS_PNG = "most_confident_errors.png"
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_TABLE = "predictions.json"  # the mlflow.log_table artifact (shown in the MLflow UI)
PER_CLASS_CSV = "per_class_metrics.csv"
FAILED_IMAGES_JSON = "failed_images.json"
MAX_ERROR_THUMBNAILS = 16
_REGISTERED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_MAX_LISTED = 40
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class EvaluationError(ValueError):
    """The evaluation cannot start (bad data folder, CSV, labels or reference); the message says
    what was received and how to fix it."""


class Scorer(Protocol):
    """What evaluation needs of a classifier: `ZeroShotClassifier`, or anything shaped like it."""

    @property
    def classes(self) -> list[str]: ...

    def predict(self, images: Any, top_k: int = 0, on_error: str = "raise") -> pd.DataFrame: ...


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation image: `name` is what reports show, `label` one of the model's classes,
    `source` a file to read or the image value itself (encoded bytes, base64 text, ...)."""

    name: str
    label: str
    source: Any

    def read(self) -> Any:
        return self.source.read_bytes() if isinstance(self.source, Path) else self.source


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


@dataclass
class EvaluationRun:
    run_id: str
    evaluation: ZeroShotEvaluation
    model_name: str | None = None
    model_version: str | None = None
    reference: ZeroShotEvaluation | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Labelled images in


def map_labels(names: Sequence[str], classes: Sequence[str], source: str = "the data") -> dict[str, str]:
    """Map each dataset label to one of the model's classes: exactly, then ignoring case, then
    ignoring a leading article ('red circle' -> 'a red circle').

    Raises EvaluationError listing every label that matches no class (or several), and the classes.

        >>> map_labels(["Red Circle", "blue square"], ["a red circle", "a blue square"])
        {'Red Circle': 'a red circle', 'blue square': 'a blue square'}
    """
    lookups = [
        _lookup(classes, lambda s: s),
        _lookup(classes, str.casefold),
        _lookup(classes, lambda s: strip_article(s.strip()).casefold()),
    ]
    mapping, unmatched = {}, []
    for name in dict.fromkeys(names):
        mapping[name] = _match(name, lookups)
        if mapping[name] is None:
            unmatched.append(name)
    if unmatched:
        raise EvaluationError(_unmatched_message(unmatched, classes, source))
    return mapping


def _lookup(classes: Sequence[str], key: Callable[[str], str]) -> tuple[Callable[[str], str], dict[str, list[str]]]:
    table: dict[str, list[str]] = {}
    for name in classes:
        table.setdefault(key(name), []).append(name)
    return key, table


def _match(name: str, lookups) -> str | None:
    for key, table in lookups:
        found = table.get(key(name), [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            return None  # ambiguous at this level: the user must use an exact class name
    return None


def _unmatched_message(unmatched: list[str], classes: Sequence[str], source: str) -> str:
    return (
        f"{len(unmatched)} label(s) in {source} match none of the model's classes: {_listing(unmatched)}. "
        f"The model's {len(classes)} classes are: {_listing(classes)}. Labels match a class exactly, "
        "ignoring case, or ignoring a leading 'a', 'an' or 'the'; rename the class folders (or the "
        "CSV's label values) to the model's class names, or evaluate a model exported with these classes."
    )


def _listing(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_MAX_LISTED])
    return shown + (f" (and {len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else "")


def load_labelled_images(data: str | Path, classes: Sequence[str]) -> list[LabelledImage]:
    """The images of `data` with their labels mapped to `classes`.

    `data`: a folder with one subfolder per class (files with an image suffix are used), or a CSV
    file with `path,label` columns (relative paths are resolved against the CSV's folder).

        >>> items = load_labelled_images("val", ["a red circle", "a blue square"])  # doctest: +SKIP
        >>> items[0].name, items[0].label  # doctest: +SKIP
        ('red circle/0001.png', 'a red circle')
    """
    path = Path(data).expanduser()
    if path.is_dir():
        pairs = _folder_pairs(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path)
    else:
        raise EvaluationError(
            f"Received data={str(data)!r}; expected a folder with one subfolder of images per class, "
            "or a .csv file with 'path' and 'label' columns. " + ("No such file or folder." if not path.exists() else "")
        )
    mapping = map_labels([label for _, _, label in pairs], classes, source=str(path))
    return [LabelledImage(name, mapping[label], source) for name, source, label in pairs]


def _folder_pairs(root: Path) -> list[tuple[str, Path, str]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    pairs = [
        (f"{folder.name}/{file.name}", file, folder.name)
        for folder in folders
        for file in sorted(folder.iterdir())
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not pairs:
        raise EvaluationError(
            f"The folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders; expected "
            f"{root}/<class name>/<image>, e.g. {root}/a cat/0001.jpg, or a CSV with path,label columns."
        )
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        _logger.warning("Ignoring %d image(s) directly in %s (not in a class subfolder)", len(loose), root)
    return pairs


def _csv_pairs(csv_path: Path) -> list[tuple[str, Path, str]]:
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise EvaluationError(
            f"The CSV {csv_path} has columns {list(table.columns)}; expected 'path' and 'label' "
            f"(missing {missing}). Write a header line 'path,label'."
        )
    blank = [i + 2 for i, (p, l) in enumerate(zip(table["path"], table["label"])) if not p.strip() or not l.strip()]
    if blank:
        raise EvaluationError(f"The CSV {csv_path} has an empty path or label on line(s) {_listing(blank)}; fill or remove them.")
    if table.empty:
        raise EvaluationError(f"The CSV {csv_path} lists no images; expected one 'path,label' row per image.")
    base = csv_path.resolve().parent
    return [(p.strip(), base / Path(p.strip()).expanduser(), l.strip()) for p, l in zip(table["path"], table["label"])]


# ---------------------------------------------------------------------------------------------
# Scoring and metrics


def evaluate_classifier(
    classifier: Scorer,
    items: Sequence[LabelledImage],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> ZeroShotEvaluation:
    """Score `items` in batches with `on_error="null"` and compute the metrics.

    Images that cannot be read or decoded are counted and listed in `.failed`, not fatal.

        >>> classifier = mlflow_clip.load_model("models:/clip-zero-shot/3")  # doctest: +SKIP
        >>> evaluation = evaluate_classifier(classifier, load_labelled_images("val", classifier.classes))  # doctest: +SKIP
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
        failed=[{"path": item.name, "reason": str(row.get("error"))} for item, row, good in zip(items, rows, ok) if not good],
        items=list(items),
    )


def _is_scored(row: Mapping[str, Any]) -> bool:
    label = row.get("label")
    return label is not None and not (isinstance(label, float) and math.isnan(label)) and not row.get("error")


def _class_index(index: Mapping[str, int], label: str) -> int:
    if label not in index:
        raise EvaluationError(f"The classifier predicted {label!r}, which is not one of its classes {_listing(list(index))}.")
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
        {"class": list(classes), "support": support, "predicted": predicted, "precision": precision, "recall": recall, "f1": f1}
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


# ---------------------------------------------------------------------------------------------
# Reports (PNG)


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
                ax.text(j, i, str(count), ha="center", va="center", fontsize=font,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title or f"Top-1 accuracy {evaluation.accuracy_top1:.1%} on {evaluation.num_scored} images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_confident_errors(evaluation: ZeroShotEvaluation, path: str | Path, limit: int = MAX_ERROR_THUMBNAILS) -> Path:
    """A grid of the `limit` most confidently wrong images, each titled with predicted and true label."""
    table = evaluation.predictions
    wrong = table[table["predicted_label"].notna() & ~table["correct"]].sort_values("score", ascending=False, kind="stable")
    shown = wrong.head(limit)
    if shown.empty:
        figure = _figure(6, 2)
        figure.text(0.5, 0.5, f"No misclassified images ({evaluation.num_scored} scored)", ha="center", va="center", fontsize=13)
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
            fontsize=8, color="darkred",
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


# ---------------------------------------------------------------------------------------------
# Logging to MLflow


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


def log_evaluation(
    evaluation: ZeroShotEvaluation, run_id: str, prefix: str = "", artifact_path: str | None = None
) -> dict[str, str]:
    """Log the metrics and reports to run `run_id`; returns each report's artifact URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, 0) for name, value in evaluation.metrics(prefix).items()]
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])
    with tempfile.TemporaryDirectory(prefix="mlflow-clip-eval-") as tmp:
        paths = write_reports(evaluation, tmp)
        for local in paths.values():
            client.log_artifact(run_id, str(local), artifact_path)
    table = evaluation.predictions.astype(object).where(evaluation.predictions.notna(), None)
    mlflow.log_table(table, f"{artifact_path}/{PREDICTIONS_TABLE}" if artifact_path else PREDICTIONS_TABLE, run_id=run_id)
    root = client.get_run(run_id).info.artifact_uri.rstrip("/") + (f"/{artifact_path}" if artifact_path else "")
    return {name: f"{root}/{local.name}" for name, local in paths.items()}


def parse_registered_uri(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, version, alias) for `models:/name/3` or `models:/name@alias`; None otherwise."""
    match = _REGISTERED_URI.match(model_uri.strip())
    if match is None:
        return None
    return match["name"], match["version"], match["alias"]


def _resolve_version(model_uri: str) -> tuple[str, str] | None:
    from mlflow.tracking import MlflowClient

    parsed = parse_registered_uri(model_uri)
    if parsed is None:
        return None
    name, version, alias = parsed
    if version is None:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    return name, str(version)


def record_on_version(name: str, version: str, evaluation: ZeroShotEvaluation, run_id: str, data: str) -> None:
    """Tag the registered version with the evaluation; the promotion accuracy gate reads `eval_accuracy`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {
        ACCURACY_TAG: f"{evaluation.accuracy_top1:.6f}",
        "eval_accuracy_top5": f"{evaluation.accuracy_topk:.6f}",
        "eval_run_id": run_id,
        "eval_data": str(data)[:4900],
        "eval_images": str(evaluation.num_scored),
        "eval_failed_images": str(len(evaluation.failed)),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def run_evaluation(
    model_uri: str,
    data: str | Path,
    reference: str | None = None,
    registered: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> EvaluationRun:
    """Evaluate `model_uri` on `data` in one MLflow run (the active one, if any).

    Logs params, metrics and reports; when `model_uri` names a registered version
    (`models:/name/3`, `models:/name@alias`) and `registered` is true, tags that version with
    `eval_accuracy` (top-1), `eval_accuracy_top5`, `eval_run_id`, `eval_data` and `eval_images`.
    With `reference` (a CLIP model name, 'demo' or a checkpoint path) CLIP's own PyTorch
    pipeline is evaluated on the same images too (needs the export extra).

        >>> run_evaluation("models:/clip-zero-shot@challenger", "val", reference="RN50")  # doctest: +SKIP
    """
    import mlflow

    import mlflow_clip

    # An alias is resolved once, so the version evaluated is the version tagged.
    resolved = _resolve_version(model_uri) if registered else None
    classifier = mlflow_clip.load_model(f"models:/{resolved[0]}/{resolved[1]}" if resolved else model_uri)
    items = load_labelled_images(data, classifier.classes)
    reference_classifier = _reference_classifier(reference, classifier) if reference else None
    with active_or_new_run() as run:
        run_id = run.info.run_id
        log_new_params(run_id, _params(model_uri, resolved, data, len(items), classifier, batch_size, reference))
        mlflow.set_tag("mlflow_clip.job", "evaluate")
        evaluation = evaluate_classifier(classifier, items, batch_size, progress)
        log_evaluation(evaluation, run_id)
        result = EvaluationRun(run_id, evaluation, *(resolved or (None, None)), metrics=evaluation.metrics())
        if reference_classifier is not None:
            result.reference = evaluate_classifier(reference_classifier, items, batch_size, progress)
            comparison = compare_with_reference(evaluation, result.reference)
            mlflow.log_metrics(comparison, run_id=run_id)
            result.metrics.update(comparison)
        if resolved:
            record_on_version(resolved[0], resolved[1], evaluation, run_id, str(data))
    return result


def _params(model_uri, resolved, data, num_images, classifier, batch_size, reference) -> dict[str, Any]:
    return {
        "model_uri": model_uri,
        "model_version": f"{resolved[0]}/{resolved[1]}" if resolved else "",
        "data": str(data),
        "num_images": num_images,
        "num_classes": len(classifier.classes),
        "batch_size": batch_size,
        "reference": reference or "",
    }


def _reference_classifier(reference: str, classifier) -> Scorer:
    try:
        from mlflow_clip.export.reference import build_reference_classifier
    except ImportError as e:
        raise EvaluationError(
            f"reference={reference!r} needs the export extra (torch, clip): pip install 'mlflow-clip[export]' ({e})."
        ) from e
    try:
        return build_reference_classifier(reference, classifier.config)
    except ValueError as e:  # CheckpointError: unknown model name or unreadable checkpoint
        raise EvaluationError(f"Could not load the reference CLIP: {e}") from e


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


def evaluate_command_impl(model_uri: str, data: str, reference: str = "") -> EvaluationRun:
    """The body of `mlflow-clip evaluate` and the MLproject `evaluate` entry point."""
    result = run_evaluation(model_uri, data, reference=reference or None)
    evaluation = result.evaluation
    print(
        f"[mlflow-clip] run {result.run_id}: top-1 {evaluation.accuracy_top1:.2%}, "
        f"top-{evaluation.top_k} {evaluation.accuracy_topk:.2%}, macro F1 {evaluation.macro_f1:.4f} "
        f"on {evaluation.num_scored} images ({len(evaluation.failed)} failed)"
    )
    if result.reference is not None:
        print(
            f"[mlflow-clip] reference {reference}: top-1 {result.reference.accuracy_top1:.2%}, "
            f"difference {result.metrics['accuracy_diff_vs_reference'] * 100:+.2f} points"
        )
    if result.model_version:
        print(f"[mlflow-clip] recorded on {result.model_name} version {result.model_version} ({ACCURACY_TAG})")
    return result
