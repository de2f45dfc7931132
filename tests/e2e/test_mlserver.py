"""A real `mlserver start` with MLServer's MLflow runtime, spoken to over HTTP with V2 requests.

MLServer downgrades FastAPI and Starlette, so it runs from an environment of its own, built with
uv (as the benchmark's MLServer row builds it); the tests skip, saying why, only where that
environment cannot be built (no uv, no package index). See docs/mlserver.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    COLOUR_CLASSES,
    demo_image_bytes,
    encode,
    free_port,
    requires_export,
    solid,
    start_server,
    stop_process,
    subprocess_env,
    wait_for_http,
)

from mlflow_clip.bench.mlserver import MLSERVER_RUNTIME, MLServerUnavailable, ensure_mlserver_env, model_requirements

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

PROB_TOLERANCE = 1e-6  # the same bytes through the same onnxruntime graph, in two processes
# Adaptive batching of the `-batched` model: a lone request waits this long for company.
MAX_BATCH_SIZE = 8
MAX_BATCH_TIME = 0.5
CLIENTS = 16
BAD_IMAGE = b"not an image"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _colour_images() -> tuple[list[str], list[str]]:
    colours = [*COLOUR_CLASSES, *reversed(COLOUR_CLASSES)]
    return [_b64(encode(solid(c))) for c in colours], colours


def _mlserver_python(root: Path, model_dir: Path) -> Path:
    """MLServer's environment for a model's requirements (one per set of requirements)."""
    packages = model_requirements(model_dir)
    key = hashlib.sha256("\n".join(packages).encode()).hexdigest()[:12]
    try:
        return ensure_mlserver_env(root / f"env-{key}", packages)
    except MLServerUnavailable as e:
        pytest.skip(f"MLServer cannot be installed here, so it is not tested: {e}")


@pytest.fixture(scope="module")
def mlserver_envs(module_tmp) -> Path:
    return module_tmp("mlserver-envs")


def _start_mlserver(python: Path, repository: Path, models: dict[str, dict], parallel_workers: int):
    """`mlserver start repository` serving `models` (name: model-settings.json), as docs/mlserver.md says."""
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": parallel_workers,
        "debug": False,
    }
    (repository / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, model_settings in models.items():
        (repository / name).mkdir()
        settings = {"name": name, "implementation": MLSERVER_RUNTIME, **model_settings}
        (repository / name / "model-settings.json").write_text(json.dumps(settings, indent=2))
    env = subprocess_env(PATH=f"{python.parent}:{subprocess_env()['PATH']}")
    process = start_server(
        [str(python.parent / "mlserver"), "start", "."], repository / "mlserver.log", env, repository
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for name in models:
            wait_for_http(f"{url}/v2/models/{name}/ready", process, timeout=300)
    except BaseException:
        stop_process(process)
        raise
    return process, url


@pytest.fixture(scope="module")
def colour_server(mlserver_envs, colour_model_dir, module_tmp):
    """The colour model twice: `colour` as is, `colour-batched` with adaptive batching; inference
    in the server's own process (`parallel_workers: 0`)."""
    python = _mlserver_python(mlserver_envs, colour_model_dir)
    uri = {"parameters": {"uri": str(colour_model_dir)}}
    batching = {"max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MAX_BATCH_TIME}
    models = {"colour": uri, "colour-batched": {**uri, **batching}}
    process, url = _start_mlserver(python, module_tmp("colour-repo"), models, parallel_workers=0)
    yield url
    stop_process(process)


def _infer(url: str, model: str, b64_rows: list[str], parameters: dict | None = None, name: str = "image"):
    tensor = {"name": name, "datatype": "BYTES", "shape": [len(b64_rows), 1], "data": b64_rows}
    body = {"inputs": [tensor], **({"parameters": parameters} if parameters else {})}
    return requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=120)


def _outputs(response) -> dict[str, dict]:
    assert response.status_code == 200, response.text[:500]
    return {output["name"]: output for output in response.json()["outputs"]}


