"""The signature declares every output a request can return, with the type of what the model
computes; each output mode returns exactly the columns `output_columns` names; Spark's result
type follows the mode, and models saved with the old signature still get one."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import ROOT, demo_image_bytes, requires_export

from mlflow_clip.serving.signature import OUTPUTS, default_signature, output_columns

OLD_MODEL = ROOT / "tests" / "fixtures" / "demo-model-0.1.0"
IMAGES = [("a red circle", "PNG"), ("a green square", "JPEG")]
MODES = [
    ({}, False),
    ({"top_k": 2}, False),
    ({"output": "embedding"}, False),
    ({"output": "label"}, False),
    ({}, True),
]


def test_the_signature_declares_every_output_once_with_its_type():
    outputs = json.loads(default_signature().outputs.to_json())
    assert [o["name"] for o in outputs] == [
        "label",
        "score",
        "probabilities",
        "top_labels",
        "top_scores",
        "embedding",
        "error",
    ]
    types = {o["name"]: (o["type"], o.get("items", {}).get("type")) for o in outputs}
    assert types["label"] == ("string", None) and types["score"] == ("float", None)
    assert types["probabilities"] == types["top_scores"] == types["embedding"] == ("array", "float")
    assert types["top_labels"] == ("array", "string")
    assert all(o["required"] is False for o in outputs)  # each request returns some of them


def test_each_mode_names_its_columns():
    assert output_columns() == ("label", "score", "probabilities", "error")
    assert output_columns(top_k=3) == ("label", "score", "probabilities", "top_labels", "top_scores", "error")
    assert output_columns("label") == ("label",)
    assert output_columns("embedding") == output_columns(text=True) == ("embedding", "error")
    every = {column for params, text in MODES for column in output_columns(**params, text=text)}
    assert every == {name for name, *_ in OUTPUTS}  # no declared output is unreachable


def _check_types(frame: pd.DataFrame) -> None:
    """Every value has its declared type: text, float32 numbers (as the graph computes them),
    lists of them; nulls only in failed rows."""
    kinds = {name: (kind, is_list) for name, kind, is_list, _ in OUTPUTS}
    for name in frame.columns:
        kind, is_list = kinds[name]
        for value in frame[name]:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            items = list(value) if is_list else [value]
            if kind == "string":
                assert all(isinstance(item, str) for item in items), name
            else:
                numbers = np.asarray(items, dtype=np.float64)
                np.testing.assert_array_equal(numbers, numbers.astype(np.float32), err_msg=name)


@requires_export
@pytest.mark.parametrize(("params", "text"), MODES)
def test_every_mode_returns_exactly_its_declared_columns(demo_model_dir, params, text):
    model = mlflow.pyfunc.load_model(str(demo_model_dir))
    if text:
        data = pd.DataFrame({"text": ["a red circle", "a blue square"]})
    else:
        data = pd.DataFrame({"image": [image for image, _ in demo_image_bytes(IMAGES)]})
    out = model.predict(data, params=params or None)
    frame = out.to_frame() if isinstance(out, pd.Series) else out
    assert tuple(frame.columns) == output_columns(**params, text=text)
    _check_types(frame)


@requires_export
def test_validate_serving_input_answers_every_mode(demo_model_dir):
    """MLflow's own pre-deployment check (deprecated by MLflow 3.13 in favour of
    `mlflow.models.predict`, which builds an environment): the serving payload of each mode,
    through the model's signature and code, gives that mode's columns."""
    import base64
    import warnings

    from mlflow.models import validate_serving_input

    warnings.filterwarnings("ignore", "``mlflow.models.utils.validate_serving_input`` is deprecated", FutureWarning)
    image = base64.b64encode(demo_image_bytes(IMAGES[:1])[0][0]).decode()
    for params in ({}, {"top_k": 2}, {"output": "embedding"}):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}, "params": params})
        out = validate_serving_input(str(demo_model_dir), body)
        assert tuple(out.columns) == output_columns(**params)
    out = validate_serving_input(str(demo_model_dir), json.dumps({"inputs": {"text": ["a red circle"]}}))
    assert tuple(out.columns) == output_columns(text=True)


def test_spark_result_types_follow_the_mode_and_the_signature():
    pytest.importorskip("pyspark")
    from mlflow_clip.spark import udf_result_type

    signature = default_signature()
    assert udf_result_type(signature).simpleString() == (
        "struct<label:string,score:float,probabilities:array<float>,error:string>"
    )
    assert udf_result_type(signature, {"top_k": 2}).simpleString() == (
        "struct<label:string,score:float,probabilities:array<float>,top_labels:array<string>,"
        "top_scores:array<float>,error:string>"
    )
    assert udf_result_type(signature, {"output": "embedding"}).simpleString() == (
        "struct<embedding:array<float>,error:string>"
    )
    assert udf_result_type(signature, {}, text=True) == udf_result_type(signature, {"output": "embedding"})
    assert udf_result_type(signature, {"output": "label"}).simpleString() == "string"


def test_models_saved_with_the_old_signature_keep_their_types_and_gain_the_missing_ones():
    """0.1.0 and 0.2.0 declared label, score (double), probabilities (array<double>) and error:
    those keep their types; the outputs they did not declare (but return) get this version's."""
    pytest.importorskip("pyspark")
    from mlflow_clip.spark import udf_result_type

    assert udf_result_type(str(OLD_MODEL)).simpleString() == (
        "struct<label:string,score:double,probabilities:array<double>,error:string>"
    )
    assert udf_result_type(str(OLD_MODEL), {"output": "embedding"}).simpleString() == (
        "struct<embedding:array<float>,error:string>"
    )
