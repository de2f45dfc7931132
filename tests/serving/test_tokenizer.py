"""The torch-free tokenizer gives the ids `clip.tokenize` gives, on many varied texts."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import ftfy
import numpy as np
import pytest
from helpers import BLOCK_TORCH, requires_export, subprocess_env

from mlflow_clip.package_data import default_vocab_license_path, default_vocab_path
from mlflow_clip.serving.contract import sha256_file as file_sha256
from mlflow_clip.serving.prompts import IMAGENET_TEMPLATES, fill_template
from mlflow_clip.serving.tokenizer import (
    CONTEXT_LENGTH,
    VOCAB_FILE_NAME,
    VOCAB_SHA256,
    VOCAB_SIZE,
    ClipTokenizer,
    TextInputError,
    clean_text,
)

NUM_RANDOM_TEXTS = 1200
SEED = 20240607

CLASS_NAMES = [
    "cat",
    "golden retriever",
    "T-shirt",
    "crème brûlée",
    "jack-o'-lantern",
    "Granny Smith",
    "pickup truck",
    "école",
    "寿司",
    "猫",
    "ramen 🍜",
    "espresso machine",
    "hot dog",
    "C-3PO",
    "o'clock",
    "washing-machine",
    "MP3 player",
    "7-Eleven",
    "R2-D2",
    "São Paulo",
]
# Hand-picked cases; the generator below combines them with random fragments.
EDGE_CASES = [
    "",
    " ",
    "\t\n\r ",
    "a",
    "A",
    "hello world",
    "Hello, World!",
    "HELLO WORLD",
    # contractions, straight, curly and upper-case, and letters that case-fold onto s/k
    "it's",
    "don't",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S",
    "DON'T",
    "It’s fine",
    "'s'''t're've'm'll'd",
    "rock'n'roll",
    "it'ſ",
    "'\u212a",
    "''",
    "'",
    # HTML entities, single and double escaped, and bare ampersands
    "fish &amp; chips",
    "it&#39;s",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp;",
    "&amp;lt;b&amp;gt;",
    "&quot;hi&quot;",
    "&nbsp;x&nbsp;",
    "&#x1F600;",
    "&eacute;t&eacute;",
    "AT&T",
    "a & b",
    "&amp",
    "&#",
    "<b>bold</b> &amp; more",
    # mojibake ftfy repairs
    "cafÃ©",
    "Ã¼ber",
    "â€œquotedâ€\x9d",
    "donâ€™t",
    "seÃ±or",
    "Ã¢â‚¬â„¢",
    "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t",
    "ï¬\x81ne",
    "\ufb01ne \ufb02ow",
    "ｆｕｌｌｗｉｄｔｈ",
    "\x1b[31mred\x1b[0m",
    "caf\u00e9 cafe\u0301",
    # special tokens written in the text
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "<|ENDOFTEXT|>",
    "!<|endoftext|>",
    "<|endof text|>",
    # whitespace and control characters
    "a\u00a0b",
    "a\u3000b",
    "a\u2028b",
    "a\x0bb\x0cc",
    "a\x1cb\x1fc",
    "a\x85b",
    "a\u200bb",
    "\ufeffbom",
    "a\x00b",
    "tab\tseparated\tvalues",
    "line\nbreak\r\nwindows\rmac",
    "   lots    of     space   ",
    # numbers
    "123",
    "3.14159",
    "1,000,000",
    "2024-06-07",
    "٣٤٥",
    "x²",
    "½ cup",
    "Ⅻ",
    "①②",
    "0x1F",
    "१२३",
    # letters from many scripts
    "Ångström",
    "Größe",
    "ΟΔΟΣ",
    "İstanbul",
    "ǅemal",
    "Привет, мир",
    "مرحبا بالعالم",
    "שלום",
    "नमस्ते",
    "สวัสดี",
    "한국어",
    "猫の写真",
    "一只狗在草地上",
    "ｶﾀｶﾅ",
    "ᚠᛇᚻ",
    "𝕳𝖊𝖑𝖑𝖔",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̯̈",
    "ι\u0345.",
    "\u212aelvin",
    "STRASSE Straße",
    "ﬀ",
    # emoji: single, skin tones, ZWJ sequences, flags, keycaps, variation selectors
    "🐱",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇫🇷🇯🇵",
    "1️⃣",
    "❤️",
    "🧑🏿‍🚀",
    "👩🏻‍❤️‍💋‍👨🏼",
    # surrogates: a pair ftfy joins, a lone one it replaces, and one written as an HTML entity
    "\ud83d\ude00",
    "lone \ud83d surrogate",
    "&#xD83D;",
    "a photo of a 🐶.",
    "a photo of a {}.",
    "{}",
    "a photo of a .",
    # punctuation
    "!!!",
    "...",
    "—",
    "–-",
    "«»",
    "¿¡",
    "#hashtag @mention",
    "http://example.com/a?b=c&d=e",
    "C++ & C#",
    "(a) [b] {c}",
    "~`^|\\",
    "“double” ‘single’",
    "e.g., i.e.,",
    "#1!!",
    "--help",
    "snake_case",
    "🤖🤖🤖!!!",
    # words for the byte-pair merges
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "zzxxqqjjkk",
    "abababababababababab",
]
WORDS = (
    "a an the photo picture of in on with my dog cat car person bird tree house red green blue big small "
    "bright dark cropped blurry close-up origami plushie sculpture tattoo rendering drawing painting low "
    "resolution good bad clean dirty weird cool nice toy video game art embroidered plastic black white"
).split()
SEPARATORS = [" ", " ", " ", "", ", ", "\t", "\n", "  ", ". ", "-", "/", "\r\n", "\u00a0"]


def _random_code_point(rng: random.Random) -> str:
    low, high = rng.choice(
        [
            (0x21, 0x7E),
            (0xA0, 0x24F),
            (0x300, 0x36F),
            (0x370, 0x3FF),
            (0x400, 0x4FF),
            (0x590, 0x6FF),
            (0x900, 0x97F),
            (0xE00, 0xE7F),
            (0x1100, 0x11FF),
            (0x2000, 0x206F),
            (0x2100, 0x22FF),
            (0x2460, 0x24FF),
            (0x2500, 0x257F),
            (0x3040, 0x30FF),
            (0x4E00, 0x9FFF),
            (0xAC00, 0xD7A3),
            (0xE000, 0xE0FF),
            (0xFF00, 0xFFEF),
            (0x1D400, 0x1D7FF),
            (0x1F300, 0x1FAFF),
            (0x80, 0x9F),
        ]
    )
    return chr(rng.randint(low, high))


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind <= 2:
        return rng.choice(WORDS)
    if kind == 3:
        return rng.choice(EDGE_CASES)
    if kind == 4:
        return fill_template(rng.choice(IMAGENET_TEMPLATES), rng.choice(CLASS_NAMES))
    if kind == 5:
        return "".join(_random_code_point(rng) for _ in range(rng.randint(1, 6)))
    if kind == 6:
        return str(rng.choice([rng.randint(0, 10**9), round(rng.uniform(-1e4, 1e4), rng.randint(0, 5))]))
    return rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "&amp;", "&#39;", "&lt;b&gt;", "Ã©", "â€™", "!?"])


def _random_text(rng: random.Random) -> str:
    count = rng.choice([1, 2, 3, 5, 8, 13]) if rng.random() < 0.85 else rng.randint(30, 120)
    text = ""
    for _ in range(count):
        text += _fragment(rng) + rng.choice(SEPARATORS)
    case = rng.randrange(6)
    if case == 0:
        text = text.upper()
    elif case == 1:
        text = text.title()
    elif case == 2:
        text = text.swapcase()
    return text if rng.random() < 0.8 else f"  {text}\t"


def varied_texts() -> list[str]:
    """The hand-picked cases, one prompt per template and class, then seeded random mixtures."""
    rng = random.Random(SEED)
    texts = list(EDGE_CASES)
    texts += [fill_template(t, rng.choice(CLASS_NAMES)) for t in IMAGENET_TEMPLATES]
    texts += [_random_text(rng) for _ in range(NUM_RANDOM_TEXTS)]
    return texts


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.from_file(default_vocab_path())


@pytest.fixture(scope="module")
def clip():
    from mlflow_clip.export.compat import import_clip

    return import_clip()  # without openai-clip's pkg_resources warning, whatever ran before


def _clip_ids(clip, texts, context_length=CONTEXT_LENGTH, truncate=True) -> np.ndarray:
    return clip.tokenize(texts, context_length=context_length, truncate=truncate).numpy()


def test_the_varied_texts_cover_what_they_claim(tokenizer):
    texts = varied_texts()
    assert len(texts) >= 1000 and len(set(texts)) >= 1000
    lengths = [len(tokenizer.encode(t)) + 2 for t in texts]
    assert sum(n > CONTEXT_LENGTH for n in lengths) >= 50, "too few over-long texts"
    assert sum(ftfy.fix_text(t) != t for t in texts) >= 200, "too few texts ftfy changes"
    for marker in ["&amp;", "&#39;", "&lt;b&gt;", "\u200d", "\U0001f3fd", "'ll", "\t", "\n", "Ã", "猫", "é"]:
        assert sum(marker in t for t in texts) >= 10, marker


@requires_export
def test_ids_equal_clip_tokenize_on_varied_texts(tokenizer, clip):
    texts = varied_texts()
    ours = tokenizer(texts, truncate=True)
    assert ours.dtype == np.int64 and ours.shape == (len(texts), CONTEXT_LENGTH)
    theirs = _clip_ids(clip, texts, truncate=True)
    mismatched = [i for i in range(len(texts)) if not np.array_equal(ours[i], theirs[i])]
    assert not mismatched, [texts[i] for i in mismatched[:5]]


@requires_export
@pytest.mark.parametrize("context_length", [1, 2, 5, 16, 100])
def test_ids_equal_clip_tokenize_at_other_context_lengths(tokenizer, clip, context_length):
    texts = varied_texts()[::3]
    np.testing.assert_array_equal(
        tokenizer(texts, context_length=context_length, truncate=True),
        _clip_ids(clip, texts, context_length=context_length, truncate=True),
    )


@requires_export
def test_without_truncation_the_same_texts_are_too_long(tokenizer, clip):
    texts = varied_texts()
    too_long = []
    for i, text in enumerate(texts):
        try:
            expected = _clip_ids(clip, [text], truncate=False)
        except RuntimeError:
            too_long.append(i)
            with pytest.raises(TextInputError, match="Text 0 "):
                tokenizer([text], truncate=False)
        else:
            np.testing.assert_array_equal(tokenizer([text], truncate=False), expected)
    assert len(too_long) >= 50


@requires_export
def test_shipped_vocabulary_is_clips_file(clip):
    from pathlib import Path

    clip_vocab = Path(clip.__file__).parent / VOCAB_FILE_NAME
    assert default_vocab_path().read_bytes() == clip_vocab.read_bytes()


@requires_export
def test_loads_and_tokenizes_without_torch(clip, tmp_path):
    """A serving machine: torch and clip unimportable, the vocabulary copied into a model folder."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(default_vocab_path(), model_dir / VOCAB_FILE_NAME)
    texts = ["a photo of a cat.", "Fish &amp; chips, cafÃ©!", "猫の写真 👨‍👩‍👧‍👦", "it's " * 60]
    expected = _clip_ids(clip, texts, truncate=True).tolist()
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import json
        from mlflow_clip.serving.tokenizer import ClipTokenizer
        tokenizer = ClipTokenizer.from_file({str(model_dir / VOCAB_FILE_NAME)!r})
        ids = tokenizer(json.loads({json.dumps(texts)!r}), truncate=True)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("IDS", json.dumps([str(ids.dtype), ids.tolist()]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dtype, ids = json.loads(result.stdout.split("IDS ", 1)[1])
    assert dtype == "int64" and ids == expected


def test_row_layout_is_start_ids_end_then_zeros(tokenizer):
    ids = tokenizer("a photo of a cat.", context_length=10)
    words = tokenizer.encode("a photo of a cat.")
    assert ids.tolist() == [[tokenizer.sot_token_id, *words, tokenizer.eot_token_id, 0, 0]]
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    assert tokenizer([]).shape == (0, CONTEXT_LENGTH)


def test_truncation_keeps_the_first_ids_and_ends_with_the_end_token(tokenizer):
    text = " ".join(f"word{i}" for i in range(100))
    full = [tokenizer.sot_token_id, *tokenizer.encode(text)]
    ids = tokenizer([text, "short"], context_length=20, truncate=True)
    assert ids[0].tolist() == full[:19] + [tokenizer.eot_token_id]
    assert ids[1].tolist()[:3] == [tokenizer.sot_token_id, *tokenizer.encode("short"), tokenizer.eot_token_id]


def test_too_long_text_without_truncation_names_its_index_and_the_fix(tokenizer):
    texts = ["fine", "x " * 200]
    with pytest.raises(
        TextInputError,
        match=r"Text 1 is longer than the context length 77 tokens.*truncate=True",
    ):
        tokenizer(texts, truncate=False)
    # 75 words + start + end is exactly 77: fits.
    assert tokenizer("x " * 75, truncate=False)[0, -1] == tokenizer.eot_token_id


def test_bad_texts_are_refused_with_their_index(tokenizer):
    with pytest.raises(TextInputError, match="Text 2 is a int, not a str"):
        tokenizer(["a", "b", 3])
    with pytest.raises(TextInputError, match="Text 1 is a NoneType"):
        tokenizer(["a", None])
    with pytest.raises(TextInputError, match="Received bytes; expected a str or a list of str"):
        tokenizer(b"a cat")
    with pytest.raises(ValueError, match="at least 1"):
        tokenizer("a", context_length=0)


def test_accepts_any_sequence_of_strings(tokenizer):
    texts = ["a red circle", "a blue square"]
    expected = tokenizer(texts)
    np.testing.assert_array_equal(tokenizer(tuple(texts)), expected)
    np.testing.assert_array_equal(tokenizer(np.array(texts)), expected)
    np.testing.assert_array_equal(tokenizer(t for t in texts), expected)


def test_clean_text_applies_clips_cleaning():
    assert clean_text("  Fish &amp;amp; CHIPS,\t\tcafÃ©  ") == "fish & chips, café"
    assert clean_text("\n\t ") == ""


def test_concurrent_threads_get_the_sequential_ids():
    texts = varied_texts()[:400]
    expected = ClipTokenizer(default_vocab_path())(texts)
    shared = ClipTokenizer(default_vocab_path())  # a cold cache, filled by all threads at once
    chunks = [texts[i::8] for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(shared, chunks * 3))
    for k, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[k % 8 :: 8])


def test_survives_pickling(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(copy(["a photo of a 🐶."]), tokenizer(["a photo of a 🐶."]))


def test_shipped_vocabulary_and_license():
    assert file_sha256(default_vocab_path()) == VOCAB_SHA256
    assert "Copyright (c) 2021 OpenAI" in default_vocab_license_path().read_text()


def test_bad_vocabulary_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="No CLIP vocabulary file"):
        ClipTokenizer.from_file(tmp_path / "missing.txt.gz")
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="not a gzipped UTF-8"):
        ClipTokenizer.from_file(not_gzip)
    damaged = tmp_path / "damaged.txt.gz"  # a gzip header over a corrupted deflate stream
    data = bytearray(default_vocab_path().read_bytes())
    data[5000:5100] = bytes(100)
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a gzipped UTF-8"):
        ClipTokenizer.from_file(damaged)
    cut = tmp_path / "cut.txt.gz"
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as f:
        head = "\n".join(f.read().split("\n")[:1000])
    with gzip.open(cut, "wt", encoding="utf-8") as f:
        f.write(head)
    with pytest.raises(ValueError, match="does not hold CLIP's 48894 byte-pair merges"):
        ClipTokenizer.from_file(cut)


