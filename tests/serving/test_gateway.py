"""The guard of `mlflow-clip serve`, in process, around MLflow's real scoring app for the
frozen demo model (the same app `mlflow models serve` runs; `tests/e2e/test_hostile.py` runs it
as a real server)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
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


def test_anything_but_json_an_image_or_a_form_is_refused(scoring_app):
    status, answer = _call(scoring_app, b"PAR1" + b"\0" * 100, content_type="application/x-parquet")
    assert status == 415 and "application/json" in answer["message"] and "multipart/form-data" in answer["message"]


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


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": {"text": None}},
        {"inputs": {"text": 5}},
        {"inputs": {"text": {"a": "b"}}},
        {"inputs": {"text": [True]}},
        {"inputs": [{"text": None}]},
        {"instances": {"text": None}},
        {"instances": [{"text": 5.5}]},
        {"dataframe_split": {"columns": ["text"], "data": [[None]]}},
        {"dataframe_records": [{"text": ["a cat"]}]},
    ],
    ids=lambda body: json.dumps(body),
)
def test_a_text_that_is_not_a_string_is_refused_in_every_form(scoring_app, body):
    """MLflow turns `{"inputs": {"text": null}}` into the text "None" and embeds it; a null in a
    dataframe form reaches the model as a null. Every form gets the same refusal."""
    status, answer = _call(scoring_app, json.dumps(body).encode())
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert re.search(
        r"1 text row\(s\) cannot be embedded: row 0: (missing \(null\)|a \w+), not text", answer["message"]
    )


def test_text_that_is_not_valid_unicode_is_refused_without_an_echo(scoring_app):
    """A lone surrogate made MLflow raise "Failed to enforce schema of data ..." with up to 600
    characters of the request in it."""
    secret = "q" * 30 + "SECRET"
    for body in (
        '{"inputs": {"text": ["a cat \\ud800 ' + secret + '"]}}',
        '{"dataframe_split": {"columns": ["text"], "data": [["\\udc00' + secret + '"]]}}',
        '{"inputs": {"image": ["x"]}, "params": {"classes": ["\\ud83d' + secret + '"]}}',
    ):
        status, answer = _call(scoring_app, body.encode())
        assert status == 400 and "lone surrogate" in answer["message"] and "SECRET" not in json.dumps(answer)
    emoji = {"inputs": {"text": ["a dog \U0001f436"]}}  # JSON writes it as a pair of surrogate escapes
    assert "\\ud83d\\udc36" in json.dumps(emoji) and _forwarded(emoji) == emoji


def test_mlflows_schema_failures_lose_the_request_they_echo():
    echoed = (
        "Failed to predict data '{'text': array(['SECRET'])}'. \nError: Failed to enforce schema of data "
        "'{'text': array(['SECRET'], dtype='<U6')}' with schema '['image': binary (optional), 'text': string "
        "(optional)]'. Error: Incompatible input types for column text. Can not safely convert SECRET."
    )
    message = sanitize(echoed)
    assert "SECRET" not in message and "input schema" in message and "for column 'text'" in message
    assert "SECRET" not in sanitize("Failed to enforce schema of data `SECRET` with dtype `string`")


def _forwarded(body: dict) -> dict:
    """What the guard hands MLflow's app for `body` (a stand-in app that records it)."""
    received = []

    async def record(scope, receive, send):
        received.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    assert _call(record, json.dumps(body).encode())[0] == 200
    return received[0]


def test_data_uris_are_unwrapped_in_the_image_column_only():
    uri = "data:image/png;base64," + _image()
    split = {"dataframe_split": {"columns": ["text", "image"], "data": [[uri, uri]]}}
    assert _forwarded(split)["dataframe_split"]["data"] == [[uri, _image()]]
    records = {"dataframe_records": [{"text": uri, "image": uri}]}
    assert _forwarded(records)["dataframe_records"] == [{"text": uri, "image": _image()}]
    inputs = {"inputs": {"image": [uri]}}  # the model reads data URIs itself in this form
    assert _forwarded(inputs) == inputs


