"""A real `mlserver start`, spoken to over HTTP with V2 requests: mlflow-clip's own runtime
(`mlflow_clip.mlserver.ClipRuntime`), and MLServer's MLflow runtime as it served models before.

MLServer downgrades FastAPI and Starlette, so it runs from an environment of its own, built with
uv, with mlflow-clip installed from a wheel of this tree (the regular install users make); the
tests skip, saying why, only where that environment cannot be built (no uv, no package index).
One server for the module, inference in one worker process (MLServer's default), serving:

- `clip`: the demo model under ClipRuntime;
- `clip-batched`: the same, batching per parameter set (mlflow-clip's own batcher);
- `clip-mlserver-batched`: the same, with MLServer's adaptive batching (parameters refused);
- `clip-registry`: the registered demo model, `models:/clip-zero-shot/1`, checked against the
  registry's record before its code runs;
- `colour`: the colour model under `mlserver_mlflow.MLflowRuntime`, the path that stays as it was.

See docs/mlserver.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
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

from benchmarks.mlserver import CLIP_RUNTIME, MLSERVER_RUNTIME, MLServerUnavailable, ensure_mlserver_env
from benchmarks.mlserver import model_requirements as requirements_of

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, requires_export]

PROB_TOLERANCE = 1e-6  # the same bytes through the same onnxruntime graph, in two processes
MAX_BATCH_TIME = 0.5  # clip-batched: a lone request waits this long for company
CLIENTS = 16
BAD_IMAGE = b"not an image"
DEMO_IMAGES = [("a red circle", "PNG"), ("a green square", "JPEG"), ("a blue triangle", "WEBP")]
OTHER_CLASSES = ["a red circle", "a blue triangle", "a green square"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def server(module_tmp, project_wheel, demo_model_dir, colour_model_dir, module_demo_model_uri, module_store):
    """One `mlserver start` for the module, set up as docs/mlserver.md says."""
    packages = [*requirements_of(demo_model_dir), str(project_wheel)]
    key = hashlib.sha256("\n".join(packages).encode()).hexdigest()[:12]
    try:
        python = ensure_mlserver_env(module_tmp("mlserver-envs") / f"env-{key}", packages)
    except MLServerUnavailable as e:
        pytest.skip(f"MLServer cannot be installed here, so it is not tested: {e}")
    repository = module_tmp("repository")
    clip = {"implementation": CLIP_RUNTIME, "parameters": {"uri": str(demo_model_dir)}}
    batching = {"max_batch_size": 8, "max_batch_time": MAX_BATCH_TIME}
    models = {
        "clip": clip,
        "clip-batched": {**clip, "parameters": {**clip["parameters"], "extra": batching}},
        "clip-mlserver-batched": {**clip, "max_batch_size": 4, "max_batch_time": 0.05},
        "clip-registry": {"implementation": CLIP_RUNTIME, "parameters": {"uri": module_demo_model_uri}},
        "colour": {"implementation": MLSERVER_RUNTIME, "parameters": {"uri": str(colour_model_dir)}},
    }
    process, url = _start_mlserver(python, repository, models, module_store)
    yield url, repository
    stop_process(process)


def _start_mlserver(python: Path, repository: Path, models: dict[str, dict], tracking_uri: str):
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 1,
        "debug": False,
    }
    (repository / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, model_settings in models.items():
        (repository / name).mkdir()
        (repository / name / "model-settings.json").write_text(json.dumps({"name": name, **model_settings}))
    env = subprocess_env(PATH=f"{python.parent}:{subprocess_env()['PATH']}", MLFLOW_TRACKING_URI=tracking_uri)
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


def _infer(url: str, model: str, rows: list[str], parameters: dict | None = None, name: str = "image", **tensor):
    body = {"name": name, "datatype": "BYTES", "shape": [len(rows)], "data": rows, **tensor}
    payload = {"inputs": [body], **({"parameters": parameters} if parameters else {})}
    return requests.post(f"{url}/v2/models/{model}/infer", json=payload, timeout=120)


def _outputs(response) -> dict[str, dict]:
    assert response.status_code == 200, response.text[:500]
    return {output["name"]: output for output in response.json()["outputs"]}


def _array(output: dict) -> np.ndarray:
    """An FP32 output tensor as numpy, in its shape (JSON null: NaN)."""
    assert output["datatype"] == "FP32"
    data = [np.nan if value is None else value for value in output["data"]]
    return np.asarray(data, dtype=np.float32).reshape(output["shape"])


def _images() -> tuple[list[bytes], list[str]]:
    pairs = demo_image_bytes(DEMO_IMAGES)
    return [data for data, _ in pairs], [label for _, label in pairs]


def _in_process(model_dir: Path, images: list[bytes], **params):
    import mlflow
    import pandas as pd

    return mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": images}), params=params or None)


def test_the_metadata_lists_every_output_with_its_type_and_shape(server):
    url, _ = server
    metadata = requests.get(f"{url}/v2/models/clip", timeout=30).json()
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, 9]) and outputs["score"] == ("FP32", [-1])
    assert outputs["embedding"][0] == "FP32" and outputs["embedding"][1][1] > 0
    assert outputs["label"] == outputs["error"] == ("BYTES", [-1]) and outputs["top_labels"] == ("BYTES", [-1, -1])
    assert {p["name"] for p in metadata["parameters"]["params"]} >= {"top_k", "output", "classes", "on_error"}


def test_the_full_table_is_typed_tensors_equal_to_the_in_process_answer(server, demo_model_dir):
    url, _ = server
    images, labels = _images()
    outputs = _outputs(_infer(url, "clip", [_b64(i) for i in images]))
    assert list(outputs) == ["label", "score", "probabilities", "error"]
    expected = _in_process(demo_model_dir, images)
    assert outputs["label"]["data"] == list(expected["label"]) == labels
    assert outputs["probabilities"]["shape"] == [3, 9] and outputs["error"]["data"] == ["", "", ""]
    np.testing.assert_allclose(
        _array(outputs["probabilities"]), np.stack(expected["probabilities"]), atol=PROB_TOLERANCE
    )
    np.testing.assert_allclose(_array(outputs["score"]), expected["score"], atol=PROB_TOLERANCE)


def test_every_mode_answers_as_in_process(server, demo_model_dir):
    url, _ = server
    images, labels = _images()
    b64 = [_b64(i) for i in images]
    top = _outputs(_infer(url, "clip", b64, {"top_k": 2}))
    assert top["top_labels"]["shape"] == [3, 2] and top["top_labels"]["data"][::2] == labels
    assert list(_outputs(_infer(url, "clip", b64, {"output": "label"}))) == ["label"]
    embedding = _outputs(_infer(url, "clip", b64, {"output": "embedding"}))
    assert list(embedding) == ["embedding", "error"]
    expected = _in_process(demo_model_dir, images, output="embedding")
    np.testing.assert_allclose(_array(embedding["embedding"]), np.stack(expected["embedding"]), atol=1e-6)
    chosen = _outputs(_infer(url, "clip", b64, {"classes": OTHER_CLASSES, "templates": "none"}))
    assert chosen["probabilities"]["shape"] == [3, 3]
    assert chosen["label"]["data"] == list(
        _in_process(demo_model_dir, images, classes=OTHER_CLASSES, templates="none")["label"]
    )
    text = _outputs(_infer(url, "clip", ["a red circle", "a blue square"], name="text"))
    np.testing.assert_allclose(np.linalg.norm(_array(text["embedding"]), axis=1), 1.0, atol=1e-5)


def test_a_bad_row_with_on_error_null_gets_nan_numbers_and_its_error(server):
    url, _ = server
    images, labels = _images()
    outputs = _outputs(_infer(url, "clip", [_b64(images[0]), _b64(BAD_IMAGE)], {"on_error": "null"}))
    assert outputs["label"]["data"] == [labels[0], ""] and outputs["error"]["data"][0] == ""
    assert "not an image" in outputs["error"]["data"][1]
    assert np.isnan(_array(outputs["probabilities"])[1]).all() and outputs["score"]["data"][1] is None


def test_bad_requests_are_400s_with_a_short_message(server):
    url, _ = server
    images, _ = _images()
    b64 = [_b64(images[0])]
    cases = [
        (_infer(url, "clip", b64, {"top_k": "two"}), "top_k"),
        (_infer(url, "clip", b64, {"output": "labels"}), "expected one of ['full', 'label', 'embedding']"),
        (_infer(url, "clip", b64, name="picture"), "named 'picture'; expected 'image'"),
        (_infer(url, "clip", [1.5], datatype="FP32"), "expected datatype BYTES"),
        (_infer(url, "clip", [*b64, _b64(BAD_IMAGE)]), "row 1: not an image"),
    ]
    for response, message in cases:
        assert response.status_code == 400, response.text[:300]
        assert message in response.json()["error"]
        assert "Traceback" not in response.text and len(response.text) < 1000  # no stack, no echo of images


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


def test_batched_clients_with_different_parameters_each_get_their_own_answer(server, demo_model_dir):
    """The issue this runtime fixes: under MLServer's batching, clients that sent no parameters got
    labels from a neighbour's `classes`. Here four parameter sets are sent at once."""
    url, _ = server
    images, labels = _images()
    started = time.monotonic()
    assert _outputs(_infer(url, "clip-batched", [_b64(images[0])]))["label"]["data"] == labels[:1]
    assert time.monotonic() - started >= MAX_BATCH_TIME  # the batcher waited for company: batching is on
    param_sets = [{}, {"classes": OTHER_CLASSES[::-1][:2], "templates": "none"}, {"output": "label"}, {"top_k": 2}]

    def call(index: int):
        rows = [images[(index + k) % 3] for k in range(1 + index % 2)]
        params = param_sets[index % len(param_sets)]
        return _infer(url, "clip-batched", [_b64(r) for r in rows], params), rows, params

    for response, rows, params in _concurrent(call, CLIENTS):
        outputs = _outputs(response)
        expected = _in_process(demo_model_dir, rows, **params)
        expected_labels = list(expected) if params.get("output") == "label" else list(expected["label"])
        assert outputs["label"]["data"] == expected_labels, params
        assert outputs["label"]["shape"] == [len(rows)]
        if "probabilities" in outputs:
            np.testing.assert_allclose(_array(outputs["probabilities"]), np.stack(expected["probabilities"]), atol=1e-6)


