"""The guard of `mlflow-clip serve`, in process, around MLflow's real scoring app for the
frozen demo model (the same app `mlflow models serve` runs; `tests/e2e/test_hostile.py` runs it
as a real server)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from helpers import demo_image_bytes

from mlflow_clip.gateway import Guard, sanitize

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "demo-model-0.1.0"


@pytest.fixture(scope="module")
def scoring_app():
    from mlflow.pyfunc import load_model
    from mlflow.pyfunc.scoring_server import init

    return init(load_model(str(FIXTURE)))


def _call(app, body: bytes, content_type: str = "application/json", limit: int = 1_000_000) -> tuple[int, dict]:
    """One POST /invocations through the guard, as uvicorn would make it."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
        "query_string": b"",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "scheme": "http",
        "http_version": "1.1",
        "root_path": "",
    }
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
    sent: list[dict] = []

    async def receive() -> dict:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(Guard(app, limit)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload)


def _image() -> str:
    return base64.b64encode(demo_image_bytes([("a red circle", "PNG")])[0][0]).decode()


def test_a_good_request_passes_through_unchanged(scoring_app):
    status, answer = _call(scoring_app, json.dumps({"inputs": {"image": [_image()]}}).encode())
    assert status == 200 and answer["predictions"][0]["label"] == "a red circle"


def test_data_uris_in_dataframe_bodies_are_unwrapped(scoring_app):
    uri = "data:image/png;base64," + _image()
    for body in ({"dataframe_split": {"columns": ["image"], "data": [[uri]]}}, {"dataframe_records": [{"image": uri}]}):
        status, answer = _call(scoring_app, json.dumps(body).encode())
        assert status == 200 and answer["predictions"][0]["label"] == "a red circle"


@pytest.mark.parametrize(
    "body, status, phrase",
    [
        (b'{"inputs": {"image": ["abc"', 400, "not valid JSON (line 1, column 28)"),
        (b"[" * 50_000 + b"]" * 50_000, 400, "nests too deeply"),
        (json.dumps({"inputs": {"text": ["a cat", None]}}).encode(), 400, "row 1: missing (null), not text"),
        (json.dumps({"instances": [{"text": 5}]}).encode(), 400, "row 0: a int, not text"),
        (b"x" * 2_000_000, 413, "expected at most 1000000 (MLFLOW_CLIP_MAX_BODY_BYTES)"),
    ],
    ids=["truncated JSON", "nested JSON", "null text", "number text", "too large"],
)
def test_refusals_are_short_and_name_the_fix(scoring_app, body, status, phrase):
    got, answer = _call(scoring_app, body)
    assert got == status and phrase in answer["message"] and len(json.dumps(answer)) < 600


def test_anything_but_json_is_refused(scoring_app):
    status, answer = _call(scoring_app, b"PAR1" + b"\0" * 100, content_type="application/x-parquet")
    assert status == 415 and "application/json" in answer["message"]


def test_mlflows_own_errors_lose_the_request_they_echo(scoring_app):
    image = base64.b64encode(bytes(range(256)) * 400).decode()
    body = json.dumps({"inputs": {"image": [image]}, "params": {"top_k": "three"}}).encode()
    status, answer = _call(scoring_app, body)
    assert status == 400 and "top_k" in answer["message"]
    assert image[:40] not in json.dumps(answer) and len(answer["message"]) <= 600


def test_sanitize_removes_echoes_and_long_base64():
    echoed = "Failed to predict data '{\"inputs\": ...}'. \nError: bad top_k\nInput: \n{...}"
    assert sanitize(echoed) == "bad top_k"
    assert sanitize("value " + "A" * 100 + " is wrong") == "value <omitted> is wrong"
    assert len(sanitize("x " * 1000)) == 600
