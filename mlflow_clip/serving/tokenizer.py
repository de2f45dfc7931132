"""CLIP's text tokenizer without torch: the same token ids as ``clip.tokenize``.

A port of ``clip/simple_tokenizer.py`` and ``clip.tokenize`` from OpenAI CLIP
(https://github.com/openai/CLIP, MIT License, Copyright (c) 2021 OpenAI). The byte-pair-encoding
vocabulary CLIP uses, ``bpe_simple_vocab_16e6.txt.gz``, ships unchanged in ``mlflow_clip/assets``
with that license (``assets/CLIP_LICENSE``); the exporter copies it into each model directory and
serving loads it from there.

Text is cleaned exactly as CLIP cleans it (``ftfy.fix_text``, HTML unescaped twice, whitespace
runs collapsed, lower-cased), split with CLIP's pattern (the ``regex`` module, for its Unicode
classes) and byte-pair encoded. The ``hf`` variant gives Hugging Face's ``CLIPTokenizer`` ids
instead (its ``tokenizers`` pipeline on the same vocabulary): special tokens only as written,
NFC, whitespace runs to one space, lower-cased character by character, no ftfy or HTML
unescaping, GPT-2's split applied inside CLIP's, and rows padded with the end token. Each word's
ids are cached in a bounded LRU cache, safe to share between the threads of a server.

    >>> tokenizer = ClipTokenizer.from_file("model/bpe_simple_vocab_16e6.txt.gz")  # doctest: +SKIP
    >>> tokenizer(["a photo of a cat."], context_length=8).tolist()  # doctest: +SKIP
    [[49406, 320, 1125, 539, 320, 2368, 269, 49407]]
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import threading
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import ftfy
import numpy as np
import regex

from .contract import VOCAB_FILE_NAME
from .errors import MissingFileError, ModelConfigError, SettingsError, TextInputError

# SHA-256 of CLIP's vocabulary file, byte for byte as the `clip` package ships it.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CONTEXT_LENGTH = 77
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# How the start and end tokens are spelled when they appear written in a text (they become the
# special ids 49406 / 49407; any other spelling is plain text): OpenAI's CLIP, or open_clip's
# SimpleTokenizer, identical to CLIP's otherwise. A model's contract names its tokenizer.
SPECIAL_TOKEN_SPELLINGS: dict[str, tuple[str, str]] = {
    "clip": (START_OF_TEXT, END_OF_TEXT),
    "open_clip": ("<start_of_text>", "<end_of_text>"),
    "hf": (START_OF_TEXT, END_OF_TEXT),
}
HF_TOKENIZER = "hf"

# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word, 48,894 merges, 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 256 + 256 + _NUM_MERGES + 2
# Words seen by a server are mostly a small set. The cache is bounded in entries and characters,
# and never keeps a word long enough to be an attack rather than a word.
BPE_CACHE_SIZE = 65_536
BPE_CACHE_CHARS = 1_000_000
BPE_CACHE_WORD_CHARS = 64
_WORD_END = "</w>"
_WHITESPACE = regex.compile(r"\s+")
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PRETOKEN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS, regex.IGNORECASE)
# Hugging Face's pipeline: its Split (CLIP's pattern, case-sensitive, after lower-casing), then the
# ByteLevel pre-tokenizer's own GPT-2 split, which cuts "<|endoftext|>" written in lower case
# into "<|", "endoftext", "|>".
_SURROGATE = regex.compile(r"[\ud800-\udfff]")
_HF_SPECIALS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_HF_PRETOKEN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS)
_GPT2_PRETOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class ClipTokenizer:
    """CLIP's byte-pair-encoding tokenizer, loaded from an explicit vocabulary file.

    >>> tokenizer = ClipTokenizer.from_file("model/bpe_simple_vocab_16e6.txt.gz")  # doctest: +SKIP
    >>> tokenizer.encode("Hello, world!")  # doctest: +SKIP
    [3306, 267, 1002, 256]
    """

    def __init__(self, vocab_path: str | Path, special_tokens: str = "clip") -> None:
        if special_tokens not in SPECIAL_TOKEN_SPELLINGS:
            raise SettingsError(
                f"Received tokenizer={special_tokens!r}; expected one of {sorted(SPECIAL_TOKEN_SPELLINGS)}."
            )
        self.vocab_path = Path(vocab_path)
        self.special_tokens = special_tokens
        self._specials = SPECIAL_TOKEN_SPELLINGS[special_tokens]
        self._pretoken = _pretoken_pattern(*self._specials)
        self._ids, self._ranks = _read_vocabulary(self.vocab_path, self._specials)  # shared, never changed
        self._to_symbols = str.maketrans({chr(b): s for b, s in _byte_to_symbol().items()})
        self.sot_token_id = self._ids[self._specials[0]]
        self.eot_token_id = self._ids[self._specials[1]]
        self.pad_token_id = self.eot_token_id if special_tokens == HF_TOKENIZER else 0
        self._cache = WordCache()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = WordCache()

    @classmethod
    def from_file(cls, vocab_path: str | Path, special_tokens: str = "clip") -> ClipTokenizer:
        """Load the tokenizer from a copy of ``bpe_simple_vocab_16e6.txt.gz``; `special_tokens`
        (clip, open_clip or hf) is a key of SPECIAL_TOKEN_SPELLINGS."""
        return cls(vocab_path, special_tokens)

    def vocabulary(self) -> list[str]:
        """Every token, in id order (byte symbols, the same ending a word, merges, special tokens)."""
        return list(self._ids)  # built in id order

    def merges(self) -> list[tuple[str, str]]:
        """The byte-pair merges, highest priority first."""
        return list(self._ranks)  # built in rank order

    def __repr__(self) -> str:
        extra = "" if self.special_tokens == "clip" else f", special_tokens={self.special_tokens!r}"
        return f"ClipTokenizer({str(self.vocab_path)!r}{extra})"

    def __call__(
        self, texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True
    ) -> np.ndarray:
        """Token ids as ``clip.tokenize`` gives them, as an int64 array ``[len(texts), context_length]``.

        Each row is the start token, the text's ids, the end token, then zeros (end tokens for
        ``hf``, as Hugging Face pads). A longer text is
        cut to ``context_length`` ids whose last is the end token when ``truncate`` is true, and
        raises ``TextInputError`` otherwise. (``clip.tokenize`` defaults to ``truncate=False`` and
        returns int32 under torch >= 1.8; the ids are the same, and all below 2**16.)
        """
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TextInputError(
                f"Received {type(texts).__name__}; expected a str or a list of str. Fix: send text, decoded."
            )
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise SettingsError(f"context_length must be an int; received {context_length!r}.")
        if context_length < 1:
            raise SettingsError(f"context_length must be at least 1; received {context_length}.")
        ids, lengths = self.tokenize(texts, context_length)
        if not truncate:
            too_long = [i for i, n in enumerate(lengths) if n > context_length]
            if too_long:
                raise TextInputError(
                    f"Text {too_long[0]} is longer than the context length {context_length} tokens with its start "
                    f"and end tokens. Fix: shorten it, or pass truncate=True to keep its first "
                    f"{context_length - 1} tokens and the end token."
                )
        return ids

    def tokenize(
        self, texts: Iterable[str], context_length: int = CONTEXT_LENGTH, first_index: int = 0
    ) -> tuple[np.ndarray, list[int]]:
        """(ids truncated as CLIP truncates them, each text's own length with its start and end
        tokens, or `context_length + 1` for any text longer than the context). Errors name a
        text by its position plus `first_index` (for a slice of a longer list). Each distinct
        text is encoded once, and each distinct word too (words too long for the shared cache
        are kept for this call only)."""
        rows, lengths = [], []
        encoded: dict[str, list[int]] = {}
        long_words: dict[str, tuple[int, ...]] = {}
        for index, text in enumerate(texts, first_index):
            self._check_text(index, text)
            ids = encoded.get(text)
            if ids is None:
                ids = [self.sot_token_id, *self.encode(text, context_length - 1, long_words), self.eot_token_id]
                encoded[text] = ids
            lengths.append(min(len(ids), context_length + 1))
            rows.append(ids)
        result = np.full((len(rows), context_length), self.pad_token_id, dtype=np.int64)
        for i, ids in enumerate(rows):
            if len(ids) > context_length:
                ids = [*ids[: context_length - 1], self.eot_token_id]
            result[i, : len(ids)] = ids
        return result, lengths

    def _check_text(self, index: int, text: object) -> None:
        if not isinstance(text, str):
            raise TextInputError(
                f"Text {index} is a {type(text).__name__}, not a str. Fix: send every text as a string."
            )
        if self.special_tokens == HF_TOKENIZER and _SURROGATE.search(text):
            raise TextInputError(
                f"Text {index} contains a lone surrogate code point, which Hugging Face's tokenizer refuses. "
                "Fix: send valid Unicode (decode UTF-8 with errors='replace')."
            )

    def encode(
        self, text: str, max_tokens: int | None = None, long_words: dict[str, tuple[int, ...]] | None = None
    ) -> list[int]:
        """The ids of one text, without the start and end tokens. With `max_tokens`, encoding stops
        once more than that many ids are known: the rest could only be cut off. `long_words`
        keeps the ids of words too long for the shared cache (for the texts of one request)."""
        ids: list[int] = []
        for word in self._words(text):
            ids.extend(self._word_ids(word, long_words))
            if max_tokens is not None and len(ids) > max_tokens:
                break
        return ids

    def _words(self, text: str) -> Iterable[str]:
        if self.special_tokens != HF_TOKENIZER:
            yield from self._pretoken.findall(clean_text(text))
            return
        for segment in _HF_SPECIALS.split(text):
            if segment in self._specials:
                yield segment
                continue
            for piece in _HF_PRETOKEN.findall(hf_clean_text(segment)):
                yield from _GPT2_PRETOKEN.findall(piece)

    def _word_ids(self, word: str, long_words: dict[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
        if long_words is not None and len(word) > self._cache.word_chars:
            cached = long_words.get(word)
            if cached is None:
                cached = long_words[word] = self._encode_word(word)
            return cached
        cached = self._cache.get(word)
        if cached is None:
            cached = self._encode_word(word)
            self._cache.put(word, cached)
        return cached

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if word in self._specials:
            return (self._ids[word],)
        symbols = word.encode("utf-8").decode("latin-1").translate(self._to_symbols)
        return tuple(self._ids[part] for part in self._merge(symbols))

    def _merge(self, symbols: str) -> tuple[str, ...]:
        """CLIP's byte-pair merging in O(n log n): CLIP merges the lowest-ranked adjacent pair
        everywhere, left to right, then looks again, which is quadratic in the word's length (a
        1,000-letter word took 49 ms). Here a heap of (rank, position) over a linked list pops the
        same merges in the same order: every pair a merge creates contains the merged token, so
        it ranks after it, and equal ranks (the same pair) pop left to right."""
        parts: list[str | None] = [*symbols[:-1], symbols[-1] + _WORD_END]
        ranks, count = self._ranks, len(parts)
        following, preceding = [*range(1, count), -1], [*range(-1, count - 1)]
        heap = [(rank, i) for i, pair in enumerate(zip(parts, parts[1:])) if (rank := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, left = heapq.heappop(heap)
            right = following[left]
            if parts[left] is None or right < 0 or ranks.get((parts[left], parts[right])) != rank:
                continue  # this pair was changed by an earlier merge
            parts[left], parts[right] = parts[left] + parts[right], None
            following[left] = after = following[right]
            if after >= 0:
                preceding[after] = left
            before = preceding[left]
            if before >= 0 and (new := ranks.get((parts[before], parts[left]))) is not None:
                heapq.heappush(heap, (new, before))
            if after >= 0 and (new := ranks.get((parts[left], parts[after]))) is not None:
                heapq.heappush(heap, (new, left))
        return tuple(part for part in parts if part is not None)


@functools.cache
def _pretoken_pattern(start: str, end: str) -> regex.Pattern:
    if (start, end) == (START_OF_TEXT, END_OF_TEXT):
        return _PRETOKEN
    return regex.compile(f"{regex.escape(start)}|{regex.escape(end)}|" + _WORDS, regex.IGNORECASE)


def clean_text(text: str) -> str:
    """CLIP's text cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower-case.

    >>> clean_text("  Caf\\u00c3\\u00a9 &amp;amp;  Bar\\n")
    'café & bar'
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def hf_clean_text(text: str) -> str:
    """Hugging Face's CLIP normalizer: NFC, whitespace runs to one space, each character
    lower-cased on its own (a final capital sigma gives σ, where str.lower gives ς).

    >>> hf_clean_text("ΟΔΟΣ  Caf\u00c3\u00a9 &amp;")
    'οδοσ cafã© &amp;'
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


@functools.lru_cache(maxsize=1)
def _byte_to_symbol() -> dict[int, str]:
    """GPT-2's reversible map from UTF-8 bytes to printable characters, as CLIP uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Order matters: the first 256 vocabulary entries are these symbols, printable bytes first.
    symbols = {b: chr(b) for b in printable}
    symbols.update({b: chr(256 + n) for n, b in enumerate(others)})
    return symbols