def _clips_merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's own merge loop (`clip/simple_tokenizer.py`, `bpe`): the lowest-ranked pair merged
    everywhere, left to right, then again; quadratic in the word's length."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def test_merging_gives_clips_merges_on_long_and_repetitive_words(tokenizer):
    """The heap-ordered merge (O(n log n)) against CLIP's loop, on words where the order of
    merges matters most: runs of one letter, repeated pairs and triples, random words."""
    ranks = {pair: rank for rank, pair in enumerate(tokenizer.merges())}
    ids = {token: i for i, token in enumerate(tokenizer.vocabulary())}
    rng = random.Random(SEED)
    words = [letter * n for letter in "aeiozs" for n in (1, 2, 3, 5, 8, 13, 40, 101)]
    words += [unit * n for unit in ("ab", "aab", "abc", "ing", "the", "ee") for n in (2, 7, 33)]
    words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 200))) for _ in range(80)]
    words += ["".join(rng.choice("aeinrst") for _ in range(rng.randint(20, 120))) for _ in range(60)]
    for word in words:
        assert tokenizer.encode(word) == [ids[part] for part in _clips_merge(word, ranks)], word


def test_one_long_word_costs_linear_time(tokenizer):
    """A 20,000-letter word: about 0.06 CPU s here; CLIP's loop takes about 20 s on it."""
    word = "".join(random.Random(SEED).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20_000))
    started = time.process_time()
    tokenizer.encode(word)
    assert time.process_time() - started < 1.0


