"""Tokenizers other than CLIP's, served torch-free from the tokenizer files a model carries.

The exporter copies the source's own tokenizer into the model directory, where the manifest
covers it, and the contract names the library that serves it (`tokenizer`):

- `tokenizers` (Hugging Face's Rust library, the one transformers' fast tokenizers run on):
  `tokenizer.json`, the source tokenizer's own pipeline (normalizer, pre-tokenizer, model,
  special tokens), with the truncation and padding the source applies written into it. Serves
  open_clip's SigLIP, SigLIP 2 and multilingual (XLM-RoBERTa, NLLB, ...) towers and Hugging Face
  folders whose tokenizer runs on `tokenizers`.
- `sentencepiece`: `spiece.model` with `sentencepiece.json`, for Hugging Face's `SiglipTokenizer`
  (SigLIP's folders), which runs in Python on a SentencePiece model: special tokens split first,
  each piece lower-cased, stripped of punctuation and whitespace-collapsed, then encoded, an end
  token appended, padded with it.

Both first apply the cleaning the contract names (`text_clean`): open_clip's `HFTokenizer` cleans
every text before its tokenizer sees it (`whitespace`: ftfy, HTML unescaped twice, whitespace runs
collapsed; `canonicalize`, SigLIP's: also punctuation removed and lower-cased). The functions
are copied from open_clip's `tokenizer.py` (MIT License, Copyright (c) 2012-2021 Gabriel Ilharco,
Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller,
Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt).

    >>> tokenizer = load_tokenizer("model/tokenizer.json", "tokenizers", "canonicalize")  # doctest: +SKIP
    >>> tokenizer(["a photo of a cat."], context_length=64).shape  # doctest: +SKIP
    (1, 64)
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Protocol

import ftfy
import numpy as np

from .contract import VOCAB_FILE_NAME
from .errors import ModelConfigError, RuntimeUnavailableError, SettingsError
from .tokenizer import SPECIAL_TOKEN_SPELLINGS, ClipTokenizer, TextInputError

TOKENIZERS = "tokenizers"
SENTENCEPIECE = "sentencepiece"
# The file the contract's tokenizer file names (MLmodel's tokenizer_vocab), per library.
TOKENIZER_FILES = {TOKENIZERS: "tokenizer.json", SENTENCEPIECE: "sentencepiece.json"}
SENTENCEPIECE_MODEL_FILE = "spiece.model"
INSTALL_HINTS = {
    TOKENIZERS: "pip install tokenizers (part of mlflow-clip's serving install)",
    SENTENCEPIECE: 'pip install "mlflow-clip[sentencepiece]"',
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPIECE_UNDERLINE = "\u2581"


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    """big_vision's (and open_clip's) canonicalization: punctuation removed, lower case."""
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


CLEANERS: dict[str, Callable[[str], str]] = {
    "": lambda text: text,
    "whitespace": lambda text: _whitespace_clean(_basic_clean(text)),
    "lower": lambda text: _whitespace_clean(_basic_clean(text)).lower(),
    "canonicalize": lambda text: _canonicalize(_basic_clean(text)),
}


class TextTokenizer(Protocol):
    """What the text encoder needs of a tokenizer (ClipTokenizer has the same two methods)."""

    pad_token_id: int

    def __call__(self, texts: Iterable[str], context_length: int = ..., truncate: bool = ...) -> np.ndarray: ...

    def tokenize(
        self, texts: Iterable[str], context_length: int = ..., first_index: int = 0
    ) -> tuple[np.ndarray, list[int]]: ...


def load_tokenizer(path: str | Path, name: str, clean: str = "", context_length: int | None = None) -> TextTokenizer:
    """The tokenizer a model's contract names: CLIP's byte-pair encoding (`clip`, `open_clip`,
    `hf`: `ClipTokenizer`), `tokenizers` or `sentencepiece` (with `clean`), from `path`."""
    if name in SPECIAL_TOKEN_SPELLINGS:
        return ClipTokenizer.from_file(path, name)
    if clean not in CLEANERS:
        raise SettingsError(f"Received text_clean={clean!r}; expected one of {sorted(CLEANERS)}.")
    if name == TOKENIZERS:
        return TokenizersTokenizer(path, clean, context_length)
    if name == SENTENCEPIECE:
        return SiglipSentencePieceTokenizer(path, clean, context_length)
    raise SettingsError(
        f"Received tokenizer={name!r}; expected one of {sorted([*SPECIAL_TOKEN_SPELLINGS, TOKENIZERS, SENTENCEPIECE])}."
    )


def tokenizer_file_name(name: str) -> str:
    """The file a model with tokenizer `name` reads its tokenizer from (MLmodel's tokenizer_vocab)."""
    return VOCAB_FILE_NAME if name in SPECIAL_TOKEN_SPELLINGS else TOKENIZER_FILES[name]


def import_library(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise RuntimeUnavailableError(f"This model's tokenizer needs the {name} library: {INSTALL_HINTS[name]}.") from e


class _Tokenizer:
    """The checks and the layout both libraries share; subclasses encode one cleaned text."""

    pad_token_id = 0
    context_length = 0

    def __init__(self, clean: str):
        self.clean = clean
        self._clean = CLEANERS[clean]

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None, truncate: bool = True):
        """Token ids [len(texts), context_length], int64, as the source gives them (truncated)."""
        if isinstance(texts, str):
            texts = [texts]
        ids, lengths = self.tokenize(texts, context_length or self.context_length)
        too_long = [i for i, n in enumerate(lengths) if n > self.context_length]
        if too_long and not truncate:
            raise TextInputError(
                f"Text {too_long[0]} is longer than the context length {self.context_length} tokens. Fix: shorten it, "
                "or pass truncate=True to keep its first tokens as the source does."
            )
        return ids

    def tokenize(
        self, texts: Iterable[str], context_length: int | None = None, first_index: int = 0
    ) -> tuple[np.ndarray, list[int]]:
        """(ids [N, context_length], each text's own length with its special tokens, or
        `context_length + 1` for a text that was cut)."""
        if isinstance(texts, (str, bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TextInputError(f"Received {type(texts).__name__}; expected a list of str. Fix: send text, decoded.")
        if context_length is not None and context_length != self.context_length:
            raise ModelConfigError(
                f"This tokenizer pads and truncates to {self.context_length} tokens, not {context_length}: the "
                "model's tokenizer file and its configuration disagree. Serve the version as it was exported."
            )
        rows, lengths = [], []
        for index, text in enumerate(texts, first_index):
            if not isinstance(text, str):
                raise TextInputError(
                    f"Text {index} is a {type(text).__name__}, not a str. Fix: send every text as a string."
                )
            cleaned = self._clean(text)
            if _SURROGATE.search(cleaned):
                raise TextInputError(
                    f"Text {index} contains a lone surrogate code point, which this model's tokenizer refuses. "
                    "Fix: send valid Unicode (decode UTF-8 with errors='replace')."
                )
            ids, length = self._encode(cleaned)
            rows.append(ids)
            lengths.append(length)
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.context_length), lengths

    def _encode(self, text: str) -> tuple[list[int], int]:
        raise NotImplementedError


class TokenizersTokenizer(_Tokenizer):
    """A `tokenizer.json` run by Hugging Face's `tokenizers`, truncating and padding as written
    in the file (the exporter writes the source's own settings there)."""

    def __init__(self, path: str | Path, clean: str = "", context_length: int | None = None):
        super().__init__(clean)
        tokenizers = import_library(TOKENIZERS)
        self.path = Path(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        truncation, padding = self._tokenizer.truncation, self._tokenizer.padding
        length = (padding or {}).get("length")
        if not truncation or not padding or truncation.get("max_length") != length or not length:
            raise ModelConfigError(
                f"{self.path.name} does not pad and truncate to one fixed length; the exporter writes both. "
                "Serve the version as it was exported."
            )
        self.context_length = int(length)
        self.pad_token_id = int(padding["pad_id"])
        self.padding_side = str(padding.get("direction", "Right")).lower()

    def __repr__(self) -> str:
        return f"TokenizersTokenizer({str(self.path)!r}, clean={self.clean!r})"

    def _encode(self, text: str) -> tuple[list[int], int]:
        # One text at a time: encode_batch would start Rust threads, which a forking server inherits.
        encoding = self._tokenizer.encode(text)
        length = self.context_length + 1 if encoding.overflowing else int(sum(encoding.attention_mask))
        return encoding.ids, length


class SiglipSentencePieceTokenizer(_Tokenizer):
    """Hugging Face's `SiglipTokenizer` (transformers 5), on its SentencePiece model: the
    special tokens written in a text split it first (stripping the whitespace next to those
    that strip it), each other piece is lower-cased, loses its punctuation and its whitespace
    runs, and is encoded behind the unknown token (whose pieces are dropped); the end token is
    appended unless the ids end with it, the ids are cut to the context less one, and padded."""

    def __init__(self, path: str | Path, clean: str = "", context_length: int | None = None):
        super().__init__(clean)
        sentencepiece = import_library(SENTENCEPIECE)
        self.path = Path(path)
        settings: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        model = self.path.with_name(settings["model_file"])
        if Path(settings["model_file"]).name != settings["model_file"] or not model.is_file():
            raise ModelConfigError(
                f"{self.path.name} names a SentencePiece model {settings['model_file']!r} that is not there."
            )
        self._model = sentencepiece.SentencePieceProcessor(model_file=str(model))
        self.context_length = int(settings["context_length"])
        self.pad_token_id = int(settings["pad_id"])
        self.eos_id = int(settings["eos_id"])
        self.unk_token = str(settings["unk_token"])
        self.lower = bool(settings.get("lower", True))
        self._specials = {
            str(token): (int(i), bool(lstrip), bool(rstrip)) for token, i, lstrip, rstrip in settings["special_tokens"]
        }
        ordered = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self._unk_pieces = len(self._model.encode(self.unk_token, out_type=str))

    def __repr__(self) -> str:
        return f"SiglipSentencePieceTokenizer({str(self.path)!r}, clean={self.clean!r})"

    def _encode(self, text: str) -> tuple[list[int], int]:
        tokens = self._tokens(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE and tokens[1] in self._specials:
            tokens = tokens[1:]
        ids = [self._specials[t][0] if t in self._specials else self._model.piece_to_id(t) for t in tokens]
        full = len(ids) + (0 if ids and ids[-1] == self.eos_id else 1)
        ids = ids[: self.context_length - 1]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        length = full if full <= self.context_length else self.context_length + 1
        return ids + [self.pad_token_id] * (self.context_length - len(ids)), length

    def _tokens(self, text: str) -> list[str]:
        parts = self._split.split(text) if self._split else [text]
        for i, part in enumerate(parts):
            if i % 2 == 1:  # a special token: strip the whitespace it strips around itself
                _, lstrip, rstrip = self._specials[part]
                if rstrip and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if i % 2 == 1:
                tokens.append(part)
            elif part:
                tokens.extend(self._pieces(part))
        return tokens

    def _pieces(self, text: str) -> list[str]:
        text = text.lower() if self.lower else text
        text = re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()
        pieces = self._model.encode(self.unk_token + text, out_type=str)
        return pieces[self._unk_pieces :] if len(pieces) >= self._unk_pieces else pieces
