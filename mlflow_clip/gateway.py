"""`mlflow-clip serve`: MLflow's own scoring server behind a small guard for untrusted traffic.

MLflow's scoring server parses a request before the model sees it, and some of what it does
there cannot be bounded from inside a model: it reads any body size, parses Parquet and CSV
bodies into DataFrames of any size, answers deeply nested JSON with a 500, and echoes the
request back in the errors it raises itself (a parameter of the wrong type, columns of
different lengths, malformed JSON). The guard wraps the same scoring app (same routes, same
request forms, same model code) and, on `/invocations` only:

- refuses a body over `max_body_bytes` (413) and anything but JSON, an image or a form of image
  files (415); an image or a form becomes the equivalent JSON request (`mlflow_clip.uploads`);
- parses the JSON once, answering malformed or too deeply nested JSON with a short 400;
- refuses a `text` cell that is not a string, in every form (MLflow would turn a number into the
  text "5", and up to 3.17 a null into "None", in some forms), and text that is not valid
  Unicode (a lone surrogate, which MLflow answers with the request in its message);
- rewrites the data-URI cells of the `image` column of `dataframe_split` and `dataframe_records`
  bodies to their base64 payload, which MLflow then decodes (it base64-decodes binary columns
  itself, and cannot decode a data URI), refusing those the model would refuse (a media type
  that is not an image, a URI that is not base64), so that every form follows one rule;
- removes any echo of the request from MLflow's own error messages (the prediction and schema
  echoes), and stack traces.

    $ mlflow-clip serve -m models:/clip-zero-shot@production -p 5001
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Awaitable, Callable

from mlflow_clip import uploads
from mlflow_clip.errors import PortInUseError
from mlflow_clip.mlflow_internals import INPUT_ECHO, PREDICT_ECHO, SCHEMA_FAILURE, scoring_app, scoring_model_path_env

MAX_BODY_ENV = "MLFLOW_CLIP_MAX_BODY_BYTES"
# `mlflow ui` and `mlflow models serve` take 5000; the README's first server listens on 5001.
DEFAULT_PORT = 5001
LAST_PORT = 5010
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # two images at the default max_bytes, base64-encoded
MAX_FORM_PARTS = 10_000  # files and fields of one form: the model's default max_rows
MAX_MESSAGE_CHARS = 600
IMAGE_COLUMN = "image"
SURROGATE_MESSAGE = (
    "The request holds text that is not valid Unicode (a lone surrogate such as \\ud800). Send valid UTF-8 "
    "(decode the text with errors='replace')."
)
SCHEMA_MESSAGE = (
    "The request does not match the model's input schema (MLflow's check of the columns failed{hint}). Send an "
    "'image' column of base64 strings, or a 'text' column of strings, as the README shows."
)
_DATA_URI_START = re.compile(r"\s*data:", re.IGNORECASE)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_COLUMN_HINT = re.compile(r"for column '?(image|text)'?[ .:]")
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
        content_type = _header(scope, "content-type")
        if problem is None and uploads.is_upload(_media_type(content_type)):
            query = scope.get("query_string", b"")
            body, problem = uploads.upload_to_json(content_type, body, query, MAX_FORM_PARTS)
            scope = _as_json_request(scope, len(body))
        if problem is None:
            body, problem = _checked_json(body)
        if problem is not None:
            await _respond(send, *problem)
            return
        await self.app(scope, _replay(body), _sanitizing(send))


def _header(scope: dict, name: str) -> str:
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return ""


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _as_json_request(scope: dict, length: int) -> dict:
    """`scope` as the JSON request an upload became (MLflow parses by Content-Type)."""
    kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers, "query_string": b""}


def _content_problem(scope: dict, limit: int) -> tuple[int, str, str] | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    kind = _media_type(headers.get("content-type", ""))
    if kind != "application/json" and not uploads.is_upload(kind):
        return (
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "Send the request as JSON (Content-Type: application/json), an image (Content-Type: image/jpeg, ...), "
            "or a form of image files (multipart/form-data, as curl -F image=@photo.jpg sends).",
        )
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
    if _lone_surrogate(body, document):
        return b"", (400, "INVALID_PARAMETER_VALUE", SURROGATE_MESSAGE)
    problem = _text_cell_problem(document)
    if problem is None:
        changed, problem = _unwrap_data_uris(document)
    if problem is not None:
        return b"", (400, "INVALID_PARAMETER_VALUE", problem)
    return (json.dumps(document).encode(), None) if changed else (body, None)


def _column(document: Any, name: str) -> list[tuple[int, Any, Callable[[Any], None]]]:
    """Every cell of column `name` in any of MLflow's JSON forms, as (row, value, setter):
    `inputs` and `instances` as columns ({"text": [...]}, or one value) or as records, and
    `dataframe_split` and `dataframe_records`."""
    if not isinstance(document, dict):
        return []
    cells: list[tuple[int, Any, Callable[[Any], None]]] = []
    for key in ("inputs", "instances"):
        value = document.get(key)
        if isinstance(value, dict) and name in value:
            column = value[name]
            if isinstance(column, list):
                cells += [(i, cell, functools.partial(column.__setitem__, i)) for i, cell in enumerate(column)]
            else:
                cells.append((0, column, functools.partial(value.__setitem__, name)))
        elif isinstance(value, list):
            cells += _record_cells(value, name)
    split = document.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("columns"), list) and name in split["columns"]:
        at = split["columns"].index(name)
        for i, row in enumerate(split.get("data") or []):
            if isinstance(row, list) and len(row) > at:
                cells.append((i, row[at], functools.partial(row.__setitem__, at)))
    records = document.get("dataframe_records")
    if isinstance(records, list):
        cells += _record_cells(records, name)
    return cells


def _record_cells(records: list, name: str) -> list[tuple[int, Any, Callable[[Any], None]]]:
    return [
        (i, row[name], functools.partial(row.__setitem__, name))
        for i, row in enumerate(records)
        if isinstance(row, dict) and name in row
    ]


def _text_cell_problem(document: Any) -> str | None:
    """A `text` cell that is not a string, in any form: MLflow would turn a number into the text
    "5" (and up to 3.17 a null into "None") in some forms and keep it in others."""
    bad = [(i, cell) for i, cell, _ in _column(document, "text") if not isinstance(cell, str)]
    if not bad:
        return None
    parts = "; ".join(
        f"row {i}: {'missing (null)' if cell is None else f'a {type(cell).__name__}'}, not text" for i, cell in bad[:5]
    )
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return (
        f"{len(bad)} text row(s) cannot be embedded: {parts}{more}. Send a string in every row of the 'text' "
        "column (and no 'text' column with images)."
    )


def _unwrap_data_uris(document: Any) -> tuple[bool, str | None]:
    """Replace the data URIs of the `image` column of dataframe bodies by their base64 payload
    (MLflow base64-decodes that column itself, and cannot decode a data URI), under the rule
    the model applies to a data URI it receives (`split_data_uri`); (changed, problem)."""
    from mlflow_clip.serving.images import ImageInputError, split_data_uri
    from mlflow_clip.serving.rows import describe_bad_rows

    if not isinstance(document, dict):
        return False, None
    frames = {k: document[k] for k in ("dataframe_split", "dataframe_records") if k in document}
    changed, bad = False, []
    for i, cell, replace in _column(frames, IMAGE_COLUMN):
        if isinstance(cell, str) and _DATA_URI_START.match(cell):
            try:
                replace(split_data_uri(cell))
                changed = True
            except ImageInputError as e:
                bad.append((i, e.reason))
    return changed, describe_bad_rows(bad) if bad else None


def _lone_surrogate(body: bytes, document: Any) -> bool:
    """A lone UTF-16 surrogate escape (\\ud800) in any string: MLflow fails to encode it and
    answers with the request in its message. The raw bytes are searched first (fast)."""
    if not _SURROGATE_ESCAPE.search(body):
        return False
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value
    return False


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
    raw body, long runs of base64; at most 600 characters. A failed schema check says only
    which column failed, when MLflow names one: its message is mostly the request."""
    message = PREDICT_ECHO.sub("", message)
    if SCHEMA_FAILURE in message:
        column = _COLUMN_HINT.search(message)
        return SCHEMA_MESSAGE.format(hint=f" for column '{column.group(1)}'" if column else "")
    message = INPUT_ECHO.sub("", message)
    message = _LONG_TOKEN.sub("<omitted>", message)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


