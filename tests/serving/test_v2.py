"""The V2 form of the output (what MLServer's codecs can encode), and who gets it: only a call
from MLServer's V2 `predict`. A real MLServer over HTTP is in tests/e2e/test_mlserver.py."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from helpers import encode, solid

from mlflow_clip.serving.rows import format_embeddings
from mlflow_clip.serving.v2 import MLSERVER_RUNTIME_MODULE, called_by_mlserver, v2_table


def _called_from(module: str, function: str, call):
    """`call()`, from a function named `function` of a module named `module` (as MLServer's
    runtime would call it)."""
    namespace = {"__name__": module, "call": call}
    exec(f"def {function}():\n    return call()", namespace)
    return namespace[function]()


def test_only_mlservers_v2_predict_counts_as_mlserver():
    assert not called_by_mlserver()
    assert _called_from(MLSERVER_RUNTIME_MODULE, "predict", called_by_mlserver)
    assert not _called_from(MLSERVER_RUNTIME_MODULE, "invocations", called_by_mlserver)  # MLflow's JSON route
    assert not _called_from("somebody.else", "predict", called_by_mlserver)


def _has_null_cell(column: pd.Series) -> bool:
    return any(v is None or (isinstance(v, float) and np.isnan(v)) for v in column)


def test_the_v2_table_has_no_null_text_or_list_and_keeps_every_value(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    frame = pd.DataFrame({"image": [encode(solid("red")), b"not an image"]})
    out = model.predict(frame, params={"on_error": "null", "top_k": 2})
    table = v2_table(out)
    assert list(table.columns) == list(out.columns)
    for name in ("label", "error", "probabilities", "top_labels", "top_scores"):
        assert table[name].dtype == object and not _has_null_cell(table[name]), name
    assert table["label"].tolist() == ["red", ""] and table["error"][0] == "" and table["error"][1] == out["error"][1]
    assert table["probabilities"][1] == [] and table["probabilities"][0] == out["probabilities"][0]
    assert table["score"].dtype == float and table["score"][0] == out["score"][0] and np.isnan(table["score"][1])
    assert out["label"][1] is None and out["error"][0] is None  # the pyfunc's own table is untouched


def test_the_v2_table_of_labels_and_embeddings():
    labels = v2_table(pd.Series(["red", None], name="label"))
    assert isinstance(labels, pd.DataFrame) and labels["label"].tolist() == ["red", ""]
    embeddings = v2_table(format_embeddings(np.array([[0.6, 0.8], [np.nan, np.nan]]), [None, "bad"]))
    assert embeddings["embedding"].tolist() == [[0.6, 0.8], []] and embeddings["error"].tolist() == ["", "bad"]


def test_the_pyfunc_answers_mlserver_in_the_v2_form_and_everyone_else_as_before(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    frame = pd.DataFrame({"image": [encode(solid("green")), encode(solid("blue"))]})
    labels = _called_from(MLSERVER_RUNTIME_MODULE, "predict", lambda: model.predict(frame, params={"output": "label"}))
    assert isinstance(labels, pd.DataFrame) and labels["label"].tolist() == ["green", "blue"]
    full = _called_from(MLSERVER_RUNTIME_MODULE, "predict", lambda: model.predict(frame))
    assert full["error"].tolist() == ["", ""] and full["label"].tolist() == ["green", "blue"]
    assert isinstance(model.predict(frame, params={"output": "label"}), pd.Series)
    assert model.predict(frame)["error"].tolist() == [None, None]
