"""The native, torch-free zero-shot classifier: image bytes in, class probabilities out.

>>> classifier = ZeroShotClassifier.from_directory("path/to/model")  # doctest: +SKIP
>>> classifier.predict([open("cat.jpg", "rb").read()])  # doctest: +SKIP
     label     score          probabilities
0    a cat  0.97...  [0.01..., 0.97..., ...]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .contract import ClassifierConfig
from .errors import MlflowClipError
from .images import ImageInputError, decode_image
from .limits import InputLimits
from .preprocess import Preprocessor
from .prompts import TEMPLATE_PRESETS, PromptError, parse_classes, resolve_templates
from .runtime import OrtSession, RuntimeSettings
from .text import TextEncoder, softmax_scores

IMAGE_COLUMN = "image"
ON_ERROR_CHOICES = ("raise", "null")


class InvalidInputError(MlflowClipError, ValueError):
    """A request the model cannot score; `rows` lists (row index, reason) pairs."""

    def __init__(self, message: str, rows: Sequence[tuple[int, str]] = ()):
        super().__init__(message)
        self.rows = list(rows)


class ZeroShotClassifier:
    """Scores images against the classes baked into the ONNX graph, or against labels chosen per
    request (with the model's text encoder), and returns image or text embeddings."""

    def __init__(
        self,
        onnx_path: str | Path,
        config: ClassifierConfig,
        settings: RuntimeSettings = RuntimeSettings(),
        limits: InputLimits = InputLimits(),
        decode_workers: int | None = None,
        text_encoder: TextEncoder | None = None,
    ):
        self.config = config
        self.limits = limits
        self.preprocessor = Preprocessor.from_config(config)
        self.session = OrtSession(onnx_path, settings)
        self._probabilities_output = self.session.output_names[0]
        outputs = self.session.output_names
        self._embedding_output = config.embedding_output if config.embedding_output in outputs[1:] else None
        self.text_encoder = text_encoder
        self._draft_size = config.input_resolution if settings.jpeg_draft else None
        workers = decode_workers or settings.decode_workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlflow-clip-decode")
        self._shards = settings.shard_count
        self._shard_pool = ThreadPoolExecutor(max_workers=max(1, self._shards), thread_name_prefix="mlflow-clip-shard")

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def has_embeddings(self) -> bool:
        return self._embedding_output is not None

    def predict(
        self,
        images: Any,
        top_k: int = 0,
        on_error: str = "raise",
        classes: Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Classify images; one output row per input row, in order.

        `images`: a DataFrame with an `image` column, a list/Series/dict of image values
        (encoded bytes, base64 text, data URIs, uint8 arrays), or a uint8 array batch.
        `classes` (with `templates`, default the model's own) classifies against those labels
        instead of the baked ones, through the model's text encoder; the columns are the same.
        """
        rows = coerce_rows(images)
        if classes is None or len(classes) == 0:
            _check_options(top_k, on_error, len(self.config.classes))
            self._check_row_count(rows)
            probabilities, errors = self._run_images(rows, on_error, self._probabilities_output)
            return format_predictions(probabilities, errors, self.config.classes, top_k, on_error)
        names = request_classes(classes, self.limits)
        template_texts = request_templates(templates, self.limits) if templates else list(self.config.template_texts)
        _check_options(top_k, on_error, len(names))
        self._check_row_count(rows)
        features = self._text_encoder("per-request classes").class_features(names, template_texts)
        embeddings, errors = self._run_images(rows, on_error, self._require_embeddings("per-request classes"))
        probabilities = np.full((len(rows), len(names)), np.nan, dtype=np.float32)
        ok = ~np.isnan(embeddings).any(axis=1)
        if ok.any():
            probabilities[ok] = softmax_scores(embeddings[ok], features, self.config.logit_scale)
        return format_predictions(probabilities, errors, names, top_k, on_error)

    def embed_images(self, images: Any, on_error: str = "raise") -> pd.DataFrame:
        """One L2-normalized image embedding per row: columns `embedding` and `error`."""
        rows = coerce_rows(images)
        _check_options(0, on_error, 0)
        self._check_row_count(rows)
        embeddings, errors = self._run_images(rows, on_error, self._require_embeddings("image embeddings"))
        return format_embeddings(embeddings, errors)

    def embed_text(self, texts: Sequence[Any]) -> pd.DataFrame:
        """One L2-normalized text embedding per text (CLIP truncates texts over its context)."""
        texts = list(texts)
        self._check_row_count(texts)
        bad = [(i, _describe_text(t)) for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            parts = "; ".join(f"row {i}: {reason}" for i, reason in bad[:5])
            raise InvalidInputError(
                f"{len(bad)} text row(s) are not text: {parts}. Send a string in every row of the 'text' column.", bad
            )
        embeddings = self._text_encoder("text embeddings").embed(texts)
        return format_embeddings(embeddings, [None] * len(texts))

    def predict_tensors(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for already-preprocessed float32 images [N, 3, R, R], in chunks."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        chunk = max(1, self.session.settings.chunk_size)
        parts = [
            self.session.run(batch[start : start + chunk], [self._probabilities_output])[0]
            for start in range(0, len(batch), chunk)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.config.classes)), np.float32)

    def _text_encoder(self, purpose: str) -> TextEncoder:
        if self.text_encoder is None:
            raise InvalidInputError(
                f"This model has no text encoder, which {purpose} need. Re-export it with the text "
                "encoder (the default; -P text_encoder=true), or omit that parameter."
            )
        return self.text_encoder

    def _require_embeddings(self, purpose: str) -> str:
        if self._embedding_output is None:
            raise InvalidInputError(
                f"This model's graph has no image-embedding output, which {purpose} need. Re-export it "
                "with this version of mlflow-clip, or omit that parameter."
            )
        return self._embedding_output

    def _check_row_count(self, rows: Sequence[Any]) -> None:
        if len(rows) > self.limits.max_rows:
            raise InvalidInputError(
                f"Received {len(rows)} rows; expected at most {self.limits.max_rows} per request. "
                "Split the request, or raise max_rows in the model's runtime configuration."
            )

    def _run_images(self, rows: list[Any], on_error: str, output: str) -> tuple[np.ndarray, list[str | None]]:
        """`output` for every row (NaN rows where an image could not be read), and the errors.

        Rows go to onnxruntime in chunks of `chunk_size`. Each chunk is split into `shards` that
        run concurrently, each decoding its own images and then running the graph, so one
        shard's decoding overlaps another's inference; with one shard the decode pool decodes
        the whole chunk first. With on_error="raise" every row is still decoded, so that the
        error lists all bad rows.
        """
        values: np.ndarray | None = None
        errors: list[str | None] = [None] * len(rows)
        bad: list[tuple[int, str]] = []
        chunk = max(1, self.session.settings.chunk_size)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            shards = min(self._shards, len(part))
            run = not (bad and on_error == "raise")  # a failed request only collects its bad rows
            if shards <= 1:
                loaded = list(self._pool.map(self._load, part))
                results = [self._run_loaded(loaded, 0, run, on_error, output)]
            else:
                cuts = np.linspace(0, len(part), shards + 1).astype(int)
                results = list(
                    self._shard_pool.map(
                        lambda lo, hi, part=part, run=run: self._run_loaded(
                            [self._load(v) for v in part[lo:hi]], lo, run, on_error, output
                        ),
                        cuts[:-1],
                        cuts[1:],
                    )
                )
            for offsets, result, failures in results:
                for offset, reason in failures:
                    bad.append((start + offset, reason))
                    errors[start + offset] = reason
                if result is None:
                    continue
                if values is None:
                    values = np.full((len(rows), result.shape[1]), np.nan, dtype=np.float32)
                values[[start + i for i in offsets]] = result
        if bad and on_error == "raise":
            raise InvalidInputError(describe_bad_rows(bad), bad)
        if values is None:
            values = np.full((len(rows), self._output_width(output)), np.nan, dtype=np.float32)
        return values, errors

    def _run_loaded(
        self, loaded: list[Any], first: int, run: bool, on_error: str, output: str
    ) -> tuple[list[int], np.ndarray | None, list[tuple[int, str]]]:
        """Run the graph on the decoded images of one shard starting at row offset `first`:
        (offsets of the rows run, their outputs, (offset, reason) of the rows that failed)."""
        good = [first + i for i, item in enumerate(loaded) if not isinstance(item, ImageInputError)]
        failures = [(first + i, item.reason) for i, item in enumerate(loaded) if isinstance(item, ImageInputError)]
        if not good or not run or (failures and on_error == "raise"):
            return good, None, failures
        batch = np.stack([loaded[i - first] for i in good])
        return good, self.session.run(batch, [output])[0], failures

    def _output_width(self, output: str) -> int:
        if output == self._probabilities_output:
            return len(self.config.classes)
        return int(self.config.embedding_dim)

    def _load(self, value: Any) -> np.ndarray | ImageInputError:
        try:
            return self.preprocessor(decode_image(value, self.limits, self._draft_size))
        except ImageInputError as e:
            return e

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._shard_pool.shutdown(wait=False)


def request_classes(value: Any, limits: InputLimits = InputLimits()) -> list[str]:
    """Labels sent with a request: a list of names, or one comma-separated string."""
    if isinstance(value, str):
        if value.lstrip().startswith("@"):
            raise InvalidInputError(
                f"Received classes={value!r}; a request cannot read files. Send the names as a list."
            )
        value = value.split(",")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"Received classes of type {type(value).__name__}; expected a list of names.")
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise InvalidInputError(f"Class {index} is {type(name).__name__}, not text; send a list of names.")
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
        if key.startswith("@"):
            raise InvalidInputError(
                f"Received templates={value!r}; a request cannot read files. Send a preset "
                f"({', '.join(sorted(TEMPLATE_PRESETS))}) or a template containing {{}}."
            )
        value = list(TEMPLATE_PRESETS[key]) if key in TEMPLATE_PRESETS else [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise InvalidInputError("Received templates that are not text; send a preset name or templates with {}.")
    if len(value) > limits.max_templates:
        raise InvalidInputError(f"Received {len(value)} templates; expected at most {limits.max_templates}.")
    try:
        return resolve_templates(list(value))
    except PromptError as e:
        raise InvalidInputError(f"{e} Or send one of the presets: {', '.join(sorted(TEMPLATE_PRESETS))}.") from None


def _describe_text(value: Any) -> str:
    return (
        "missing (null)"
        if value is None or (isinstance(value, float) and np.isnan(value))
        else f"a {type(value).__name__}"
    )


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


def _check_options(top_k: Any, on_error: Any, num_classes: int) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise InvalidInputError(f"Received on_error={on_error!r}; expected one of {list(ON_ERROR_CHOICES)}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InvalidInputError(f"Received top_k={top_k!r}; expected a whole number from 0 (off) to {num_classes}.")


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