async def _respond(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app():
    """The guarded scoring app of the model `scoring_model_path_env()` names (as uvicorn loads it)."""
    return Guard(scoring_app(), int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)))


def __getattr__(name: str):
    if name == "app":  # `uvicorn mlflow_clip.gateway:app`, built on first access
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def choose_port(host: str, port: int | None) -> int:
    """`port` if it is free on `host`; with None, `DEFAULT_PORT` or the next free one up to
    `LAST_PORT` (never 5000, which `mlflow ui` and `mlflow models serve` take by default).
    Raises `PortInUseError` in one line naming the fix."""
    candidates = [port] if port is not None else list(range(DEFAULT_PORT, LAST_PORT + 1))
    for candidate in candidates:
        if _port_is_free(host, candidate):
            return candidate
    taken = f"port {port} is" if port is not None else f"ports {DEFAULT_PORT} to {LAST_PORT} are"
    raise PortInUseError(f"Cannot serve on {host}: {taken} in use. Stop what listens there, or pick a port with -p.")


def _port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def serve(
    model_uri: str,
    host: str,
    port: int,
    workers: int,
    timeout: int,
    max_body_bytes: int,
    say: Callable[[str], Any] = print,
) -> None:
    """Download the model and check it (`download.download_verified`: the version resolved
    once, every file against its manifest, the manifest against the registry's record) before
    any of its code runs, then run the guarded scoring server on that directory in the
    foreground; `say` gets one line naming what is served, and where."""
    import atexit
    import sys

    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    from mlflow_clip.download import download_verified

    model = download_verified(model_uri)
    atexit.register(model.cleanup)
    served = model.source + (f" ({model_uri})" if model.source != model_uri else "")
    say(f"mlflow-clip serve: {served}, checked, at http://{host}:{port} (Ctrl+C stops it)")
    local = str(model.path)
    env = {
        **os.environ,
        scoring_model_path_env(): local,
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
    raise SystemExit(run_server(command, env))


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Run the server `command` as a child that lives and dies with this process, and return its
    exit code (128 + the signal's number if a signal ended it).

    SIGTERM, SIGINT and SIGHUP sent to this process are passed on to the server (which then
    shuts down and frees its port), and this process waits for it; the server runs in its own
    process group, so that Ctrl-C reaches it once, through here. On Linux the server also
    gets SIGTERM if this process dies without passing anything on (SIGKILL)."""
    import signal
    import subprocess

    child = subprocess.Popen(command, env=env, process_group=0, preexec_fn=_ends_with_parent(os.getpid()))

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def _ends_with_parent(parent: int) -> Callable[[], None]:
    def ask_for_sigterm() -> None:  # runs in the child, between fork and exec
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return ask_for_sigterm