def test_under_mlservers_own_batching_parameters_are_refused_and_plain_requests_served(server):
    url, _ = server
    images, labels = _images()
    refused = _infer(url, "clip-mlserver-batched", [_b64(images[0])], {"classes": ["a pallet", "a forklift"]})
    assert refused.status_code == 400 and "requests with parameters are refused" in refused.json()["error"]
    assert '"max_batch_size": 4' in refused.json()["error"]  # the fix, spelled out
    served = _concurrent(lambda i: _infer(url, "clip-mlserver-batched", [_b64(images[i % 3])]), 6)
    assert [_outputs(r)["label"]["data"] for r in served] == [[labels[i % 3]] for i in range(6)]


def test_a_registered_version_is_served_after_its_check_and_a_changed_copy_is_not(server, demo_model_dir):
    url, repository = server
    images, labels = _images()
    assert _outputs(_infer(url, "clip-registry", [_b64(images[1])]))["label"]["data"] == [labels[1]]
    log = (repository / "mlserver.log").read_text()
    assert "model 'clip-registry' serves models:/clip-zero-shot/1 (checked before its code ran)" in log
    changed = repository / "changed-model"
    shutil.copytree(demo_model_dir, changed)
    (changed / "clip_classifier.json").write_text((changed / "clip_classifier.json").read_text().replace("red", "rot"))
    (repository / "clip-changed").mkdir()
    settings = {"name": "clip-changed", "implementation": CLIP_RUNTIME, "parameters": {"uri": str(changed)}}
    (repository / "clip-changed" / "model-settings.json").write_text(json.dumps(settings))
    load = requests.post(f"{url}/v2/repository/models/clip-changed/load", timeout=120)
    assert load.status_code >= 400
    assert requests.get(f"{url}/v2/models/clip-changed/ready", timeout=10).status_code != 200
    assert "clip_classifier.json" in (repository / "mlserver.log").read_text()  # the refusal names the file
    assert _outputs(_infer(url, "clip", [_b64(images[2])]))["label"]["data"] == [labels[2]]  # still serving


