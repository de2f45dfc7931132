"""MLflow's internals that mlflow-clip relies on (mlflow_clip/mlflow_internals.py) are still
there, and the `classifier` evaluator this package registers in MLflow's name is MLflow's own
for every model that is not an mlflow-clip model: the same metrics, the same artifacts, the same
errors, on a scikit-learn classifier and on pyfuncs returning labels and probabilities."""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlflow_clip import mlflow_internals
from mlflow_clip.mlflow_internals import CLASSIFIER_PREDICTIONS_HOOK, check_classifier_hook, evaluator_registry

MLFLOWS_OWN = "mlflow-own-classifier"


def test_the_hook_the_classifier_evaluator_overrides_is_still_there():
    """If this fails, MLflow changed how its classifier evaluator gets predictions: builtin.py's
    override must follow (until then its entry point does not load, and MLflow keeps its own)."""
    check_classifier_hook()
    from mlflow_clip.evaluation.builtin import ClassifierEvaluator

    assert CLASSIFIER_PREDICTIONS_HOOK in vars(ClassifierEvaluator)  # the one method it overrides
    methods = [name for name, value in vars(ClassifierEvaluator).items() if callable(value) and name[:2] != "__"]
    assert methods == [CLASSIFIER_PREDICTIONS_HOOK]
    registry = evaluator_registry()
    assert registry.is_builtin("classifier") and registry.get_evaluator("classifier").__class__ is ClassifierEvaluator


def test_a_changed_mlflow_evaluator_is_refused_with_the_way_out():
    class Renamed(mlflow_internals.MlflowClassifierEvaluator):
        def _evaluate(self, model, extra_metrics, custom_artifacts=None, **kwargs):
            self.y_pred, self.y_probs = self._predictions(model, self.X)

    class Reshaped(mlflow_internals.MlflowClassifierEvaluator):
        def _generate_model_predictions(self, model, input_df, params):
            return None, None

    for changed in (Renamed, Reshaped):
        with pytest.raises(ImportError, match="MLflow keeps its own.*clip-zero-shot"):
            check_classifier_hook(changed)


def _evaluate(model_uri: str, data: pd.DataFrame, evaluator: str, **kwargs):
    """(metrics, {artifact name: comparable content}) of one evaluation, or the error it raised."""
    with mlflow.start_run() as run:
        try:
            result = mlflow.models.evaluate(
                model_uri, data, model_type="classifier", targets="y", evaluators=[evaluator], **kwargs
            )
        except Exception as e:  # noqa: BLE001 - the same failure is part of "the same behaviour"
            return f"{type(e).__name__}: {e}", {}
    root = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id))
    return result.metrics, {p.relative_to(root).as_posix(): _content(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _content(path: Path):
    if path.suffix == ".png":  # the pixels (PNG metadata may carry a timestamp)
        return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).tobytes()
    return path.read_bytes()


class _Labels(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.where(model_input["a"] > 0, "yes", "no")


class _Probabilities(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return 1.0 / (1.0 + np.exp(-model_input["a"].to_numpy()))


def _features(rng, rows: int = 60) -> pd.DataFrame:
    return pd.DataFrame(rng.normal(size=(rows, 3)), columns=["a", "b", "c"])


def _models(rng) -> dict[str, tuple[str, pd.DataFrame]]:
    from sklearn.linear_model import LogisticRegression

    features = _features(rng)
    three = np.digitize(features["a"] + 0.3 * rng.normal(size=len(features)), [-0.5, 0.5])
    # Requirements named, so MLflow does not spend seconds per model inferring them in a subprocess.
    requirements = {"pip_requirements": ["mlflow", "scikit-learn"]}
    classifier = LogisticRegression().fit(features, three)
    sklearn_info = mlflow.sklearn.log_model(classifier, name="sklearn", **requirements)
    labels_info = mlflow.pyfunc.log_model(name="labels", python_model=_Labels(), **requirements)
    probabilities_info = mlflow.pyfunc.log_model(name="probabilities", python_model=_Probabilities(), **requirements)
    noisy = np.where(features["a"] + 0.5 * rng.normal(size=len(features)) > 0, "yes", "no")
    return {
        "scikit-learn, three classes": (sklearn_info.model_uri, features.assign(y=three)),
        "pyfunc returning labels": (labels_info.model_uri, features.assign(y=noisy)),
        "pyfunc returning probabilities": (
            probabilities_info.model_uri,
            features.assign(y=(noisy == "yes").astype(int)),
        ),
    }


def test_every_other_model_is_evaluated_exactly_as_mlflow_does(tracking_uri):
    registry = evaluator_registry()
    rng = np.random.default_rng(0)
    with mlflow.start_run():
        models = _models(rng)
    registry.register(MLFLOWS_OWN, mlflow_internals.MlflowClassifierEvaluator)
    try:
        compared = {
            name: (_evaluate(uri, data, "classifier"), _evaluate(uri, data, MLFLOWS_OWN))
            for name, (uri, data) in models.items()
        }
    finally:
        del registry._registry[MLFLOWS_OWN]
    for name, ((ours, our_artifacts), (theirs, their_artifacts)) in compared.items():
        assert ours == theirs, name  # the same metrics, to the last bit (or the same error)
        assert our_artifacts.keys() == their_artifacts.keys(), name
        assert all(our_artifacts[k] == their_artifacts[k] for k in our_artifacts), name
    (sklearn, _), (labels, label_artifacts), (probabilities, _) = [pair[0] for pair in compared.values()]
    assert sklearn["accuracy_score"] > 0.5 and "roc_auc" not in labels and labels["f1_score"] > 0.5
    assert any(name.startswith("confusion_matrix") for name in label_artifacts)
    assert isinstance(probabilities, str)  # MLflow refuses continuous predictions; so does ours, identically


def test_static_predictions_are_evaluated_by_mlflow_with_the_clip_evaluator_out_of_the_way(tracking_uri):
    """No model, a predictions column, no evaluator named: every registered evaluator runs;
    clip-zero-shot steps aside, and MLflow's classifier reads the column."""
    features = _features(np.random.default_rng(1), rows=20)
    target = (features["a"] > 0).astype(int)
    with mlflow.start_run():
        result = mlflow.models.evaluate(
            data=features.assign(y=target, p=target), predictions="p", model_type="classifier", targets="y"
        )
    assert result.metrics["accuracy_score"] == 1.0 and "accuracy_top1" not in result.metrics
