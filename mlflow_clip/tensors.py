"""The V2 (Open Inference) protocol's tensors for an mlflow-clip model: a request's input tensors
and parameters read and checked, the model's output table as typed tensors, and the model's
metadata. Plain dicts and numpy, no MLServer: `mlflow_clip.mlserver.ClipRuntime` wraps them.

Outputs carry the type the model computes (`serving/signature.py`): numbers are `FP32`, with a
row per image and a column per class, top-k entry or embedding dimension (`[N, C]`, `[N, k]`,
`[N, D]`); text is `BYTES` (`label` `[N]`, `top_labels` `[N, k]`, `error` `[N]`). A row whose
image could not be read (`on_error="null"`) has `""` for its texts and NaN for its numbers
(null in JSON), and its `error` says why.

    >>> request = read_request([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
    ...                        {"top_k": 2})  # doctest: +SKIP
    >>> answer_tensors(model.predict(request.frame, request.params))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mlflow_clip.batching import BatchItem
from mlflow_clip.errors import InternalError, RequestError
from mlflow_clip.serving.signature import IMAGE_COLUMN, OUTPUTS, PARAM_DEFAULTS, TEXT_COLUMN

DATATYPES = {"string": "BYTES", "float": "FP32"}
MAX_SHOWN_CHARS = 40

__all__ = ["RequestError", "answer_tensors", "metadata_tensors", "model_params", "read_request"]


def model_params(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's parameters among a request's `parameters` (MLServer adds its own, such as
    `headers` and `content_type`, which are not the model's)."""
    return {k: v for k, v in (parameters or {}).items() if k in PARAM_DEFAULTS}


def read_request(inputs: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any] | None = None) -> BatchItem:
    """One input tensor, `image` (encoded images: raw bytes over gRPC, base64 text in JSON) or
    `text`, of datatype BYTES and shape [N] or [N, 1], as the model's rows and parameters."""
    if len(inputs) != 1:
        names = [str(i.get("name")) for i in inputs]
        raise RequestError(
            f"Received {len(inputs)} input tensors {names[:4]}; expected one: '{IMAGE_COLUMN}' (images to "
            f"classify or embed) or '{TEXT_COLUMN}' (texts to embed), one kind per request."
        )
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), list(tensor.get("shape") or [])
    if name not in (IMAGE_COLUMN, TEXT_COLUMN):
        raise RequestError(
            f"Received an input tensor named {_shown(name)}; expected '{IMAGE_COLUMN}' (images) or '{TEXT_COLUMN}'."
        )
    if datatype != "BYTES":
        raise RequestError(f"Received '{name}' as {_shown(datatype)}; expected datatype BYTES.")
    data = list(tensor.get("data") or [])
    if not shape or len(shape) > 2 or (len(shape) == 2 and shape[1] != 1) or shape[0] != len(data):
        raise RequestError(
            f"Received '{name}' with shape {shape[:4]} and {len(data)} values; expected shape [{len(data)}] "
            f"or [{len(data)}, 1]: one {'image' if name == IMAGE_COLUMN else 'text'} per row."
        )
    if name == TEXT_COLUMN:
        data = [value.decode("utf-8", "replace") if isinstance(value, bytes) else value for value in data]
    params = model_params(parameters)
    key = (name, json.dumps(params, sort_keys=True, default=str))
    return BatchItem(pd.DataFrame({name: pd.Series(data, dtype=object)}), params, key)


def answer_tensors(out: pd.DataFrame | pd.Series, widths: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """The model's answer as V2 output tensors, in its column order. `widths`: each list
    column's width for an answer with no row to read it from (every image failed)."""
    table = out.to_frame() if isinstance(out, pd.Series) else out
    kinds = {name: (kind, is_list) for name, kind, is_list, _ in OUTPUTS}
    tensors = []
    for name in table.columns:
        kind, is_list = kinds.get(str(name), ("string", False))
        values = list(table[name])
        if is_list:
            width = max((len(v) for v in values if _present(v)), default=(widths or {}).get(str(name), 0))
            tensors.append(_list_tensor(str(name), kind, values, width))
        else:
            tensors.append(_tensor(str(name), kind, values, [len(values)]))
    return tensors


def _list_tensor(name: str, kind: str, values: list, width: int) -> dict[str, Any]:
    fill = [""] * width if kind == "string" else [math.nan] * width
    rows = [list(v) if _present(v) else fill for v in values]
    if any(len(row) != width for row in rows):  # the model's lists are one width per answer
        raise InternalError(f"the model's {name} lists differ in length")
    return _tensor(name, kind, [item for row in rows for item in row], [len(values), width])


def _tensor(name: str, kind: str, flat: list, shape: list[int]) -> dict[str, Any]:
    if kind == "string":
        data: list = ["" if not _present(v) else str(v) for v in flat]
    else:
        data = np.asarray([math.nan if not _present(v) else v for v in flat], dtype=np.float32).tolist()
    return {"name": name, "datatype": DATATYPES[kind], "shape": shape, "data": data}


def _present(value: Any) -> bool:
    if value is None:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def metadata_tensors(classes: int, embedding_dim: int) -> tuple[list[dict], list[dict]]:
    """The model's inputs and every output it can return, with their shapes (-1: varies per
    request: the rows, the top-k count; per-request classes change the probabilities' width)."""
    inputs = [
        {"name": IMAGE_COLUMN, "datatype": "BYTES", "shape": [-1]},
        {"name": TEXT_COLUMN, "datatype": "BYTES", "shape": [-1]},
    ]
    widths = {"probabilities": classes, "embedding": embedding_dim or -1}
    outputs = [
        {"name": name, "datatype": DATATYPES[kind], "shape": [-1, widths.get(name, -1)] if is_list else [-1]}
        for name, kind, is_list, _ in OUTPUTS
    ]
    return inputs, outputs


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."
