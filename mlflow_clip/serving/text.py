"""CLIP's text encoder at serving time: labels chosen per request, and text embeddings.

Torch-free: the torch-free tokenizer (`tokenizer.py`) turns texts into CLIP's token ids
and the exported text-encoder graph turns ids into L2-normalized embeddings. Class features are
computed exactly as the exporter bakes them (per class, the renormalized mean of the normalized
embeddings of its prompts) and cached per label set, so a repeated label set costs no
text-encoder run.

Each request's text work is bounded before the encoder runs: the characters of its texts
(`max_request_text_chars`, before tokenizing), the number of prompts (`max_prompts`) and their
tokens (`max_prompt_tokens`, after tokenizing); a text longer than CLIP's 77-token context is
refused, naming it, unless the request asks to `truncate` it as CLIP does. The cache is bounded
in bytes as well as entries, keyed by a digest of the label set rather than its strings.

    >>> encoder = TextEncoder("text_encoder.onnx", "bpe_simple_vocab_16e6.txt.gz")  # doctest: +SKIP
    >>> encoder.class_features(["a forklift", "a pallet"], ["a photo of a {}."]).shape  # doctest: +SKIP
    (2, 1024)
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from .contract import SIGMOID_HEAD, SOFTMAX_HEAD
from .deadline import NO_DEADLINE, TEXT_FIX, Deadline
from .errors import ModelFileError, SettingsError
from .limits import DEFAULT_LIMITS, InputLimits
from .prompts import texts_for_class
from .rows import InvalidInputError
from .runtime import OrtSession, RuntimeSettings
from .text_tokenizers import TextTokenizer, load_tokenizer

# Texts per text-encoder run; texts are sorted by length first so each run is trimmed tightly.
TEXT_RUN_BATCH = 64
TOKENIZE_SLICE = 64  # distinct texts tokenized between two deadline checks (under 0.3 s at their longest)
_logger = logging.getLogger("mlflow_clip.serving.text")
DEFAULT_CACHE_SIZE = 64
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
# How far the ids of a batch are run, per the contract's text_pooling: after the last end token
# (CLIP's causal tower, read there), after the last token that is not padding (towers that mask
# padding out), or the whole context (towers in which every position counts, SigLIP's).
TEXT_POOLINGS = ("argmax", "masked", "full")


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
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        tokenizer: str = "clip",
        text_clean: str = "",
        text_pooling: str = "argmax",
    ):
        if text_pooling not in TEXT_POOLINGS:
            raise SettingsError(f"Received text_pooling={text_pooling!r}; expected one of {list(TEXT_POOLINGS)}.")
        self.onnx_path = Path(onnx_path)
        self.tokenizer_name = tokenizer
        self.text_clean = text_clean
        self.text_pooling = text_pooling
        self.vocab_path = Path(vocab_path)
        self.context_length = int(context_length)
        self.settings = settings
        self.cache = FeatureCache(int(cache_size), int(cache_bytes))
        self.runs = 0  # text-encoder graph runs so far (a cached label set adds none)
        self._session: OrtSession | None = None
        self._tokenizer: TextTokenizer | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_config(
        cls, onnx_path: str | Path, vocab_path: str | Path, config, settings: RuntimeSettings = RuntimeSettings()
    ) -> TextEncoder:
        """The text encoder a model's contract (`ClassifierConfig`) describes."""
        return cls(
            onnx_path,
            vocab_path,
            config.context_length,
            settings,
            tokenizer=config.tokenizer,
            text_clean=config.text_clean,
            text_pooling=config.text_pooling,
        )

    def _ready(self):
        with self._lock:
            if self._session is None:
                try:
                    self._tokenizer = load_tokenizer(
                        self.vocab_path, self.tokenizer_name, self.text_clean, self.context_length
                    )
                    self._session = OrtSession(self.onnx_path, self.settings)
                except ImportError as e:  # a tokenizer library the model's requirements list, not installed
                    raise ModelFileError(str(e)) from None
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

    def embed(
        self,
        texts: Sequence[str],
        limits: InputLimits = DEFAULT_LIMITS,
        truncate: bool = True,
        deadline: Deadline = NO_DEADLINE,
        describe=None,
    ) -> np.ndarray:
        """Normalized float32 embeddings [N, D], one per text, in order, within `limits`.
        `describe(i)` names text `i` in errors (default: "Text i")."""
        texts = list(texts)
        _check_budget(len(texts), sum(len(t) for t in texts if isinstance(t, str)), limits)  # every copy counts
        session, tokenizer = self._ready()
        ids, lengths = self._tokenize(tokenizer, texts, deadline)
        self._check_tokens(lengths, limits, truncate, describe or (lambda i: f"Text {i}"))
        return self._run(session, ids, deadline)

    def _tokenize(self, tokenizer: TextTokenizer, texts: list[str], deadline: Deadline) -> tuple[np.ndarray, list]:
        """`tokenizer.tokenize` of each distinct text once, in slices with a deadline check between
        them (tokenizing is pure Python: up to about 5 ms for a text of 2,000 characters)."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                tokenizer.tokenize([text], self.context_length, index)  # raises, naming it
        distinct = list(dict.fromkeys(texts))
        parts, lengths = [], []
        for start in range(0, len(distinct), TOKENIZE_SLICE):
            deadline.check(f"tokenizing prompts {start} to {len(distinct) - 1}", TEXT_FIX)
            ids, slice_lengths = tokenizer.tokenize(distinct[start : start + TOKENIZE_SLICE], self.context_length)
            parts.append(ids)
            lengths.extend(slice_lengths)
        if not parts:
            return tokenizer.tokenize([], self.context_length)
        row = {text: i for i, text in enumerate(distinct)}
        order = np.fromiter((row[text] for text in texts), dtype=np.int64, count=len(texts))
        return np.concatenate(parts)[order], [lengths[i] for i in order]

    def _check_tokens(self, lengths: list[int], limits: InputLimits, truncate: bool, describe) -> None:
        if not truncate:
            long = [i for i, n in enumerate(lengths) if n > self.context_length]
            if long:
                more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
                raise InvalidInputError(
                    f"{describe(long[0])}{more} is longer than CLIP's context of {self.context_length} tokens; CLIP "
                    "would cut it, silently changing what it means. Shorten it, or pass params "
                    '{"truncate": true} to keep its first tokens as CLIP does.',
                    [(i, "longer than the context") for i in long],
                )
        tokens = sum(min(n, self.context_length) for n in lengths)
        if tokens > limits.max_prompt_tokens:
            raise InvalidInputError(
                f"Received {len(lengths)} prompts of {tokens} tokens in all; expected at most "
                f"{limits.max_prompt_tokens} per request (max_prompt_tokens). Send fewer labels or templates "
                "(templates=photo is one prompt per label), or export a model with these labels baked in."
            )

    def _run(self, session: OrtSession, ids: np.ndarray, deadline: Deadline) -> np.ndarray:
        ends = self._ends(ids)
        order = np.argsort(ends, kind="stable")
        parts = []
        for start in range(0, len(order), TEXT_RUN_BATCH):
            deadline.check(f"encoding prompts {start} to {len(order) - 1}", TEXT_FIX)
            rows = order[start : start + TEXT_RUN_BATCH]
            length = int(ends[rows].max()) + 1
            batch = np.ascontiguousarray(ids[rows, :length])
            parts.append(session.run(batch)[0])
            with self._lock:
                self.runs += 1
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(ids), parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    def _ends(self, ids: np.ndarray) -> np.ndarray:
        """The last position of each row that the text tower must see (see TEXT_POOLINGS)."""
        if self.text_pooling == "full":
            return np.full(len(ids), ids.shape[1] - 1, dtype=np.int64)
        if self.text_pooling == "masked":
            kept = ids != self._tokenizer.pad_token_id
            return np.where(kept.any(axis=1), ids.shape[1] - 1 - kept[:, ::-1].argmax(axis=1), 0)
        return ids.argmax(axis=1)  # end-of-text is the highest id: its position ends the prompt

    def class_features(
        self,
        classes: Sequence[str],
        templates: Sequence[str],
        limits: InputLimits = DEFAULT_LIMITS,
        truncate: bool = True,
        deadline: Deadline = NO_DEADLINE,
    ) -> np.ndarray:
        """Normalized class features [C, D] for `classes` x `templates`, cached per label set."""
        key = _label_set_key(classes, templates, truncate)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if len(classes) * len(templates) > limits.max_prompts:
            raise InvalidInputError(
                f"Received {len(classes)} classes x {len(templates)} templates = {len(classes) * len(templates)} "
                f"prompts; expected at most {limits.max_prompts} per request (max_prompts). Send fewer labels, "
                "templates=photo (one prompt per label), or export a model with these labels baked in."
            )
        texts = [text for name in classes for text in texts_for_class(name, templates)]

        def describe(i: int) -> str:
            return f"Class {i // len(templates)} with template {i % len(templates)}"

        embeddings = self.embed(texts, limits, truncate, deadline, describe).reshape(len(classes), len(templates), -1)
        mean = embeddings.mean(axis=1)
        features = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
        features.setflags(write=False)
        self.cache.put(key, features)
        return features


def _check_budget(prompts: int, chars: int, limits: InputLimits) -> None:
    if prompts > limits.max_prompts:
        raise InvalidInputError(
            f"Received {prompts} texts; expected at most {limits.max_prompts} per request (max_prompts). "
            "Split the request."
        )
    if chars > limits.max_request_text_chars:
        raise InvalidInputError(
            f"Received {chars} characters of text in all; expected at most {limits.max_request_text_chars} per "
            "request (max_request_text_chars). Send shorter or fewer labels."
        )


def _label_set_key(classes: Sequence[str], templates: Sequence[str], truncate: bool) -> bytes:
    digest = hashlib.sha256(b"truncate" if truncate else b"exact")
    for part in (*classes, "\x00", *templates):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.digest()


class FeatureCache:
    """Thread-safe LRU of label-set digest -> class features, bounded in entries and bytes."""

    def __init__(self, entries: int, max_bytes: int):
        self.entries, self.max_bytes = entries, max_bytes
        self.held = 0
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.held += value.nbytes
            while len(self._items) > self.entries or self.held > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.held -= old.nbytes


def softmax_scores(embeddings: np.ndarray, class_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """The baked graph's head in numpy: softmax(logit_scale * cosine similarity), float32."""
    logits = np.float32(logit_scale) * (embeddings.astype(np.float32) @ class_features.T)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def class_scores(
    embeddings: np.ndarray,
    class_features: np.ndarray,
    logit_scale: float,
    logit_bias: float = 0.0,
    head: str = SOFTMAX_HEAD,
) -> np.ndarray:
    """The baked graph's head in numpy, float32: `softmax_scores`, or SigLIP's sigmoid of
    logit_scale * cosine similarity + logit_bias, each class on its own."""
    if head != SIGMOID_HEAD:
        return softmax_scores(embeddings, class_features, logit_scale)
    logits = np.float32(logit_scale) * (embeddings.astype(np.float32) @ class_features.T) + np.float32(logit_bias)
    tail = np.exp(-np.abs(logits))  # never overflows: the stable form of 1 / (1 + exp(-x))
    return np.where(logits >= 0, 1.0 / (1.0 + tail), tail / (1.0 + tail)).astype(np.float32)