def test_each_distinct_text_and_long_word_is_encoded_once(tokenizer, monkeypatch):
    word = "x" + "abcdefghij" * 30
    texts = [f"a photo of {word}", "a cat"] * 500
    expected = tokenizer(texts[:2])
    encoded, merged = [], []
    encode, merge = ClipTokenizer.encode, ClipTokenizer._merge
    monkeypatch.setattr(ClipTokenizer, "encode", lambda self, text, *a: encoded.append(text) or encode(self, text, *a))
    monkeypatch.setattr(ClipTokenizer, "_merge", lambda self, symbols: merged.append(symbols) or merge(self, symbols))
    ids = ClipTokenizer(default_vocab_path())(texts)
    np.testing.assert_array_equal(ids, np.tile(expected, (500, 1)))
    assert sorted(encoded) == sorted(texts[:2])
    assert sum(len(symbols) > 64 for symbols in merged) == 1  # the 301-letter word, merged once


def test_a_vocabulary_is_parsed_once_per_content_and_again_when_the_file_changes(tmp_path):
    """Tokenizers from the same bytes share one parse; a file changed in place is read anew."""
    path = tmp_path / "vocab.txt.gz"
    shutil.copyfile(default_vocab_path(), path)
    first, second = ClipTokenizer.from_file(path), ClipTokenizer.from_file(default_vocab_path())
    assert first._ranks is second._ranks and first("a red circle").tolist() == second("a red circle").tolist()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # the two highest-priority merges swapped
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    changed = ClipTokenizer.from_file(path)
    assert changed._ranks is not first._ranks
    assert changed.merges()[:2] == first.merges()[:2][::-1] and changed.merges()[2:] == first.merges()[2:]
