"""The parts of MLflow's scoring server that `mlflow-clip serve` and the served package rely on
(mlflow_clip/mlflow_internals.py) are still what they were: each test names what to change when
an MLflow release changes one."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import mlflow
import pytest

from mlflow_clip.gateway import sanitize
from mlflow_clip.mlflow_internals import PREDICT_ECHO, SCHEMA_FAILURE, scoring_model_path_env


class _Failing(mlflow.pyfunc.PythonModel):
    """Raises the error named by the request's one cell."""

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException

        from mlflow_clip.serving.loader import ClientInputError

        if model_input["text"][0] == "ours":
            raise ClientInputError("row 0: not an image. Send the image's bytes.")
        raise MlflowException("plain failure")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import scoring_server
    from mlflow.types import ColSpec, Schema
    from starlette.testclient import TestClient

    path = tmp_path_factory.mktemp("failing") / "model"
    # Written out, not inferred: inferring imports pyspark's connect module when pyspark is
    # installed, which exits a process whose __main__ has no file (a pytest-xdist worker).
    signature = ModelSignature(Schema([ColSpec("string", "text"), ColSpec("long", "n")]), Schema([ColSpec("string")]))
    with warnings.catch_warnings():  # MLflow asks for an input example, which would run predict
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(path, python_model=_Failing(), signature=signature, pip_requirements=["mlflow"])
    return TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(path))))


def test_the_scoring_app_still_loads_the_model_its_environment_variable_names():
    """If this fails, `mlflow-clip serve` (gateway.serve) must name its model another way."""
    app = Path(importlib.util.find_spec("mlflow.pyfunc.scoring_server.app").origin).read_text()
    assert "scoring_server._SERVER_MODEL_PATH" in app and scoring_model_path_env() == "__pyfunc_model_path__"


def test_a_failed_prediction_is_still_wrapped_as_the_guard_strips_it(client):
    """If this fails, MLflow changed its `Failed to predict data ...` wrapper: update PREDICT_ECHO
    and INPUT_ECHO, which the guard uses to keep the request out of its answers."""
    answer = client.post("/invocations", json={"dataframe_split": {"columns": ["text", "n"], "data": [["SECRET", 1]]}})
    message = answer.json()["message"]
    assert PREDICT_ECHO.match(message) and "SECRET" in message  # MLflow's own message echoes the input
    assert sanitize(message) == "plain failure"


def test_the_served_errors_still_keep_their_own_message(client):
    """The scoring server assigns `e.message` its echoing copy; ServingError ignores that
    assignment (serving/loader.py). If this fails, the client sees the request again."""
    answer = client.post("/invocations", json={"dataframe_split": {"columns": ["text", "n"], "data": [["ours", 1]]}})
    assert answer.status_code == 400
    assert answer.json()["message"] == "row 0: not an image. Send the image's bytes."


def test_a_schema_failure_is_still_named_as_the_guard_recognizes_it():
    """If this fails, the guard no longer recognizes MLflow's schema errors (SCHEMA_FAILURE),
    which quote the request: the scoring server and the schema check still spell them so."""
    server = Path(importlib.util.find_spec("mlflow.pyfunc.scoring_server").origin).read_text()
    schema = Path(importlib.util.find_spec("mlflow.models.utils").origin).read_text()
    assert f'"{SCHEMA_FAILURE}" in e.message' in server and f"{SCHEMA_FAILURE} of data" in schema
    echoed = f"Failed to predict data 'x'. \nError: {SCHEMA_FAILURE} of data `SECRET` with dtype `string`"
    assert "SECRET" not in sanitize(echoed)
