"""MLflow's private names mlflow-clip relies on, in one place, each checked by a test that fails
loudly when an MLflow upgrade changes it (tests/evaluation/test_mlflow_internals.py).

- `MlflowClassifierEvaluator._generate_model_predictions(model, input_df) -> (y_pred, y_probs)`:
  where MLflow's built-in `classifier` evaluator asks the model for its predictions. The package's
  `classifier` evaluator (`evaluation/builtin.py`) overrides this one method, for mlflow-clip
  models only. `check_classifier_hook` refuses an MLflow whose evaluator no longer calls it so,
  which makes the entry point fail to load: MLflow then warns and keeps its own evaluator.
- `evaluator_registry()`: MLflow's registry of evaluators (`_model_evaluation_registry`), where
  the entry points land, for registering the `clip-zero-shot` evaluator in a process.

- The scoring server (`mlflow.pyfunc.scoring_server`), which `mlflow-clip serve` runs behind its
  guard (`gateway.py`): the environment variable naming the model its app loads
  (`_SERVER_MODEL_PATH`, `scoring_model_path_env`), the app itself (`scoring_app`), and the shape
  of the messages it writes around a failed prediction, which the guard strips because they
  echo the request: `Failed to predict data '<input>'. \nError: <message>` (`PREDICT_ECHO`),
  `Failed to enforce schema ...` (`SCHEMA_FAILURE`) and `...\nInput: \n<input>` (`INPUT_ECHO`).
- `MlflowException.message`, which the scoring server overwrites with that prefixed copy
  (`e.message = f"Failed to predict data ..."`): the served package's `ServingError` keeps its
  own message by ignoring the assignment. The served package cannot import this module (it
  travels inside every model), so the test of this module checks that assignment too.

- `mlflow.pyfunc.spark_udf` returns a wrapper of its pandas UDF (`functools.wraps`, so the UDF
  is its `__wrapped__`): `evaluated_once` marks that UDF nondeterministic, which stops Spark
  from pushing a filter on the result below a repartition and running the model twice per row.

Why the `classifier` evaluator is replaced at all: docs/evaluation.md.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

CLASSIFIER_PREDICTIONS_HOOK = "_generate_model_predictions"
_HOOK_PARAMETERS = ["self", "model", "input_df"]
_HOOK_CALL = f"self.y_pred, self.y_probs = self.{CLASSIFIER_PREDICTIONS_HOOK}(model, input_df)"

# The scoring server's messages around a failed prediction (mlflow/pyfunc/scoring_server/__init__.py).
PREDICT_ECHO = re.compile(r"^Failed to predict data '.*'\. \nError: ", re.DOTALL)  # to the last: data may hold it
SCHEMA_FAILURE = "Failed to enforce schema"
INPUT_ECHO = re.compile(r"\n?Input: \n.*", re.DOTALL)

__all__ = [
    "CLASSIFIER_PREDICTIONS_HOOK",
    "INPUT_ECHO",
    "PREDICT_ECHO",
    "SCHEMA_FAILURE",
    "check_classifier_hook",
    "evaluated_once",
    "evaluator_registry",
    "scoring_app",
    "scoring_model_path_env",
]


def check_classifier_hook(evaluator: type | None = None) -> None:
    """Raise ImportError unless `evaluator` (MLflow's classifier evaluator) still gets its
    predictions from `_generate_model_predictions(model, input_df)`, called by `_evaluate`
    for `(y_pred, y_probs)`: the one method mlflow-clip's evaluator overrides."""
    evaluator = evaluator or _classifier_evaluator()
    method = getattr(evaluator, CLASSIFIER_PREDICTIONS_HOOK, None)
    parameters = list(inspect.signature(method).parameters) if callable(method) else None
    try:
        called = _HOOK_CALL in inspect.getsource(evaluator._evaluate)
    except (AttributeError, OSError, TypeError):
        called = False
    if parameters != _HOOK_PARAMETERS or not called:
        raise ImportError(
            f"MLflow's classifier evaluator ({evaluator.__module__}) no longer gets its predictions from "
            f"{CLASSIFIER_PREDICTIONS_HOOK}(model, input_df) in _evaluate (found parameters {parameters}, "
            f"called as expected: {called}); mlflow-clip's classifier evaluator cannot take its place in this "
            "MLflow version, so MLflow keeps its own. Use evaluators=['clip-zero-shot'] for mlflow-clip models."
        )


def evaluator_registry() -> Any:
    """MLflow's registry of model evaluators (private: `_model_evaluation_registry`)."""
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    return _model_evaluation_registry


def scoring_model_path_env() -> str:
    """The environment variable naming the model directory MLflow's scoring app loads
    (private: `scoring_server._SERVER_MODEL_PATH`)."""
    from mlflow.pyfunc import scoring_server

    return scoring_server._SERVER_MODEL_PATH


def scoring_app() -> Any:
    """MLflow's scoring app (`mlflow.pyfunc.scoring_server.app.app`), built on import from the model
    that `scoring_model_path_env()` names."""
    from mlflow.pyfunc.scoring_server.app import app

    return app


def _classifier_evaluator() -> type:
    from mlflow.models.evaluation.evaluators.classifier import ClassifierEvaluator

    return ClassifierEvaluator


def __getattr__(name: str) -> Any:
    if name == "MlflowClassifierEvaluator":  # imported on first use: MLflow's evaluators take seconds to import
        return _classifier_evaluator()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluated_once(spark_udf: Any) -> Any:
    """The UDF `mlflow.pyfunc.spark_udf` returned, marked nondeterministic so that Spark runs it
    once per row: a deterministic UDF's result may be recomputed wherever the optimizer moves an
    expression that uses it (a filter on `error` pushed below a repartition ran the model twice).
    An MLflow whose wrapper no longer exposes the UDF gets it as it is (correct, only slower)."""
    inner = getattr(spark_udf, "__wrapped__", None)
    if inner is None or not callable(getattr(inner, "asNondeterministic", None)):
        return spark_udf
    return inner.asNondeterministic()
