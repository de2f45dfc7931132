"""A request's rows and options in, the output table out: what the classifier reads and writes.

>>> coerce_rows({"image": [png_bytes, jpeg_bytes]})  # doctest: +SKIP
>>> request_classes(["a cat", "a dog"], InputLimits())
['a cat', 'a dog']
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InvalidInputError, shown
from .limits import InputLimits
from .prompts import TEMPLATE_PRESETS, PromptError, parse_classes, resolve_templates

IMAGE_COLUMN = "image"
ON_ERROR_CHOICES = ("raise", "null")


def request_classes(value: Any, limits: InputLimits = InputLimits()) -> list[str]:
    """Labels sent with a request: a list of names, or one comma-separated string."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"Received classes of type {type(value).__name__}; expected a list of names.")
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise InvalidInputError(f"Class {index} is {type(name).__name__}, not text; send a list of names.")
        check_length(name, f"Class {index}", limits)
    if len(value) > limits.max_classes:
        raise InvalidInputError(
            f"Received {len(value)} classes; expected at most {limits.max_classes} per request. "
            "Export a model with the classes baked in instead."
        )
    try:
        return parse_classes(list(value))
    except PromptError as e:
        raise InvalidInputError(str(e)) from None


def request_templates(value: Any, limits: InputLimits = InputLimits()) -> list[str]:
    """Templates sent with a request: a preset name, one template with {}, or a list of them."""
    if isinstance(value, str):
        key = value.strip()
        value = list(TEMPLATE_PRESETS[key]) if key in TEMPLATE_PRESETS else [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise InvalidInputError("Received templates that are not text; send a preset name or templates with {}.")
    if len(value) > limits.max_templates:
        raise InvalidInputError(f"Received {len(value)} templates; expected at most {limits.max_templates}.")
    for index, template in enumerate(value):
        check_length(template, f"Template {index}", limits)
    try:
        return resolve_templates(list(value))
    except PromptError as e:
        raise InvalidInputError(f"{e} Or send one of the presets: {', '.join(sorted(TEMPLATE_PRESETS))}.") from None


def check_length(text: str, what: str, limits: InputLimits) -> None:
    """Refuse a text over `max_text_chars` before anything tokenizes it."""
    if len(text) > limits.max_text_chars:
        raise InvalidInputError(
            f"{what} has {len(text)} characters; expected at most {limits.max_text_chars} (max_text_chars): CLIP reads "
            "77 tokens, a few hundred characters. Shorten it.",
            [],
        )


def check_texts(texts: Sequence[Any], limits: InputLimits) -> None:
    """Texts to embed: a string in every row, none over `max_text_chars`; names every bad row."""
    bad = [(i, describe_text(t)) for i, t in enumerate(texts) if not isinstance(t, str)]
    bad += [
        (i, f"{len(t)} characters > limit {limits.max_text_chars} (max_text_chars)")
        for i, t in enumerate(texts)
        if isinstance(t, str) and len(t) > limits.max_text_chars
    ]
    if bad:
        bad.sort()
        parts = "; ".join(f"row {i}: {reason}" for i, reason in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InvalidInputError(
            f"{len(bad)} text row(s) cannot be embedded: {parts}{more}. Send a string of at most "
            f"{limits.max_text_chars} characters in every row of the 'text' column.",
            bad,
        )


def describe_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing (null), not text"
    return f"a {type(value).__name__}, not text"


def format_embeddings(embeddings: np.ndarray, errors: list[str | None]) -> pd.DataFrame:
    """The embedding table: `embedding` (a list of floats, None for unreadable rows), `error`."""
    ok = ~np.isnan(embeddings).any(axis=1) if embeddings.size else np.ones(len(errors), dtype=bool)
    return pd.DataFrame(
        {
            "embedding": [row.astype(float).tolist() if good else None for row, good in zip(embeddings, ok)],
            "error": pd.Series(errors, dtype=object),
        }
    )


def coerce_rows(data: Any) -> list[Any]:
    """The image values of a request, one per row, whatever container they came in."""
    if isinstance(data, pd.DataFrame):
        return _rows_from_frame(data)
    if isinstance(data, pd.Series):
        return list(data)
    if isinstance(data, Mapping):
        return _rows_from_mapping(data)
    if isinstance(data, np.ndarray) and data.dtype != object:
        if data.ndim == 4 or (data.ndim == 3 and data.shape[-1] not in (3, 4)):
            return list(data)
        return [data]
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        return [data]
    if isinstance(data, Iterable):
        return [row[IMAGE_COLUMN] if isinstance(row, Mapping) and IMAGE_COLUMN in row else row for row in data]
    raise InvalidInputError(
        f"Received input of type {type(data).__name__}; expected a DataFrame with an "
        f"'{IMAGE_COLUMN}' column, a list of images, or a dict {{'{IMAGE_COLUMN}': [...]}}."
    )


def _rows_from_frame(frame: pd.DataFrame) -> list[Any]:
    if IMAGE_COLUMN in frame.columns:
        return list(frame[IMAGE_COLUMN])
    if len(frame.columns) == 1:
        return list(frame.iloc[:, 0])
    if len(frame.columns) == 0:
        raise InvalidInputError(
            f"Received rows without an '{IMAGE_COLUMN}' or 'text' column (MLflow drops the columns a "
            f"model's signature does not name, so check the column's name): send images in '{IMAGE_COLUMN}', "
            "texts to embed in 'text'."
        )
    raise InvalidInputError(
        f"Received columns {list(map(str, frame.columns))}; expected a column named '{IMAGE_COLUMN}' "
        "holding the images."
    )


def _rows_from_mapping(data: Mapping) -> list[Any]:
    if IMAGE_COLUMN not in data:
        raise InvalidInputError(f"Received a dict with keys {list(map(str, data))}; expected the key '{IMAGE_COLUMN}'.")
    value = data[IMAGE_COLUMN]
    if isinstance(value, (list, tuple, pd.Series)) or (isinstance(value, np.ndarray) and value.dtype == object):
        return list(value)
    return [value]


def check_options(top_k: Any, on_error: Any, num_classes: int) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise InvalidInputError(f"Received on_error={shown(on_error)}; expected one of {list(ON_ERROR_CHOICES)}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InvalidInputError(
            f"Received top_k={shown(top_k)}; expected a whole number from 0 (off) to {num_classes}."
        )


def describe_bad_rows(bad: list[tuple[int, str]], shown: int = 5) -> str:
    parts = [f"row {index}: {reason}" for index, reason in bad[:shown]]
    more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
    return (
        f"{len(bad)} input row(s) could not be read as images: " + "; ".join(parts) + more + ". "
        "Send each image's encoded bytes (JPEG, PNG, WebP, BMP, GIF or TIFF), base64-encoded in "
        'JSON requests, or pass params {"on_error": "null"} to get a null label for bad rows.'
    )


def format_predictions(
    probabilities: np.ndarray,
    errors: list[str | None],
    classes: Sequence[str],
    top_k: int = 0,
    on_error: str = "raise",
) -> pd.DataFrame:
    """The output table: label, score, probabilities, error (+ top_labels, top_scores)."""
    ok = ~np.isnan(probabilities).any(axis=1)
    best = np.where(ok, np.nan_to_num(probabilities).argmax(axis=1), 0)
    if ok.all():  # every row scored: whole columns at once (this runs on every request)
        rows = probabilities.astype(np.float64)
        labels = pd.Series(np.asarray(classes, dtype=object)[best], dtype=object, copy=False)
        scores = pd.Series(rows[np.arange(len(rows)), best], dtype=float, copy=False)
        table = rows.tolist()
    else:  # object columns keep None as None (JSON null), not pandas' NaN
        labels = pd.Series([classes[b] if good else None for b, good in zip(best, ok)], dtype=object)
        scores = pd.Series(
            [float(probabilities[i, b]) if good else None for i, (b, good) in enumerate(zip(best, ok))], dtype=object
        )
        table = [row.astype(float).tolist() if good else None for row, good in zip(probabilities, ok)]
    out = pd.DataFrame({"label": labels, "score": scores, "probabilities": table})
    if top_k:
        k = min(int(top_k), len(classes))
        order = np.argsort(-np.nan_to_num(probabilities), axis=1, kind="stable")[:, :k]
        out["top_labels"] = [[classes[j] for j in row] if good else None for row, good in zip(order, ok)]
        out["top_scores"] = [
            [float(probabilities[i, j]) for j in row] if good else None for i, (row, good) in enumerate(zip(order, ok))
        ]
    out["error"] = pd.Series(errors, dtype=object)
    return out
