"""MLflow's built-in `classifier` evaluator, able to read an mlflow-clip model's predictions.

`mlflow.models.evaluate(model_uri, data, model_type="classifier", targets="label")` runs every
evaluator registered for classifiers, MLflow's own `ClassifierEvaluator` included, which calls
`model.predict(input_df)` and reads what comes back as one column of labels; an mlflow-clip
model returns `label`, `score`, `probabilities` and `error`, and that evaluator crashed on it.
MLflow 3.17 offers no other way in (docs/evaluation.md says why: its `can_evaluate` never sees
the model, its classifier ignores `predictions=` and the signature, and a differently named
evaluator cannot make MLflow skip its own). So this subclass is registered under the built-in's
own name (`classifier`, through the `mlflow.model_evaluator` entry point group) and overrides one
method, `_generate_model_predictions`, reached through `mlflow_internals.py`: for models with
the `mlflow_clip` flavor it takes the label column (or the one `predictions=` names) and the
probabilities (reordered to the sorted label list MLflow's metrics use); for every other model
it calls MLflow's own method, so MLflow computes everything as it would (tests compare the
metrics and artifacts with MLflow's own on a scikit-learn classifier and on pyfuncs returning
labels and probabilities). If MLflow's evaluator changes what this overrides, importing this
module fails, the entry point does not load, and MLflow keeps its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from mlflow_clip.mlflow_internals import MlflowClassifierEvaluator, check_classifier_hook
from mlflow_clip.serving.contract import FLAVOR_NAME

check_classifier_hook()

LABEL_COLUMN = "label"
PROBABILITIES_COLUMN = "probabilities"


def clip_classes(model: Any) -> list[str] | None:
    """The baked classes of an mlflow-clip pyfunc model, None for any other model."""
    metadata = getattr(model, "metadata", None)
    flavor = getattr(metadata, "flavors", {}).get(FLAVOR_NAME) if metadata is not None else None
    return list(flavor["classes"]) if flavor and "classes" in flavor else None


class ClassifierEvaluator(MlflowClassifierEvaluator):
    """MLflow's `classifier` evaluator; for mlflow-clip models, the label column and the
    class probabilities are read from the model's several output columns."""

    def _generate_model_predictions(self, model, input_df):
        classes = clip_classes(model) if model is not None else None
        if classes is None:
            return super()._generate_model_predictions(model, input_df)
        out = model.predict(input_df)
        column = self.predictions or LABEL_COLUMN
        if not isinstance(out, pd.DataFrame) or column not in out.columns:
            found = list(map(str, out.columns)) if isinstance(out, pd.DataFrame) else type(out).__name__
            raise MlflowException.invalid_parameter_value(
                f"The model's predictions have columns {found}; expected a column {column!r}. "
                "Pass predictions='label' (or leave it out)."
            )
        y_pred = out[column].to_numpy()
        if self.label_list is None:
            truth = [] if self.y_true is None else list(self.y_true)
            self.label_list = np.array(sorted(set(classes) | set(map(str, truth))))
        return y_pred, _probabilities_in_order(out, classes, [str(label) for label in self.label_list])


def _probabilities_in_order(out: pd.DataFrame, classes: list[str], label_list: list[str]) -> np.ndarray | None:
    """The probabilities [rows, labels] with columns in `label_list`'s order (zero for a label
    that is not one of the model's classes), as MLflow's curves and log loss read them; rows of
    failed images (NaN) stay NaN."""
    if PROBABILITIES_COLUMN not in out.columns:
        return None
    probabilities = np.asarray([list(row) for row in out[PROBABILITIES_COLUMN]], dtype=np.float64)
    index = {name: i for i, name in enumerate(classes)}
    ordered = np.zeros((len(out), len(label_list)))
    for column, label in enumerate(label_list):
        if label in index:
            ordered[:, column] = probabilities[:, index[label]]
    totals = ordered.sum(axis=1, keepdims=True)
    # The model's float32 probabilities sum to 1 within 1e-6; metrics check it in float64.
    return np.divide(ordered, totals, out=ordered, where=totals > 0)
