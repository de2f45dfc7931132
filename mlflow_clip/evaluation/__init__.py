"""Zero-shot evaluation: accuracy on labelled images, with reports worth looking at.

>>> from mlflow_clip.evaluation import run_evaluation
>>> result = run_evaluation("models:/clip-zero-shot@production", "data/val")  # doctest: +SKIP
>>> result.evaluation.accuracy_top1  # doctest: +SKIP

data.py     the labelled images: a folder of class subfolders, or a CSV of path,label
metrics.py  scoring: accuracy, per-class precision and recall, macro F1, confusion
reports.py  the confusion matrix, the most confident errors, CSV files
run.py      the job: score, log to MLflow, record on the registered version
plugin.py   the `clip-zero-shot` evaluator for `mlflow.models.evaluate`
"""

from mlflow_clip.evaluation.data import EvaluationError, LabelledImage, load_labelled_images, map_labels
from mlflow_clip.evaluation.metrics import ZeroShotEvaluation, evaluate_classifier
from mlflow_clip.evaluation.reports import write_reports
from mlflow_clip.evaluation.run import EvaluationRun, evaluate_command_impl, run_evaluation

__all__ = [
    "EvaluationError",
    "EvaluationRun",
    "LabelledImage",
    "ZeroShotEvaluation",
    "evaluate_classifier",
    "evaluate_command_impl",
    "load_labelled_images",
    "map_labels",
    "run_evaluation",
    "write_reports",
]
