"""The native, torch-free zero-shot classifier: image bytes in, class probabilities out.

    >>> classifier = ZeroShotClassifier.from_directory("path/to/model")  # doctest: +SKIP
    >>> classifier.predict([open("cat.jpg", "rb").read()])  # doctest: +SKIP
         label     score          probabilities
    0    a cat  0.97...  [0.01..., 0.97..., ...]
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mlflow_clip.config import ClassifierConfig
from mlflow_clip.images import ImageInputError, ImageLimits, decode_image
from mlflow_clip.preprocess import Preprocessor
from mlflow_clip.runtime import OrtSession, RuntimeSettings

_logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
ON_ERROR_CHOICES = ("raise", "null")
DEFAULT_MAX_ROWS = 10_000  # Spark's default Arrow batch size, so spark_udf works out of the box.


class InvalidInputError(ValueError):
    """A request the model cannot score; `rows` lists (row index, reason) pairs."""

    def __init__(self, message: str, rows: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.rows = list(rows)


@dataclass(frozen=True)
class InputLimits:
    """Safe defaults for untrusted requests; each one is configurable in MLmodel or at load."""

    max_bytes: int = ImageLimits().max_bytes
    max_pixels: int = ImageLimits().max_pixels
    max_rows: int = DEFAULT_MAX_ROWS

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels)


class ZeroShotClassifier:
    """Scores images against the classes baked into the ONNX graph."""

    def __init__(
        self,
        onnx_path: str | Path,
        config: ClassifierConfig,
        settings: RuntimeSettings = RuntimeSettings(),
        limits: InputLimits = InputLimits(),
        decode_workers: int | None = None,
    ):
        self.config = config
        self.limits = limits
        self.preprocessor = Preprocessor(
            input_resolution=config.input_resolution,
            mean=tuple(config.mean),
            std=tuple(config.std),
        )
        self.session = OrtSession(onnx_path, settings)
        self._probabilities_output = self.session.output_names[0]
        workers = decode_workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlflow-clip-decode")

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def predict(
        self, images: Any, top_k: int = 0, on_error: str = "raise"
    ) -> pd.DataFrame:
        """Classify images; one output row per input row, in order.

        `images`: a DataFrame with an `image` column, a list/Series/dict of image values
        (encoded bytes, base64 text, data URIs, uint8 arrays), or a uint8 array batch.
        """
        rows = coerce_rows(images)
        _check_options(top_k, on_error, len(self.config.classes))
        if len(rows) > self.limits.max_rows:
            raise InvalidInputError(
                f"Received {len(rows)} rows; expected at most {self.limits.max_rows} per request. "
                "Split the request, or raise max_rows in the model's runtime configuration."
            )
        probabilities = np.full((len(rows), len(self.config.classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(rows)
        chunk = max(1, self.session.settings.chunk_size)
        for start in range(0, len(rows), chunk):
            self._predict_chunk(rows, start, min(start + chunk, len(rows)), probabilities, errors, on_error)
        return format_predictions(probabilities, errors, self.config.classes, top_k, on_error)

    def predict_tensors(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for already-preprocessed float32 images [N, 3, R, R]."""
        return self.session.run(np.ascontiguousarray(batch, dtype=np.float32), [self._probabilities_output])[0]

    def _predict_chunk(self, rows, start, stop, probabilities, errors, on_error) -> None:
        limits = self.limits.image_limits()
        loaded = list(self._pool.map(lambda value: self._load(value, limits), rows[start:stop]))
        bad = [(start + i, item.reason) for i, item in enumerate(loaded) if isinstance(item, ImageInputError)]
        if bad and on_error == "raise":
            raise InvalidInputError(_describe_bad_rows(bad), bad)
        for index, reason in bad:
            errors[index] = reason
        good = [i for i, item in enumerate(loaded) if not isinstance(item, ImageInputError)]
        if not good:
            return
        batch = np.stack([loaded[i] for i in good])
        probabilities[[start + i for i in good]] = self.predict_tensors(batch)

    def _load(self, value: Any, limits: ImageLimits) -> np.ndarray | ImageInputError:
        try:
            return self.preprocessor(decode_image(value, limits))
        except ImageInputError as e:
            return e

    def close(self) -> None:
        self._pool.shutdown(wait=False)


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
    raise InvalidInputError(
        f"Received columns {list(map(str, frame.columns))}; expected a column named '{IMAGE_COLUMN}' "
        "holding the images."
    )


def _rows_from_mapping(data: Mapping) -> list[Any]:
    if IMAGE_COLUMN not in data:
        raise InvalidInputError(
            f"Received a dict with keys {list(map(str, data))}; expected the key '{IMAGE_COLUMN}'."
        )
    value = data[IMAGE_COLUMN]
    if isinstance(value, (list, tuple, pd.Series)) or (isinstance(value, np.ndarray) and value.dtype == object):
        return list(value)
    return [value]


def _check_options(top_k: Any, on_error: Any, num_classes: int) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise InvalidInputError(f"Received on_error={on_error!r}; expected one of {list(ON_ERROR_CHOICES)}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InvalidInputError(
            f"Received top_k={top_k!r}; expected a whole number from 0 (off) to {num_classes}."
        )


def _describe_bad_rows(bad: list[tuple[int, str]], shown: int = 5) -> str:
    parts = [f"row {index}: {reason}" for index, reason in bad[:shown]]
    more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
    return (
        f"{len(bad)} input row(s) could not be read as images: " + "; ".join(parts) + more + ". "
        "Send each image's encoded bytes (JPEG, PNG, WebP, BMP, GIF or TIFF), base64-encoded in "
        "JSON requests, or pass params {\"on_error\": \"null\"} to get a null label for bad rows."
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
    labels = [classes[b] if good else None for b, good in zip(best, ok)]
    scores = [float(probabilities[i, b]) if good else None for i, (b, good) in enumerate(zip(best, ok))]
    # object columns keep None as None (JSON null), not pandas' NaN
    out = pd.DataFrame(
        {
            "label": pd.Series(labels, dtype=object),
            "score": pd.Series(scores, dtype=object if not ok.all() else float),
            "probabilities": [row.astype(float).tolist() if good else None for row, good in zip(probabilities, ok)],
        }
    )
    if top_k:
        k = min(int(top_k), len(classes))
        order = np.argsort(-np.nan_to_num(probabilities), axis=1, kind="stable")[:, :k]
        out["top_labels"] = [[classes[j] for j in row] if good else None for row, good in zip(order, ok)]
        out["top_scores"] = [
            [float(probabilities[i, j]) for j in row] if good else None for i, (row, good) in enumerate(zip(order, ok))
        ]
    out["error"] = pd.Series(errors, dtype=object)
    return out