# ---------------------------------------------------------------------------------------------
# MLServer's MLflow runtime, as it served mlflow-clip models before this project had a runtime.


def _colour_images() -> tuple[list[str], list[str]]:
    colours = [*COLOUR_CLASSES, *reversed(COLOUR_CLASSES)]
    return [_b64(encode(solid(c))) for c in colours], colours


def _json_rows(output: dict) -> list:
    assert output["datatype"] == "BYTES" and output["parameters"]["content_type"] == "pd_json"
    return [json.loads(row) for row in output["data"]]


def _legacy_infer(url: str, rows: list[str], parameters: dict | None = None):
    return _infer(url, "colour", rows, parameters, shape=[len(rows), 1])


def test_mlflows_runtime_still_answers_the_table_in_its_pandas_form(server, colour_model_dir):
    url, _ = server
    b64, colours = _colour_images()
    outputs = _outputs(_legacy_infer(url, b64))
    assert list(outputs) == ["label", "score", "probabilities", "error"]
    assert outputs["label"]["data"] == colours and outputs["error"]["data"] == [""] * len(b64)
    expected = _in_process(colour_model_dir, [base64.b64decode(b) for b in b64])
    np.testing.assert_allclose(_json_rows(outputs["probabilities"]), np.stack(expected["probabilities"]), atol=1e-6)
    bad = _outputs(_legacy_infer(url, [b64[0], _b64(BAD_IMAGE)], {"on_error": "null"}))
    assert bad["label"]["data"] == [colours[0], ""] and _json_rows(bad["probabilities"])[1] == []


def test_mlflows_runtime_keeps_its_errors_and_its_invocations_route(server):
    url, _ = server
    b64, colours = _colour_images()
    bad_row = _legacy_infer(url, [b64[0], _b64(BAD_IMAGE)])
    assert bad_row.status_code == 400 and "row 1: not an image" in bad_row.json()["error"]
    wrong_type = _legacy_infer(url, b64[:1], {"top_k": "two"})  # MLflow refuses it before the model runs
    assert wrong_type.status_code == 500 and "Traceback" not in wrong_type.text
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[b64[0]], [_b64(BAD_IMAGE)]]},
        "params": {"on_error": "null"},
    }
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text[:500]
    first, bad = response.json()["predictions"]
    assert first["label"] == colours[0] and first["error"] is None and bad["label"] is None
