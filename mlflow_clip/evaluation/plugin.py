"""The `clip-zero-shot` MLflow evaluator plugin: `mlflow.models.evaluate` for mlflow-clip models.

Registered through the `mlflow.model_evaluator` entry point group
(`clip-zero-shot = mlflow_clip.evaluation.plugin:ClipZeroShotEvaluator`), it logs the same metrics and
reports as `mlflow_clip.evaluation.run_evaluation` for a DataFrame of image bytes and labels:

    >>> import mlflow
    >>> data = pd.DataFrame({"image": [png_bytes, ...], "label": ["a red circle", ...]})  # doctest: +SKIP
    >>> result = mlflow.models.evaluate("models:/clip-zero-shot/3", data, model_type="classifier",
    ...                                 targets="label", evaluators=["clip-zero-shot"])  # doctest: +SKIP
    >>> result.metrics["accuracy_top1"]  # doctest: +SKIP

`evaluator_config` keys: `image_column` (default `image`), `batch_size` (32), `progress` (True),
`metric_prefix` (""). Serving world: never imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator

from mlflow_clip.evaluation.builtin import clip_classes
from mlflow_clip.evaluation.data import EvaluationError, LabelledImage, map_labels
from mlflow_clip.evaluation.metrics import DEFAULT_BATCH_SIZE, evaluate_classifier
from mlflow_clip.evaluation.run import log_evaluation
from mlflow_clip.serving.rows import IMAGE_COLUMN

_logger = logging.getLogger(__name__)

EVALUATOR_NAME = "clip-zero-shot"
SUPPORTED_MODEL_TYPES = ("classifier",)


class ClipZeroShotEvaluator(ModelEvaluator):
    """Top-1/top-5 accuracy, per-class precision and recall, macro F1, the confusion matrix and
    the most confident errors of an mlflow-clip model on labelled images."""

    name = EVALUATOR_NAME

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type in SUPPORTED_MODEL_TYPES

    def evaluate(
        self,
        *,
        model_type,
        dataset,
        run_id,
        evaluator_config,
        model=None,
        extra_metrics=None,
        custom_artifacts=None,
        predictions=None,
        **kwargs,
    ) -> EvaluationResult | None:
        config = dict(evaluator_config or {})
        classes = clip_classes(model)
        if classes is None:  # evaluate() without `evaluators` runs every evaluator: stay out of the way
            _logger.info(
                "The %s evaluator skips this evaluation: it scores mlflow-clip models itself, and %s.",
                EVALUATOR_NAME,
                "no model was given" if model is None else "this is not one",
            )
            return None
        if extra_metrics or custom_artifacts:
            _logger.warning("The %s evaluator ignores extra_metrics and custom_artifacts.", EVALUATOR_NAME)
        items = _labelled_images(dataset, classes, config.get("image_column", IMAGE_COLUMN))
        evaluation = evaluate_classifier(
            _PyfuncScorer(model, classes),
            items,
            batch_size=int(config.get("batch_size", DEFAULT_BATCH_SIZE)),
            progress=bool(config.get("progress", True)),
        )
        prefix = str(config.get("metric_prefix", ""))
        uris = log_evaluation(evaluation, run_id, prefix=prefix)
        return EvaluationResult(
            metrics=evaluation.metrics(prefix), artifacts=_artifacts(uris, evaluation), run_id=run_id
        )


def _labelled_images(dataset, classes: list[str], image_column: str) -> list[LabelledImage]:
    features = dataset.features_data
    if isinstance(features, pd.DataFrame):
        if image_column not in features.columns:
            raise MlflowException.invalid_parameter_value(
                f"Received feature columns {list(map(str, features.columns))}; expected a column "
                f"{image_column!r} of image bytes (or set evaluator_config={{'image_column': ...}})."
            )
        images = list(features[image_column])
    else:
        images = [row[0] if hasattr(row, "__len__") and not isinstance(row, (bytes, str)) else row for row in features]
    if dataset.labels_data is None:
        raise MlflowException.invalid_parameter_value(
            f"The {EVALUATOR_NAME} evaluator needs labels: pass targets='<label column>'."
        )
    labels = [str(label) for label in dataset.labels_data]
    try:
        mapping = map_labels(labels, classes, source="the targets column")
    except EvaluationError as e:
        raise MlflowException.invalid_parameter_value(str(e)) from e
    return [LabelledImage(f"row {i}", mapping[label], image) for i, (image, label) in enumerate(zip(images, labels))]


class _PyfuncScorer:
    """The pyfunc model (local or served) seen as a classifier: classes and predict(...)."""

    def __init__(self, model, classes: list[str]):
        self.model, self._classes = model, classes

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def predict(self, images: Any, top_k: int = 0, on_error: str = "raise") -> pd.DataFrame:
        frame = pd.DataFrame({IMAGE_COLUMN: list(images)})
        return self.model.predict(frame, params={"top_k": int(top_k), "on_error": on_error})


def _artifacts(uris: dict[str, str], evaluation) -> dict[str, Any]:
    from mlflow.models.evaluation.artifacts import (
        CsvEvaluationArtifact,
        ImageEvaluationArtifact,
        JsonEvaluationArtifact,
    )

    kinds = {
        "confusion_matrix": ImageEvaluationArtifact,
        "most_confident_errors": ImageEvaluationArtifact,
        "predictions": CsvEvaluationArtifact,
        "per_class_metrics": CsvEvaluationArtifact,
        "failed_images": JsonEvaluationArtifact,
    }
    contents = {
        "predictions": evaluation.predictions,
        "per_class_metrics": evaluation.per_class,
        "failed_images": evaluation.failed,
    }
    return {name: kinds[name](uri=uri, content=contents.get(name)) for name, uri in uris.items()}


def register_evaluator() -> None:
    """Register the plugin in this process (what the entry point does once the package is
    installed); idempotent."""
    from mlflow_clip.mlflow_internals import evaluator_registry

    registry = evaluator_registry()
    if not registry.is_registered(EVALUATOR_NAME):
        registry.register(EVALUATOR_NAME, ClipZeroShotEvaluator)