def _json_rows(output: dict) -> list:
    """A list column of the V2 response: one JSON text per row (MLServer's `pd_json`)."""
    assert output["datatype"] == "BYTES" and output["parameters"]["content_type"] == "pd_json"
    return [json.loads(row) for row in output["data"]]


def _in_process(model_dir: Path, images: list[bytes], **params):
    import mlflow
    import pandas as pd

    return mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": images}), params=params or None)


def test_the_full_table_has_the_right_labels_and_the_pyfuncs_probabilities(colour_server, colour_model_dir):
    b64, colours = _colour_images()
    outputs = _outputs(_infer(colour_server, "colour", b64))
    assert list(outputs) == ["label", "score", "probabilities", "error"]
    assert outputs["label"]["data"] == colours and outputs["label"]["shape"] == [len(b64), 1]
    assert outputs["error"]["data"] == [""] * len(b64)  # null text goes out as ""
    expected = _in_process(colour_model_dir, [base64.b64decode(b) for b in b64])
    assert outputs["score"]["datatype"] == "FP64"
    np.testing.assert_allclose(outputs["score"]["data"], expected["score"], atol=PROB_TOLERANCE)
    probabilities = _json_rows(outputs["probabilities"])
    np.testing.assert_allclose(probabilities, np.stack(expected["probabilities"]), atol=PROB_TOLERANCE)


def test_output_label_gives_the_labels_alone(colour_server):
    b64, colours = _colour_images()
    outputs = _outputs(_infer(colour_server, "colour", b64, {"output": "label"}))
    assert list(outputs) == ["label"] and outputs["label"]["data"] == colours


def test_top_k_adds_the_top_labels_and_scores(colour_server):
    b64, colours = _colour_images()
    outputs = _outputs(_infer(colour_server, "colour", b64, {"top_k": 2}))
    top_labels, top_scores = _json_rows(outputs["top_labels"]), _json_rows(outputs["top_scores"])
    assert [labels[0] for labels in top_labels] == colours and all(len(labels) == 2 for labels in top_labels)
    assert all(first >= second for first, second in top_scores)


def test_a_bad_row_with_on_error_null_gets_its_error_text_and_the_others_their_labels(colour_server):
    b64, colours = _colour_images()
    outputs = _outputs(_infer(colour_server, "colour", [*b64[:2], _b64(BAD_IMAGE)], {"on_error": "null"}))
    assert outputs["label"]["data"] == [*colours[:2], ""]
    assert outputs["error"]["data"][:2] == ["", ""] and "not an image" in outputs["error"]["data"][2]
    assert outputs["score"]["data"][2] is None  # a number column keeps its null
    assert _json_rows(outputs["probabilities"])[2] == []


def test_bad_requests_the_model_refuses_are_400s_with_the_models_message(colour_server):
    b64, _ = _colour_images()
    bad_row = _infer(colour_server, "colour", [b64[0], _b64(BAD_IMAGE)])
    assert bad_row.status_code == 400
    assert "row 1: not an image" in bad_row.json()["error"] and '{"on_error": "null"}' in bad_row.json()["error"]
    bad_output = _infer(colour_server, "colour", b64[:1], {"output": "labels"})
    assert bad_output.status_code == 400
    assert bad_output.json()["error"] == "Received output='labels'; expected one of ['full', 'label', 'embedding']."
    wrong_name = _infer(colour_server, "colour", b64[:1], name="picture")
    assert wrong_name.status_code == 400 and "'image'" in wrong_name.json()["error"]
    for response in (bad_row, bad_output, wrong_name):
        assert "Traceback" not in response.text and len(response.text) < 1000  # no stack, no echo of the images


def test_requests_mlflow_refuses_before_the_model_runs_are_500s_without_a_stack_trace(colour_server):
    """A known limit (docs/mlserver.md): MLflow checks params and input types before `predict`,
    and MLServer answers every error that is not its own with a 500."""
    b64, _ = _colour_images()
    wrong_type = _infer(colour_server, "colour", b64[:1], {"top_k": "two"})
    assert wrong_type.status_code == 500 and wrong_type.text == "Internal Server Error"