@pytest.mark.parametrize(
    "form",
    [
        lambda uri: {"dataframe_split": {"columns": ["image"], "data": [[uri]]}},
        lambda uri: {"dataframe_records": [{"image": uri}]},
        lambda uri: {"inputs": {"image": [uri]}},
        lambda uri: {"instances": [{"image": uri}]},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs", "instances"],
)
@pytest.mark.parametrize(
    "header, reason",
    [
        ("data:text/html;base64,", "data URI media type text/html is not an image"),
        ("data:image/svg+xml;base64,", "unsupported format SVG"),
        ("data:image/png,", "data URI is not base64-encoded"),
    ],
    ids=["text/html", "svg", "not base64"],
)
def test_one_data_uri_rule_in_every_form(scoring_app, form, header, reason):
    """`data:text/html;base64,<png>` was decoded in the dataframe forms and refused in the others."""
    status, answer = _call(scoring_app, json.dumps(form(header + _image())).encode())
    assert status == 400 and f"row 0: {reason}" in answer["message"], answer


def _form(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename, media type, content) parts, as curl -F writes it."""
    body = b""
    for name, filename, media_type, content in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"' if filename else ""
        head += f"\r\nContent-Type: {media_type}" if media_type else ""
        body += (head + "\r\n\r\n").encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_image_body_and_a_form_of_files_answer_as_their_json_request(scoring_app):
    red, green = (image for image, _ in demo_image_bytes([("a red circle", "PNG"), ("a green square", "JPEG")]))
    as_json = json.dumps(
        {
            "inputs": {"image": [base64.b64encode(red).decode(), base64.b64encode(green).decode()]},
            "params": {"top_k": 2},
        }
    )
    _, expected = _call(scoring_app, as_json.encode())
    body, content_type = _form(
        [("top_k", None, None, b"2"), ("image", "red.png", "image/png", red), ("image", "g.jpg", None, green)]
    )
    assert _call(scoring_app, body, content_type) == (200, expected)
    status, answer = _call(scoring_app, red, content_type="image/png")
    assert status == 200 and answer["predictions"][0] == {
        k: v for k, v in expected["predictions"][0].items() if not k.startswith("top_")
    }


def test_form_fields_are_typed_as_the_signature_declares():
    from mlflow_clip.uploads import upload_to_json

    body, content_type = _form(
        [
            ("image", "x.png", "image/png", b"\x89PNG"),
            ("classes", None, None, b"a cat, a dog"),
            ("truncate", None, None, b"true"),
        ]
    )
    document, problem = upload_to_json(content_type, body, b"", 10)
    assert problem is None
    assert json.loads(document) == {
        "inputs": {"image": [base64.b64encode(b"\x89PNG").decode()]},
        "params": {"classes": ["a cat", "a dog"], "truncate": True},
    }
    body, content_type = _form(
        [("image", "x.png", None, b"1"), ("classes", None, None, b"a, b"), ("classes", None, None, b"c")]
    )
    assert json.loads(upload_to_json(content_type, body, b"", 10)[0])["params"] == {"classes": ["a, b", "c"]}
    raw, problem = upload_to_json("image/jpeg", b"\xff\xd8", b"top_k=3&output=label", 10)
    assert problem is None and json.loads(raw)["params"] == {"top_k": 3, "output": "label"}


SECRET = b"SECRET-PIXELS-" * 8


@pytest.mark.parametrize(
    "parts, phrase",
    [
        ([("image", "x.html", "text/html", SECRET)], "Part 0 of the form ('image') is text/html, not an image"),
        ([("colour", None, None, b"red"), ("image", "x.png", None, SECRET)], "Received the field 'colour'"),
        ([("top_k", None, None, b"three"), ("image", "x.png", None, SECRET)], "expected a whole number"),
        ([("truncate", None, None, b"maybe"), ("image", "x.png", None, SECRET)], "expected true or false"),
        ([("top_k", None, None, b"2")], "The form holds no file"),
        ([("image", f"{i}.png", None, SECRET) for i in range(12)], "holds 12 parts; expected at most 10"),
    ],
    ids=["not an image", "unknown field", "bad top_k", "bad truncate", "no file", "too many parts"],
)
def test_bad_uploads_are_refused_in_one_short_line_without_their_bytes(parts, phrase):
    from mlflow_clip.uploads import upload_to_json

    body, content_type = _form(parts)
    _, (status, _code, message) = upload_to_json(content_type, body, b"", 10)
    assert status == 400 and phrase in message and "SECRET" not in message and len(message) < 300
    if len(parts) <= 10:
        _, (status, _code, message) = upload_to_json(content_type, body[:-12], b"", 10)  # cut short
        assert status == 400 and "cut short" in message


def test_an_upload_through_the_guard_keeps_the_body_limit(scoring_app):
    status, answer = _call(scoring_app, b"\xff\xd8" + b"\0" * 2_000_000, content_type="image/jpeg")
    assert status == 413 and "MLFLOW_CLIP_MAX_BODY_BYTES" in answer["message"]
    status, answer = _call(scoring_app, b"", content_type="image/jpeg")
    assert status == 400 and "The body is empty" in answer["message"]
