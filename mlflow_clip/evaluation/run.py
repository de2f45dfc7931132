"""The evaluation job behind `mlflow-clip evaluate` and `mlflow run . -e evaluate`: score, log to an
MLflow run, and record the result on the registered version (which promotion's accuracy gate reads).

Serving world: numpy, pandas, Pillow, matplotlib and MLflow only, never torch. The optional
comparison with CLIP's own PyTorch pipeline (`reference=`) lives in `mlflow_clip.export.reference`
and is imported only when asked for.

    >>> result = run_evaluation("models:/clip-zero-shot@production", "data/val")  # doctest: +SKIP
    >>> result.evaluation.accuracy_top1  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow_clip.evaluation.data import EvaluationError, load_labelled_images
from mlflow_clip.evaluation.metrics import (
    DEFAULT_BATCH_SIZE,
    Scorer,
    ZeroShotEvaluation,
    compare_with_reference,
    evaluate_classifier,
)
from mlflow_clip.evaluation.reports import write_reports
from mlflow_clip.registry.gates import ACCURACY_TAG
from mlflow_clip.tracking import active_or_new_run, log_new_params

_logger = logging.getLogger(__name__)

PREDICTIONS_TABLE = "predictions.json"  # the mlflow.log_table artifact (shown in the MLflow UI)
_REGISTERED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


@dataclass
class EvaluationRun:
    run_id: str
    evaluation: ZeroShotEvaluation
    model_name: str | None = None
    model_version: str | None = None
    reference: ZeroShotEvaluation | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def log_evaluation(
    evaluation: ZeroShotEvaluation, run_id: str, prefix: str = "", artifact_path: str | None = None
) -> dict[str, str]:
    """Log the metrics and reports to run `run_id`; returns each report's artifact URI."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

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
    mlflow.log_table(
        table, f"{artifact_path}/{PREDICTIONS_TABLE}" if artifact_path else PREDICTIONS_TABLE, run_id=run_id
    )
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
        from mlflow.exceptions import MlflowException

        from mlflow_clip.download import ModelNotFoundError

        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except MlflowException as e:
            raise ModelNotFoundError(model_uri, e.message) from None
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