def test_mlflows_own_route_on_mlserver_keeps_real_nulls(colour_server):
    b64, colours = _colour_images()
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[b64[0]], [_b64(BAD_IMAGE)]]},
        "params": {"on_error": "null"},
    }
    response = requests.post(f"{colour_server}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text[:500]
    first, bad = response.json()["predictions"]
    assert first["label"] == colours[0] and first["error"] is None
    assert bad["label"] is None and bad["probabilities"] is None and "not an image" in bad["error"]


def _concurrent(call, count: int) -> list:
    results: list = [None] * count

    def run(index: int) -> None:
        results[index] = call(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_adaptive_batching_answers_concurrent_clients_each_with_its_own_rows(colour_server):
    b64, colours = _colour_images()
    started = time.monotonic()
    alone = _outputs(_infer(colour_server, "colour-batched", b64[:1]))
    assert alone["label"]["data"] == colours[:1]
    assert time.monotonic() - started >= MAX_BATCH_TIME  # the batcher waited for company: batching is on

    def call(index: int):
        rows = [b64[(index + k) % len(b64)] for k in range(1 + index % 2)]  # batches of 1 and 2
        return _infer(colour_server, "colour-batched", rows, {"on_error": "null"}), rows

    for response, rows in _concurrent(call, CLIENTS):
        outputs = _outputs(response)
        assert outputs["label"]["data"] == [colours[b64.index(row)] for row in rows]
        assert outputs["label"]["shape"] == [len(rows), 1] and outputs["error"]["data"] == [""] * len(rows)


# ---------------------------------------------------------------------------------------------
# The demo model: image embeddings, labels chosen per request, text embeddings; inference in
# one worker process (MLServer's default, which needs uvloop < 0.22).


@pytest.fixture(scope="module")
def demo_server(mlserver_envs, demo_model_dir, module_tmp):
    python = _mlserver_python(mlserver_envs, demo_model_dir)
    models = {"demo": {"parameters": {"uri": str(demo_model_dir)}}}
    process, url = _start_mlserver(python, module_tmp("demo-repo"), models, parallel_workers=1)
    yield url
    stop_process(process)


DEMO_IMAGES = [("a red circle", "PNG"), ("a green square", "JPEG"), ("a blue triangle", "WEBP")]


@requires_export
def test_the_demo_model_answers_as_in_process(demo_server, demo_model_dir):
    images = demo_image_bytes(DEMO_IMAGES)
    b64 = [_b64(data) for data, _ in images]
    expected = _in_process(demo_model_dir, [data for data, _ in images])
    outputs = _outputs(_infer(demo_server, "demo", b64))
    assert outputs["label"]["data"] == list(expected["label"])
    np.testing.assert_allclose(_json_rows(outputs["probabilities"]), np.stack(expected["probabilities"]), atol=1e-5)


@requires_export
def test_output_embedding_gives_unit_image_embeddings(demo_server, demo_model_dir):
    images = demo_image_bytes(DEMO_IMAGES)
    outputs = _outputs(_infer(demo_server, "demo", [_b64(data) for data, _ in images], {"output": "embedding"}))
    assert list(outputs) == ["embedding", "error"]
    embeddings = np.asarray(_json_rows(outputs["embedding"]))
    expected = _in_process(demo_model_dir, [data for data, _ in images], output="embedding")
    np.testing.assert_allclose(embeddings, np.stack(expected["embedding"]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@requires_export
def test_classes_chosen_per_request(demo_server, demo_model_dir):
    images = demo_image_bytes(DEMO_IMAGES)
    params = {"classes": ["a red circle", "a blue triangle", "a green square"], "templates": "none"}
    outputs = _outputs(_infer(demo_server, "demo", [_b64(data) for data, _ in images], params))
    expected = _in_process(demo_model_dir, [data for data, _ in images], **params)
    assert outputs["label"]["data"] == list(expected["label"])
    assert set(outputs["label"]["data"]) <= set(params["classes"])


@requires_export
def test_a_text_input_gives_text_embeddings(demo_server):
    outputs = _outputs(_infer(demo_server, "demo", ["a red circle", "a blue square"], name="text"))
    embeddings = np.asarray(_json_rows(outputs["embedding"]))
    assert embeddings.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
