"""`mlflow-clip serve`: MLflow's own scoring server behind a small guard for untrusted traffic.

MLflow's scoring server parses a request before the model sees it, and some of what it does
there cannot be bounded from inside a model: it reads any body size, parses Parquet and CSV
bodies into DataFrames of any size, answers deeply nested JSON with a 500, and echoes the
request back in the errors it raises itself (a parameter of the wrong type, columns of
different lengths, malformed JSON). The guard wraps the same scoring app (same routes, same
request forms, same model code) and, on `/invocations` only:

- refuses a body over `max_body_bytes` (413) and anything but JSON (415);
- parses the JSON once, answering malformed or too deeply nested JSON with a short 400;
- refuses a `text` cell that is not a string in the `inputs` and `instances` forms, which MLflow
  would otherwise turn into the text "None" or "5" before the model sees it;
- rewrites `data:image/...;base64,` cells of `dataframe_split` and `dataframe_records` bodies to
  their base64 payload, which MLflow then decodes (it base64-decodes binary columns itself, and
  cannot decode a data URI);
- removes any echo of the request from MLflow's own error messages, and stack traces.

    $ mlflow-clip serve -m models:/clip-zero-shot@production -p 5001
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Awaitable, Callable

MAX_BODY_ENV = "MLFLOW_CLIP_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # two images at the default max_bytes, base64-encoded
MAX_MESSAGE_CHARS = 600
_DATA_URI = re.compile(r"^\s*data:[^,;]{0,80}(?:;[^,;]{0,40}){0,4};base64,", re.IGNORECASE)
_ECHO_PREFIX = re.compile(r"^Failed to predict data '.*?'\. \nError: ", re.DOTALL)
_ECHO_INPUT = re.compile(r"\n?Input: \n.*", re.DOTALL)
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_\\-]{40,}")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


class Guard:
    """ASGI middleware around MLflow's scoring app."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        problem = _content_problem(scope, self.max_body_bytes)
        if problem is None:
            body, problem = await _read_body(receive, self.max_body_bytes)
        if problem is None:
            body, problem = _checked_json(body)
        if problem is not None:
            await _respond(send, *problem)
            return
        await self.app(scope, _replay(body), _sanitizing(send))


def _content_problem(scope: dict, limit: int) -> tuple[int, str, str] | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        return 415, "UNSUPPORTED_MEDIA_TYPE", "Send the request as JSON (Content-Type: application/json)."
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return 413, "REQUEST_LIMIT_EXCEEDED", _too_large(int(length), limit)
    return None


def _too_large(size: int, limit: int) -> str:
    return (
        f"Received a body of {size} bytes; expected at most {limit} ({MAX_BODY_ENV}). Send fewer or smaller "
        "images per request."
    )


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, tuple[int, str, str] | None]:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", (413, "REQUEST_LIMIT_EXCEEDED", _too_large(size, limit))
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks), None


def _checked_json(body: bytes) -> tuple[bytes, tuple[int, str, str] | None]:
    try:
        document = json.loads(body)
    except RecursionError:  # deeper than Python's recursion limit: MLflow would answer 500
        return b"", (
            400,
            "BAD_REQUEST",
            'The JSON nests too deeply. Send one JSON object, such as {"inputs": {"image": ["<base64>"]}}.',
        )
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        return b"", (
            400,
            "BAD_REQUEST",
            f"The body is not valid JSON{where}. Send one JSON object, such as "
            '{"inputs": {"image": ["<base64>"]}}.',
        )
    problem = _text_cell_problem(document)
    if problem is not None:
        return b"", (400, "INVALID_PARAMETER_VALUE", problem)
    if _unwrap_data_uris(document):
        return json.dumps(document).encode(), None
    return body, None


def _text_cells(document: Any) -> list:
    """The `text` column of an `inputs` or `instances` body, as sent."""
    if not isinstance(document, dict):
        return []
    inputs, instances = document.get("inputs"), document.get("instances")
    if isinstance(inputs, dict) and isinstance(inputs.get("text"), list):
        return inputs["text"]
    if isinstance(instances, list):
        return [row.get("text", "") if isinstance(row, dict) else "" for row in instances]
    return []


def _text_cell_problem(document: Any) -> str | None:
    bad = [(i, cell) for i, cell in enumerate(_text_cells(document)) if not isinstance(cell, str)]
    if not bad:
        return None
    parts = "; ".join(
        f"row {i}: {'missing (null)' if cell is None else f'a {type(cell).__name__}'}, not text" for i, cell in bad[:5]
    )
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return f"{len(bad)} text row(s) cannot be embedded: {parts}{more}. Send a string in every row of the 'text' column."


def _unwrap_data_uris(document: Any) -> bool:
    """Replace data-URI cells of dataframe bodies by their base64 payload; True if any was."""
    if not isinstance(document, dict):
        return False
    changed = False
    split = document.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("data"), list):
        for row in split["data"]:
            if isinstance(row, list):
                for index, cell in enumerate(row):
                    if isinstance(cell, str) and _DATA_URI.match(cell):
                        row[index] = cell[_DATA_URI.match(cell).end() :]
                        changed = True
    records = document.get("dataframe_records")
    if isinstance(records, list):
        for record in records:
            if isinstance(record, dict):
                for key, cell in record.items():
                    if isinstance(cell, str) and _DATA_URI.match(cell):
                        record[key] = cell[_DATA_URI.match(cell).end() :]
                        changed = True
    return changed


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _sanitizing(send: Send) -> Send:
    """Pass successful responses through; rewrite error bodies without echoes or stack traces."""
    state: dict[str, Any] = {"status": 200, "start": None, "body": []}

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            state["status"], state["start"] = message["status"], message
            if message["status"] < 400:
                await send(message)
            return
        if message["type"] != "http.response.body" or state["status"] < 400:
            await send(message)
            return
        state["body"].append(message.get("body", b""))
        if not message.get("more_body"):
            await _respond(send, state["status"], *_clean_error(b"".join(state["body"])))

    return wrapped


def _clean_error(body: bytes) -> tuple[str, str]:
    try:
        error = json.loads(body)
        code, message = str(error.get("error_code", "BAD_REQUEST")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "INTERNAL_ERROR", body.decode("utf-8", "replace")
    return code, sanitize(message)


def sanitize(message: str) -> str:
    """A message without the request MLflow may have echoed into it: its repr of the input, the
    raw body, long runs of base64; at most 600 characters."""
    message = _ECHO_PREFIX.sub("", message)
    message = _ECHO_INPUT.sub("", message)
    message = _LONG_TOKEN.sub("<omitted>", message)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


async def _respond(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app():
    """The guarded scoring app of the model MLflow's `_SERVER_MODEL_PATH` names (as uvicorn loads it)."""
    from mlflow.pyfunc.scoring_server.app import app as scoring_app

    return Guard(scoring_app, int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)))


def __getattr__(name: str):
    if name == "app":  # `uvicorn mlflow_clip.gateway:app`, built on first access
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def serve(model_uri: str, host: str, port: int, workers: int, timeout: int, max_body_bytes: int) -> None:
    """Download the model, then run the guarded scoring server in the foreground."""
    import subprocess
    import sys

    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = _download_artifact_from_uri(model_uri)
    env = {
        **os.environ,
        scoring_server._SERVER_MODEL_PATH: local,
        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name: str(timeout),
        MAX_BODY_ENV: str(max_body_bytes),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "mlflow_clip.gateway:app",
    ]
    raise SystemExit(subprocess.call(command, env=env))
