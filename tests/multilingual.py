"""A multilingual text corpus for the tokenizer tests: class names and prompts in ten scripts.

A plain module (`from multilingual import corpus_by_script`). Per script, real words written in
it, random letters from its Unicode blocks, digits and punctuation of the script, case changes,
runs of spaces and over-long texts (beyond every context length), seeded so the corpus is the
same on every run; `mixed` combines the scripts with the tokenizer tests' hand-picked edge cases
(HTML entities, mojibake, special tokens written in a text, control characters) and the special
tokens of SentencePiece tokenizers.
"""

from __future__ import annotations

import importlib.util
import random
from functools import lru_cache
from pathlib import Path

SEED = 20251206
TEXTS_PER_SCRIPT = 110
# Words written in each script (and the script's own digits and punctuation).
WORDS: dict[str, list[str]] = {
    "latin": "a photo of the cat dog car bird tree house red green blue small big une photo d'un chat chien "
    "voiture oiseau maison rouge ein Foto einer Katze Hund Straße Größe über café naïve façade señor niño "
    "ação coração İstanbul şehir güzel łódź żółw Ångström ørken".split(),
    "cyrillic": "фото кошка собака машина птица дерево дом красный зелёный синий маленький большой Привет мир "
    "ёжик щука юла Україна їжак ґанок Београд ђак".split(),
    "greek": "φωτογραφία γάτα σκύλος αυτοκίνητο πουλί δέντρο σπίτι κόκκινο πράσινο μπλε ΟΔΟΣ Σίσυφος "
    "ψυχή ωκεανός ΰ ΐ".split(),
    "arabic": "صورة قطة كلب سيارة طائر شجرة منزل أحمر أخضر أزرق مرحبا بالعالم ٣٤٥ ١٢ فارسی گربه ـــ".split(),
    "hebrew": "תמונה חתול כלב מכונית ציפור עץ בית אדום ירוק כחול שָׁלוֹם עוֹלָם".split(),
    "devanagari": "तस्वीर बिल्ली कुत्ता गाड़ी पक्षी पेड़ घर लाल हरा नीला नमस्ते दुनिया १२३ क्षत्रिय".split(),
    "cjk": "猫 狗 汽车 鸟 树 房子 红色 绿色 蓝色 一只狗在草地上 猫の写真 犬 自動車 写真 ｶﾀｶﾅ ひらがな 한국어 "
    "고양이 사진 강아지 。、「」".split(),
    "thai": "รูปภาพ แมว สุนัข รถยนต์ นก ต้นไม้ บ้าน สีแดง สีเขียว สีน้ำเงิน สวัสดี ๑๒๓".split(),
    "emoji": "🐱 🐶 🚗 🐦 🌳 🏠 ❤️ 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 1️⃣ 🧑🏿‍🚀 🍜 😀😀😀".split(),
}
# Unicode blocks of each script, for random letters.
BLOCKS: dict[str, list[tuple[int, int]]] = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)],
    "cyrillic": [(0x400, 0x4FF)],
    "greek": [(0x370, 0x3FF), (0x1F00, 0x1FFF)],
    "arabic": [(0x600, 0x6FF), (0xFE70, 0xFEFF)],
    "hebrew": [(0x591, 0x5F4)],
    "devanagari": [(0x900, 0x97F)],
    "cjk": [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF)],
    "thai": [(0xE01, 0xE5B)],
    "emoji": [(0x1F300, 0x1FAFF), (0x2600, 0x27BF)],
}
TEMPLATES = ["{}", "a photo of a {}.", "une photo d'un {}", "фото: {}", "{}の写真", "รูปภาพของ{}", "तस्वीर {}"]
SEPARATORS = [" ", " ", " ", "", ", ", "  ", "\t", "\n", ". ", "-", "!", "?", "\u00a0", "_"]
SCRIPTS = (*WORDS, "mixed")
# SentencePiece tokenizers' special tokens written in a text, with the spaces some strip around them.
SPECIAL_TEXTS = ("</s>", "a </s> b", "  </s>  ", "</S>", "<unk>", "x<unk>y", "<pad> cat", "<s>hello</s>", "<eos> <bos>",
                 "cat</s></s>", "▁a photo", "<mask> dog", "eng_Latn a cat", "a photo_of a cat")  # fmt: skip


def _random_letters(rng: random.Random, script: str) -> str:
    low, high = rng.choice(BLOCKS[script])
    return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 7)))


def _text(rng: random.Random, scripts: list[str]) -> str:
    count = rng.choice([1, 1, 2, 3, 5, 8]) if rng.random() < 0.9 else rng.randint(40, 90)
    parts = []
    for _ in range(count):
        script = rng.choice(scripts)
        kind = rng.random()
        part = _random_letters(rng, script) if kind < 0.25 else rng.choice(WORDS[script])
        if kind > 0.9:
            part = str(rng.randint(0, 10**6))
        parts.append(part + rng.choice(SEPARATORS))
    text = rng.choice(TEMPLATES).replace("{}", "".join(parts).strip() or "x")
    case = rng.randrange(5)
    return text.upper() if case == 0 else text.title() if case == 1 else text


@lru_cache(maxsize=1)
def _edge_cases() -> tuple[str, ...]:
    """The tokenizer tests' hand-picked cases (tests/serving/test_tokenizer.py)."""
    path = Path(__file__).parent / "serving" / "test_tokenizer.py"
    spec = importlib.util.spec_from_file_location("_tokenizer_edge_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.EDGE_CASES)


@lru_cache(maxsize=1)
def corpus_by_script() -> dict[str, tuple[str, ...]]:
    """Script name -> its texts (TEXTS_PER_SCRIPT each; `mixed` also has the edge cases)."""
    rng = random.Random(SEED)
    corpus = {}
    for script in WORDS:
        texts = list(WORDS[script][:20]) + [_text(rng, [script]) for _ in range(TEXTS_PER_SCRIPT - 20)]
        corpus[script] = tuple(texts)
    mixed = [_text(rng, list(WORDS)) for _ in range(TEXTS_PER_SCRIPT)]
    corpus["mixed"] = tuple(mixed) + _edge_cases() + SPECIAL_TEXTS
    return corpus


def corpus() -> list[str]:
    """Every text of the corpus, script by script."""
    return [text for texts in corpus_by_script().values() for text in texts]


def training_lines(count: int = 400) -> list[str]:
    """Lines to train a small tokenizer on: the words of every script, in seeded sentences (a
    different seed from the corpus, so the corpus also holds words the tokenizer has not seen)."""
    rng = random.Random(SEED + 1)
    lines = [" ".join(words) for words in WORDS.values()]
    while len(lines) < count:
        words = WORDS[rng.choice(list(WORDS))]
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))))
    return lines
