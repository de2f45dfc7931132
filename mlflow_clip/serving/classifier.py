"""The native, torch-free zero-shot classifier: image bytes in, class probabilities out.

Each request runs within its budget (`limits.py`): every image's header is read and checked
first and the request's pixels are summed, before anything is decoded; decoding and the graph
then run in chunks and shards, each checking the request's deadline (`deadline.py`), so a
request that times out stops within about one piece of work.

    >>> classifier = load_classifier("path/to/model")  # doctest: +SKIP
    >>> classifier.predict([open("cat.jpg", "rb").read()])  # doctest: +SKIP
         label     score          probabilities
    0    a cat  0.97...  [0.01..., 0.97..., ...]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .contract import ClassifierConfig
from .deadline import Deadline
from .decode import decode_pixels
from .images import ImageInputError, OpenedImage, open_cell
from .limits import InputLimits
from .preprocess import Preprocessor
from .rows import (
    InvalidInputError,
    check_options,
    check_texts,
    coerce_rows,
    describe_bad_rows,
    format_embeddings,
    format_predictions,
    request_classes,
    request_templates,
)
from .runtime import RuntimeSettings, open_session
from .text import TextEncoder, class_scores


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
        # onnxruntime or OpenVINO (settings.runtime); a bf16 model needs OpenVINO.
        self.session = open_session(onnx_path, settings, config.precision)
        self._probabilities_output = self.session.output_names[0]
        outputs = self.session.output_names
        self._embedding_output = config.embedding_output if config.embedding_output in outputs[1:] else None
        self.text_encoder = text_encoder
        self._draft_size = config.input_resolution if settings.jpeg_draft else None
        workers = decode_workers or settings.decode_workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlflow-clip-decode")
        self._shards = settings.shard_count
        self._shard_pool = ThreadPoolExecutor(max_workers=self._shards, thread_name_prefix="mlflow-clip-shard")

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
        truncate: bool = False,
    ) -> pd.DataFrame:
        """Classify images; one output row per input row, in order.

        `images`: a DataFrame with an `image` column, a list/Series/dict of image values
        (encoded bytes, base64 text, data URIs, uint8 arrays), or a uint8 array batch.
        `classes` (with `templates`, default the model's own) classifies against those labels
        instead of the baked ones, through the model's text encoder; the columns are the same.
        A label whose prompts exceed CLIP's context is refused unless `truncate`.
        """
        deadline = Deadline.for_request(self.limits.deadline_seconds)
        rows = coerce_rows(images)
        if classes is None or len(classes) == 0:
            check_options(top_k, on_error, len(self.config.classes))
            self._check_row_count(rows)
            probabilities, errors = self._run_images(rows, on_error, self._probabilities_output, deadline)
            return format_predictions(probabilities, errors, self.config.classes, top_k, on_error)
        names = request_classes(classes, self.limits)
        template_texts = request_templates(templates, self.limits) if templates else list(self.config.template_texts)
        check_options(top_k, on_error, len(names))
        self._check_row_count(rows)
        encoder = self._text_encoder("per-request classes")
        features = encoder.class_features(names, template_texts, self.limits, truncate=truncate, deadline=deadline)
        embeddings, errors = self._run_images(rows, on_error, self._require_embeddings("per-request classes"), deadline)
        probabilities = np.full((len(rows), len(names)), np.nan, dtype=np.float32)
        ok = ~np.isnan(embeddings).any(axis=1)
        if ok.any():
            config = self.config
            probabilities[ok] = class_scores(
                embeddings[ok], features, config.logit_scale, config.logit_bias, config.head
            )
        return format_predictions(probabilities, errors, names, top_k, on_error)

    def embed_images(self, images: Any, on_error: str = "raise") -> pd.DataFrame:
        """One L2-normalized image embedding per row: columns `embedding` and `error`."""
        deadline = Deadline.for_request(self.limits.deadline_seconds)
        rows = coerce_rows(images)
        check_options(0, on_error, 0)
        self._check_row_count(rows)
        embeddings, errors = self._run_images(rows, on_error, self._require_embeddings("image embeddings"), deadline)
        return format_embeddings(embeddings, errors)

    def embed_text(self, texts: Sequence[Any], truncate: bool = False) -> pd.DataFrame:
        """One L2-normalized text embedding per text; a text over CLIP's context is refused unless
        `truncate` (then its first 76 tokens and the end token are embedded, as CLIP does)."""
        deadline = Deadline.for_request(self.limits.deadline_seconds)
        texts = list(texts)
        self._check_row_count(texts)
        check_texts(texts, self.limits)
        embeddings = self._text_encoder("text embeddings").embed(
            texts, self.limits, truncate=truncate, deadline=deadline
        )
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
                f"Received {len(rows)} rows; expected at most {self.limits.max_rows} per request (max_rows). "
                "Split the request, or raise max_rows in the model's runtime configuration."
            )

    # -- images ----------------------------------------------------------------------------------

    def _run_images(
        self, rows: list[Any], on_error: str, output: str, deadline: Deadline
    ) -> tuple[np.ndarray, list[str | None]]:
        """`output` for every row (NaN rows where an image could not be read), and the errors.

        First every image's header is read and checked, and the request's pixels are summed
        (`max_request_pixels`), so that nothing is decoded for a request over its budget. Then
        rows go to the graph in chunks of `chunk_size`, each decoded by the decode pool straight
        into the batch the graph runs; with `shards` above one, a chunk is split into that many
        shards that run concurrently, each decoding its own images and then running the graph. With
        on_error="raise" every row is still decoded, so that the error lists all bad rows.
        """
        opened = [self._open(row) for row in rows]  # Python under the GIL: a pool only adds handoffs
        self._check_request_pixels(opened)
        values: np.ndarray | None = None
        errors: list[str | None] = [None] * len(rows)
        bad: list[tuple[int, str]] = []
        chunk = max(1, self.session.settings.chunk_size)
        for start in range(0, len(rows), chunk):
            deadline.check(f"running rows {start} to {len(rows) - 1}")
            run = not (bad and on_error == "raise")  # a failed request only collects its bad rows
            for offsets, result, failures in self._run_chunk(
                opened[start : start + chunk], run, on_error, output, deadline
            ):
                for offset, reason in failures:
                    bad.append((start + offset, reason))
                    errors[start + offset] = reason
                if result is not None:
                    if values is None:
                        values = np.full((len(rows), result.shape[1]), np.nan, dtype=np.float32)
                    values[[start + i for i in offsets]] = result
        if bad and on_error == "raise":
            raise InvalidInputError(describe_bad_rows(bad), bad)
        if values is None:
            values = np.full((len(rows), self._output_width(output)), np.nan, dtype=np.float32)
        return values, errors

    def _run_chunk(self, part: list, run: bool, on_error: str, output: str, deadline: Deadline) -> list:
        shards = min(self._shards, len(part))
        if shards <= 1:
            return [self._run_shard(part, 0, run, on_error, output, deadline, self._pool.map)]
        cuts = np.linspace(0, len(part), shards + 1).astype(int)

        def shard(lo: int, hi: int):
            return self._run_shard(part[lo:hi], int(lo), run, on_error, output, deadline, map)

        return list(self._shard_pool.map(shard, cuts[:-1], cuts[1:]))

    def _run_shard(
        self, items: list, first: int, run: bool, on_error: str, output: str, deadline: Deadline, each: Any
    ) -> tuple[list[int], np.ndarray | None, list[tuple[int, str]]]:
        """Decode the images of one shard (starting at row offset `first`) straight into the
        rows of the batch the graph runs, through `each` (the decode pool's map, or the builtin
        in a shard's own thread), then run the graph on the rows that decoded:
        (offsets of the rows run, their outputs, (offset, reason) of the rows that failed)."""
        size = self.preprocessor.input_resolution
        batch = np.empty((len(items), 3, size, size), dtype=np.float32)
        reasons = list(each(lambda index: self._load_into(items[index], batch[index], deadline), range(len(items))))
        good = [index for index, reason in enumerate(reasons) if reason is None]
        failures = [(first + index, reason) for index, reason in enumerate(reasons) if reason is not None]
        offsets = [first + index for index in good]
        if not good or not run or (failures and on_error == "raise"):
            return offsets, None, failures
        if len(good) < len(items):
            batch = batch[good]
        return offsets, self.session.run(batch, [output])[0], failures

    def _output_width(self, output: str) -> int:
        if output == self._probabilities_output:
            return len(self.config.classes)
        return int(self.config.embedding_dim)

    def _open(self, value: Any) -> OpenedImage | ImageInputError:
        try:
            return open_cell(value, self.limits)
        except ImageInputError as e:
            return e

    def _check_request_pixels(self, opened: list[OpenedImage | ImageInputError]) -> None:
        images = [item for item in opened if isinstance(item, OpenedImage)]
        total = sum(item.pixels for item in images)
        if total > self.limits.max_request_pixels:
            raise InvalidInputError(
                f"Received {len(images)} images with {total} pixels in all; expected at most "
                f"{self.limits.max_request_pixels} per request (max_request_pixels). Split the request, or "
                "downscale the images before sending (CLIP keeps a few hundred pixels a side)."
            )
        cost = sum(item.decode_ms for item in images)
        if cost > self.limits.max_request_decode_ms:
            raise InvalidInputError(
                f"Received {len(images)} images that would take about {cost} ms of CPU to decode in all; expected "
                f"at most {self.limits.max_request_decode_ms} per request (max_request_decode_ms). Split the "
                "request, or send smaller images (CLIP keeps a few hundred pixels a side) as 8-bit JPEGs."
            )

    def _load_into(self, item: OpenedImage | ImageInputError, out: np.ndarray, deadline: Deadline) -> str | None:
        """Decode and preprocess one opened image into `out`; the reason it failed, or None."""
        if isinstance(item, ImageInputError):
            return item.reason
        deadline.check("decoding images")
        try:
            self.preprocessor.write(decode_pixels(item, self._draft_size, deadline), out)
        except ImageInputError as e:
            return e.reason
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._shard_pool.shutdown(wait=False)


__all__ = ["InvalidInputError", "ZeroShotClassifier"]
