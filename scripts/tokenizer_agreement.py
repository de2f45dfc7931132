"""Served tokenizers against their sources, script by script, with the time each takes.

Builds each family's source tokenizer from a SentencePiece model trained on the tests' corpus
(tests/source_models.py), writes the served files as the exporter does, and prints a Markdown
table: texts per script, texts whose ids differ, and the time to tokenize the whole corpus
(source vs served, same process, best of 3). Also tokenizes with a `tokenizers` conversion of
Hugging Face's SiglipTokenizer, the alternative to serving it with sentencepiece.

    python scripts/tokenizer_agreement.py
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# family -> (layout, open_clip's cleaning or None for a Hugging Face tokenizer called directly, context length)
FAMILIES = {
    "SigLIP (open_clip, T5's)": ("t5", "canonicalize", 64),
    "SigLIP 2 (open_clip, Gemma's)": ("gemma", "canonicalize", 64),
    "XLM-RoBERTa (open_clip)": ("xlmr", "whitespace", 77),
    "NLLB (open_clip)": ("nllb", "whitespace", 77),
    "SiglipTokenizer (Hugging Face)": ("hf-siglip", None, 64),
}
_SURROGATE = re.compile("[\ud800-\udfff]")


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def sources(tmp: Path) -> dict:
    import source_models as models
    import transformers

    built = {layout: models.tokenizer_folder(tmp / layout, layout) for layout in ("t5", "gemma", "xlmr", "nllb")}
    spm = models.train_sentencepiece(tmp / "hf-siglip-spm" / "spm.model", "t5")
    transformers.SiglipTokenizer(vocab_file=str(spm)).save_pretrained(tmp / "hf-siglip")
    built["hf-siglip"] = transformers.AutoTokenizer.from_pretrained(tmp / "hf-siglip")
    return built


def source_call(tokenizer, folder: Path, clean: str | None, length: int):
    if clean is None:

        def call(texts):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True)
            return np.asarray(ids["input_ids"])

        return call
    from open_clip.tokenizer import HFTokenizer

    hf = HFTokenizer(str(folder), context_length=length, clean=clean)
    return lambda texts: hf(texts).numpy()


def measure_family(family: str, tokenizer, tmp: Path, by_script: dict) -> tuple[list[str], str]:
    """(per script, "differing of texts"; the timing row) for one family."""
    from mlflow_clip.export.tokenizer_files import write_tokenizer_files
    from mlflow_clip.serving.text_tokenizers import load_tokenizer, tokenizer_file_name

    layout, clean, length = FAMILIES[family]
    out = tmp / f"served-{layout}"
    library, _ = write_tokenizer_files(tokenizer, out, length)
    served = load_tokenizer(out / tokenizer_file_name(library), library, clean or "", length)
    source = source_call(tokenizer, tmp / layout, clean, length)
    cells, everything = [], []
    for texts in by_script.values():
        texts = [t for t in texts if clean is not None or not _SURROGATE.search(t)]
        everything += texts
        differ = int((served(texts, length) != source(texts)).any(axis=1).sum())
        cells.append(f"{differ} of {len(texts)}")
    source_ms = 1000 * best_of(lambda: source(everything))
    served_ms = 1000 * best_of(lambda: served(everything, length))
    return cells, f"| {family} | {library} | {source_ms:.0f} ms | {served_ms:.0f} ms | {len(everything)} |"


def main() -> None:
    from multilingual import corpus_by_script

    by_script = corpus_by_script()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        built = sources(tmp)
        columns, timings = [], []
        for family, (layout, _, _) in FAMILIES.items():
            cells, timing = measure_family(family, built[layout], tmp, by_script)
            columns.append(cells)
            timings.append(timing)
        print("| script | texts | " + " | ".join(FAMILIES) + " |")
        print("|" + "---|" * (len(FAMILIES) + 2))
        for index, (script, texts) in enumerate(by_script.items()):
            print(f"| {script} | {len(texts)} | " + " | ".join(cells[index] for cells in columns) + " |")
        print("\n| family | served by | source | served | texts |\n|---|---|---|---|---|")
        print("\n".join(timings))
        print(conversion_row(built["hf-siglip"], by_script))


def conversion_row(tokenizer, by_script) -> str:
    """SiglipTokenizer's SentencePiece model converted to `tokenizers` (transformers' T5 converter)
    and fed the text canonicalized as SiglipTokenizer does: the ids that differ."""
    from transformers.convert_slow_tokenizer import T5Converter

    tokenizer._extra_ids = 0
    converted = T5Converter(tokenizer).converted()
    converted.enable_truncation(max_length=64)
    converted.enable_padding(length=64, pad_id=tokenizer.pad_token_id, pad_token=str(tokenizer.pad_token))
    texts = [t for texts in by_script.values() for t in texts if not _SURROGATE.search(t)]
    canonical = [tokenizer.canonicalize_text(t) for t in texts]
    ours = np.asarray([e.ids for e in converted.encode_batch(canonical)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.asarray(tokenizer(texts, padding="max_length", max_length=64, truncation=True)["input_ids"])
    differ = int((ours != theirs).any(axis=1).sum())
    return f"\nSiglipTokenizer converted to tokenizers: {differ} of {len(texts)} differ"


if __name__ == "__main__":
    main()
