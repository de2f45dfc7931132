"""Client helpers: turn image files into request rows for a served mlflow-clip model.

The server never opens paths or URLs it is sent; clients read their own files and send bytes.

    >>> body = request_body(["cat.jpg", "dog.png"], params={"top_k": 3})  # doctest: +SKIP
    >>> requests.post("http://127.0.0.1:5000/invocations", json=body).json()  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

from mlflow_clip.errors import UsageError

REQUEST_FORMS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def encode_image(path: str | os.PathLike) -> str:
    """The base64 text of an image file, as JSON requests carry it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def image_rows(paths: Iterable[str | os.PathLike]) -> list[str]:
    """One base64 row per image file, in order."""
    return [encode_image(path) for path in paths]


def request_body(
    paths: Sequence[str | os.PathLike],
    params: dict[str, Any] | None = None,
    form: str = "dataframe_split",
) -> dict[str, Any]:
    """A JSON body for `POST /invocations` in any of MLflow's four input forms."""
    rows = image_rows(paths)
    if form == "dataframe_split":
        body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
    elif form == "dataframe_records":
        body = {"dataframe_records": [{"image": r} for r in rows]}
    elif form == "instances":
        body = {"instances": [{"image": r} for r in rows]}
    elif form == "inputs":
        body = {"inputs": {"image": rows}}
    else:
        raise UsageError(f"Received form={form!r}; expected one of {list(REQUEST_FORMS)}.")
    if params:
        body["params"] = dict(params)
    return body


def predict_files(
    url: str,
    paths: Sequence[str | os.PathLike],
    params: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Classify image files with a model served at `url` (e.g. http://127.0.0.1:5000).

    `params={"classes": ["a forklift", "a pallet"]}` asks about labels the model was not
    exported with; `params={"output": "embedding"}` returns image embeddings instead.
    """
    return _post(url, request_body(paths, params), timeout)


def embed_texts(url: str, texts: Sequence[str], timeout: float = 60.0) -> list[list[float]]:
    """Normalized CLIP text embeddings from a served model, one per text (for image search)."""
    return [row["embedding"] for row in _post(url, {"inputs": {"text": list(texts)}}, timeout)]


def _post(url: str, body: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["predictions"]