def _read_vocabulary(path: Path, specials: tuple[str, str]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """The token ids and merge ranks of the vocabulary file at `path`, with `specials` last."""
    if not path.is_file():
        raise MissingFileError(
            f"No CLIP vocabulary file at {path}. Fix: pass the path of a copy of {VOCAB_FILE_NAME} "
            "(the exporter puts one in each model directory; mlflow_clip/assets has the original)."
        )
    try:
        return _vocabulary(path.read_bytes(), specials)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ModelConfigError(
            f"{path} is not a gzipped UTF-8 {VOCAB_FILE_NAME}: {e}. Fix: copy the file again."
        ) from e
    except _NoMerges:
        raise ModelConfigError(
            f"{path} does not hold CLIP's {_NUM_MERGES} byte-pair merges (one pair per line after a "
            f"header line). Fix: use {VOCAB_FILE_NAME} from the clip package, SHA-256 {VOCAB_SHA256}."
        ) from None


class _NoMerges(ValueError):
    pass


@functools.lru_cache(maxsize=4)
def _vocabulary(gzipped: bytes, specials: tuple[str, str]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Parsed once per content: an export reads the same file three times, and every model of a
    process carries a copy of it (0.2 s each here). Keyed by the bytes themselves, so a file that
    changed is parsed again."""
    lines = gzip.decompress(gzipped).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) < _NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise _NoMerges
    symbols = list(_byte_to_symbol().values())
    vocab = symbols + [s + _WORD_END for s in symbols] + ["".join(m) for m in merges] + list(specials)
    return {token: i for i, token in enumerate(vocab)}, {merge: rank for rank, merge in enumerate(merges)}


class WordCache:
    """Thread-safe LRU of word -> ids, bounded by entries and by characters held."""

    def __init__(
        self, entries: int = BPE_CACHE_SIZE, chars: int = BPE_CACHE_CHARS, word_chars: int = BPE_CACHE_WORD_CHARS
    ):
        self.entries, self.chars, self.word_chars = entries, chars, word_chars
        self.held = 0
        self._items: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, word: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._items.get(word)
            if ids is not None:
                self._items.move_to_end(word)
            return ids

    def put(self, word: str, ids: tuple[int, ...]) -> None:
        if len(word) > self.word_chars:
            return
        with self._lock:
            if word in self._items:
                return
            self._items[word] = ids
            self.held += len(word)
            while len(self._items) > self.entries or self.held > self.chars:
                old, _ = self._items.popitem(last=False)
                self.held -= len(old)
