"""Images sent as images to `mlflow-clip serve`: a raw `image/*` body, or `multipart/form-data`
with one or many files, turned into the JSON request MLflow's scoring server takes.

    $ curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'localhost:5001/invocations?top_k=3'
    $ curl -F image=@a.jpg -F image=@b.png -F classes='a cat,a dog' localhost:5001/invocations

A raw body is one row; its parameters come from the query string. A form's files are the rows,
in the order sent (every part with a filename, or named `image`); its other fields are the
parameters. Either way the answer is the one the equivalent JSON request gets
(`{"inputs": {"image": [<base64>, ...]}, "params": {...}}`), under the same limits: the body
limit applies to the upload as sent, the model's own limits to each image. Parameters are typed
as the model's signature declares them: `top_k` a whole number, `truncate` true or false,
`classes` repeated fields or one comma-separated field; an unknown field is refused by name.
Parsing is linear in the body (one split on the boundary) and the parts are counted before any
is read.
"""

from __future__ import annotations

import base64
import json
from email.message import Message
from urllib.parse import parse_qsl

IMAGE_FIELD = "image"
FORM = "multipart/form-data"
RAW_TYPES = ("image/", "application/octet-stream")
# The request's parameters and how a text field becomes each (serving.signature's ParamSchema).
PARAM_KINDS = {
    "top_k": "int",
    "on_error": "str",
    "output": "str",
    "classes": "list",
    "templates": "str",
    "truncate": "bool",
}
MAX_FIELD_BYTES = 64 * 1024  # a parameter field; the labels limits then apply to its contents
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

Problem = tuple[int, str, str]


def is_upload(media_type: str) -> bool:
    """Whether `media_type` (lower case, without parameters) is an upload this module reads."""
    return media_type == FORM or media_type.startswith(RAW_TYPES)


def upload_to_json(content_type: str, body: bytes, query: bytes, max_parts: int) -> tuple[bytes, Problem | None]:
    """The JSON request equivalent to an upload, or a 400 naming the problem and the fix."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == FORM:
        images, fields, problem = _form_parts(content_type, body, max_parts)
        if problem:
            return b"", _bad(problem)
        if not images:
            return b"", _bad("The form holds no file. Send each image as a file field, e.g. curl -F image=@photo.jpg.")
    else:
        if not body:
            return b"", _bad("The body is empty. Send the image's bytes, e.g. curl --data-binary @photo.jpg.")
        images = [body]
        fields = [(name, value) for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    params, problem = _params(fields)
    if problem is not None:
        return b"", _bad(problem)
    document = {"inputs": {IMAGE_FIELD: [base64.b64encode(image).decode("ascii") for image in images]}}
    if params:
        document["params"] = params
    return json.dumps(document).encode(), None


def _bad(message: str) -> Problem:
    return 400, "BAD_REQUEST", message


def _form_parts(content_type: str, body: bytes, max_parts: int) -> tuple[list[bytes], list[tuple[str, str]], str]:
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
        return [], [], "The multipart body has no valid boundary. Let the client set Content-Type (curl -F does)."
    delimiter, data = b"\r\n--" + boundary.encode("latin-1"), b"\r\n" + body
    parts = data.count(delimiter) - 1  # the closing delimiter ends the last part
    if parts > max_parts:
        return [], [], f"The form holds {parts} parts; expected at most {max_parts}. Send fewer files per request."
    segments = data.split(delimiter)
    if len(segments) < 2 or not segments[-1].startswith(b"--"):
        return [], [], "The multipart body is cut short (no closing boundary). Send the whole form."
    images: list[bytes] = []
    fields: list[tuple[str, str]] = []
    for number, segment in enumerate(segments[1:-1]):
        head, separator, content = segment.partition(b"\r\n\r\n")
        if not separator:
            return [], [], f"Part {number} of the form has no headers. Send a well-formed multipart/form-data body."
        name, filename, media_type = _part_headers(head)
        if filename is not None or name == IMAGE_FIELD:
            if media_type and not media_type.startswith(RAW_TYPES):
                return (
                    [],
                    [],
                    (
                        f"Part {number} of the form ({name!r}) is {media_type}, not an image. Send image files "
                        "(image/* or application/octet-stream)."
                    ),
                )
            images.append(content)
        elif len(content) > MAX_FIELD_BYTES:
            return [], [], f"The form field {name!r} holds over {MAX_FIELD_BYTES} bytes. Send a shorter value."
        else:
            try:
                fields.append((name or "", content.decode("utf-8")))
            except UnicodeDecodeError:
                return [], [], f"The form field {name!r} is not UTF-8 text. Send parameters as UTF-8."
    return images, fields, ""


def _part_headers(head: bytes) -> tuple[str | None, str | None, str]:
    """A part's field name, file name (None when not a file) and media type."""
    message = Message()
    for line in head.decode("latin-1").split("\r\n"):
        key, colon, value = line.partition(":")
        if colon:
            message[key.strip()] = value.strip()
    name = message.get_param("name", header="content-disposition")
    filename = message.get_param("filename", header="content-disposition")
    media_type = (message.get("content-type") or "").split(";")[0].strip().lower()
    return (
        name if isinstance(name, str) else None,
        filename if isinstance(filename, str) else None,
        media_type,
    )


def _params(fields: list[tuple[str, str]]) -> tuple[dict, str | None]:
    params: dict = {}
    for name, value in fields:
        kind = PARAM_KINDS.get(name)
        if kind is None:
            return (
                {},
                f"Received the field {name[:40]!r}; expected image files and the parameters {', '.join(PARAM_KINDS)}.",
            )
        if kind == "list":
            params.setdefault(name, []).append(value)
        elif name in params:
            return {}, f"Received the field {name!r} twice; send it once."
        elif kind == "int":
            if not value.strip().isdigit():
                return {}, f"Received {name}={value[:40]!r}; expected a whole number, such as {name}=3."
            params[name] = int(value)
        elif kind == "bool":
            if value.strip().lower() not in _TRUE + _FALSE:
                return {}, f"Received {name}={value[:40]!r}; expected true or false."
            params[name] = value.strip().lower() in _TRUE
        else:
            params[name] = value
    if len(params.get("classes", [])) == 1:  # one field: comma-separated, as the export takes them
        params["classes"] = [label.strip() for label in params["classes"][0].split(",")]
    return params, None
