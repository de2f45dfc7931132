"""A real `mlflow models serve` process spoken to over HTTP, and `mlflow models predict`."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from helpers import (
    demo_image_bytes,
    free_port,
    requires_export,
    start_server,
    stop_process,
    subprocess_env,
    using_store,
    wait_for_http,
)

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, requires_export]

MAX_ROWS = 40
GOOD = [
    ("a red circle", "PNG"),
    ("a green square", "JPEG"),
    ("a blue triangle", "WEBP"),
    ("a red triangle", "BMP"),
    ("a green circle", "GIF"),
    ("a blue square", "TIFF"),
]


@pytest.fixture(scope="module")
def server(demo_registry, module_tmp):
    tracking_uri, model_uri = demo_registry
    port = free_port()
    env = subprocess_env(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_PYFUNC_INFERENCE_CONFIG=json.dumps({"max_rows": MAX_ROWS}),
    )
    process = start_server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        module_tmp("serve") / "server.log",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", process)
        yield url
    finally:
        stop_process(process)


def _in_process_labels(registry: tuple[str, str], images) -> list[str]:
    """What the same registered model says in this process, for the same bytes."""
    import mlflow
    import pandas as pd

    tracking_uri, model_uri = registry
    with using_store(tracking_uri):
        model = mlflow.pyfunc.load_model(model_uri)
    return list(model.predict(pd.DataFrame({"image": [data for data, _ in images]}))["label"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bodies(rows: list[str]) -> dict[str, dict]:
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}},
        "dataframe_records": {"dataframe_records": [{"image": r} for r in rows]},
        "instances": {"instances": [{"image": r} for r in rows]},
        "inputs": {"inputs": {"image": rows}},
    }


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_all_four_json_forms_give_the_right_labels(server, demo_registry, form):
    images = demo_image_bytes(GOOD)
    body = _bodies([_b64(data) for data, _ in images])[form]
    body["params"] = {"top_k": 3}
    response = requests.post(server + "/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == _in_process_labels(demo_registry, images)
    assert sum(p["label"] == name for p, (_, name) in zip(predictions, images)) >= len(images) - 1
    for p in predictions:
        assert p["top_labels"][0] == p["label"] and len(p["top_labels"]) == 3
        assert abs(sum(p["probabilities"]) - 1.0) < 1e-4
        assert p["error"] is None


BAD_INPUTS = {
    "not an image": _b64(b"hello, this is not an image at all" * 3),
    "truncated": None,  # filled in below from a real JPEG
    "eps": _b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
    "svg": _b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'),
    "pdf": _b64(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
    "path": "/etc/passwd",
    "url": "http://127.0.0.1:9/cat.jpg",
}
EXPECTED_WORDS = {
    "not an image": "not",
    "truncated": "truncated",
    "eps": "EPS",
    "svg": "SVG",
    "pdf": "PDF",
    "path": "path or URL",
    "url": "path or URL",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_a_400_that_names_the_row_and_the_server_keeps_serving(server, kind):
    good = _b64(demo_image_bytes(GOOD[:1])[0][0])
    bad = BAD_INPUTS[kind]
    if bad is None:
        bad = _b64(demo_image_bytes([("a red circle", "JPEG")], size=(400, 300))[0][0][:600])
    if kind in ("path", "url"):
        # `inputs` reaches the model as sent; dataframe bodies are base64-decoded by MLflow first
        body = {"inputs": {"image": [good, bad]}}
    else:
        body = {"dataframe_split": {"columns": ["image"], "data": [[good], [bad]]}}
    response = requests.post(server + "/invocations", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in error
    assert "row 1" in error["message"] and EXPECTED_WORDS[kind].lower() in error["message"].lower()
    assert bad[:40] not in error["message"]
    assert requests.get(server + "/ping", timeout=5).status_code == 200
    again = requests.post(server + "/invocations", json={"inputs": {"image": [good]}}, timeout=60)
    assert again.status_code == 200 and again.json()["predictions"][0]["label"] == GOOD[0][0]


def test_too_many_rows_is_a_400(server):
    good = _b64(demo_image_bytes(GOOD[:1])[0][0])
    response = requests.post(server + "/invocations", json={"inputs": {"image": [good] * (MAX_ROWS + 1)}}, timeout=60)
    assert response.status_code == 400
    assert f"at most {MAX_ROWS}" in response.json()["message"]


def test_on_error_null_over_http(server):
    good = _b64(demo_image_bytes(GOOD[:1])[0][0])
    body = {"dataframe_records": [{"image": good}, {"image": BAD_INPUTS["eps"]}], "params": {"on_error": "null"}}
    response = requests.post(server + "/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    assert first["label"] == GOOD[0][0] and second["label"] is None and "EPS" in second["error"]


def test_mlflow_models_predict_on_a_json_file(demo_registry, tmp_path):
    tracking_uri, model_uri = demo_registry
    images = demo_image_bytes(GOOD[:3], seed=7)
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps(_bodies([_b64(d) for d, _ in images])["dataframe_split"]))
    output_path = tmp_path / "output.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            model_uri,
            "-i",
            str(input_path),
            "-t",
            "json",
            "-o",
            str(output_path),
            "--env-manager",
            "local",
        ],
        env=subprocess_env(MLFLOW_TRACKING_URI=tracking_uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(output_path.read_text())["predictions"]
    labels = [p["label"] for p in predictions]
    assert labels == _in_process_labels((tracking_uri, model_uri), images)
    assert sum(label == name for label, (_, name) in zip(labels, images)) >= len(images) - 1
