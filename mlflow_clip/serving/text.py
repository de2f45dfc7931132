"""CLIP's text encoder at serving time: labels chosen per request, and text embeddings.

Torch-free: the torch-free tokenizer (`tokenizer.py`) turns texts into CLIP's token ids
and the exported text-encoder graph turns ids into L2-normalized embeddings. Class features are
computed exactly as the exporter bakes them (per class, the renormalized mean of the normalized
embeddings of its prompts) and cached per label set, so a repeated label set costs no
text-encoder run.

    >>> encoder = TextEncoder("text_encoder.onnx", "bpe_simple_vocab_16e6.txt.gz")  # doctest: +SKIP
    >>> encoder.class_features(["a forklift", "a pallet"], ["a photo of a {}."]).shape  # doctest: +SKIP
    (2, 1024)
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ModelFileError
from .prompts import texts_for_class
from .runtime import OrtSession, RuntimeSettings
from .tokenizer import ClipTokenizer

# Texts per text-encoder run; texts are sorted by length first so each run is trimmed tightly.
TEXT_RUN_BATCH = 64
_logger = logging.getLogger("mlflow_clip.serving.text")
DEFAULT_CACHE_SIZE = 64


class TextEncoder:
    """Token ids -> normalized text embeddings, with an LRU cache of class features per label set.

    The onnxruntime session is created on first use, so a model that only classifies images
    never pays for loading the text encoder. Safe to share between threads.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        vocab_path: str | Path,
        context_length: int = 77,
        settings: RuntimeSettings = RuntimeSettings(),
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        self.onnx_path = Path(onnx_path)
        self.vocab_path = Path(vocab_path)
        self.context_length = int(context_length)
        self.settings = settings
        self.cache_size = int(cache_size)
        self.runs = 0  # text-encoder graph runs so far (a cached label set adds none)
        self._session: OrtSession | None = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def _ready(self):
        with self._lock:
            if self._session is None:
                try:
                    self._tokenizer = ClipTokenizer.from_file(self.vocab_path)
                    self._session = OrtSession(self.onnx_path, self.settings)
                except Exception as e:  # noqa: BLE001 - a damaged file, whatever the library says
                    _logger.error("mlflow-clip: cannot load the text encoder %s: %s", self.onnx_path, e)
                    raise ModelFileError(
                        f"This model's text encoder ({self.onnx_path.name}, {self.vocab_path.name}) cannot be loaded "
                        f"({type(e).__name__}; the server's log has the details): the model directory is damaged "
                        "or was edited. Serve the registered version as it was exported."
                    ) from None
            return self._session, self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """CLIP's token ids [N, context_length] (too-long texts truncated, as CLIP's prompts are)."""
        _, tokenizer = self._ready()
        return tokenizer(list(texts), context_length=self.context_length, truncate=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalized float32 embeddings [N, D], one per text, in order."""
        session, _ = self._ready()
        ids = self.tokenize(texts)
        ends = ids.argmax(axis=1)  # end-of-text is the highest id: its position ends the prompt
        order = np.argsort(ends, kind="stable")
        parts = []
        for start in range(0, len(order), TEXT_RUN_BATCH):
            rows = order[start : start + TEXT_RUN_BATCH]
            length = int(ends[rows].max()) + 1
            batch = np.ascontiguousarray(ids[rows, :length])
            parts.append(session.run(batch)[0])
            with self._lock:
                self.runs += 1
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    def class_features(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Normalized class features [C, D] for `classes` x `templates`, cached per label set."""
        key = (tuple(classes), tuple(templates))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        texts = [text for name in classes for text in texts_for_class(name, templates)]
        embeddings = self.embed(texts).reshape(len(classes), len(templates), -1)
        mean = embeddings.mean(axis=1)
        features = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
        features.setflags(write=False)
        with self._lock:
            self._cache[key] = features
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return features


def softmax_scores(embeddings: np.ndarray, class_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """The baked graph's head in numpy: softmax(logit_scale * cosine similarity), float32."""
    logits = np.float32(logit_scale) * (embeddings.astype(np.float32) @ class_features.T)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits
