"""The served tokenizers of SigLIP, SigLIP 2 and the multilingual towers give their sources' ids.

Each source tokenizer is built the way its published folder is (T5's for SigLIP, Gemma's for
SigLIP 2, XLM-RoBERTa's, NLLB's, Hugging Face's own SiglipTokenizer) from a SentencePiece model
trained here, and called as its source calls it (open_clip's `HFTokenizer` with its cleaning;
Hugging Face's tokenizer with `padding="max_length"` and truncation). The served tokenizer reads
only the files the exporter writes. Compared on the multilingual corpus (tests/multilingual.py:
over 1,000 texts in ten scripts), at each family's context length and a short one, script by script.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from helpers import BLOCK_TORCH, has_module, subprocess_env
from multilingual import SCRIPTS, corpus, corpus_by_script

from mlflow_clip.serving.text_tokenizers import SENTENCEPIECE, TOKENIZERS, load_tokenizer, tokenizer_file_name
from mlflow_clip.serving.tokenizer import TextInputError

pytestmark = pytest.mark.skipif(
    not all(has_module(m) for m in ("open_clip", "transformers", "sentencepiece", "tokenizers", "torch")),
    reason="needs the sources extra: pip install '.[sources]'",
)
_SURROGATE = re.compile("[\ud800-\udfff]")
# layout -> (open_clip's cleaning, or None for a Hugging Face folder's tokenizer called directly; context lengths)
FAMILIES = {
    "t5": ("canonicalize", (64, 16)),  # SigLIP (open_clip)
    "gemma": ("canonicalize", (64,)),  # SigLIP 2 (open_clip)
    "xlmr": ("whitespace", (77, 16)),  # xlm-roberta-*-ViT-* (open_clip)
    "nllb": ("whitespace", (77,)),  # nllb-clip-* (open_clip)
    "hf-gemma": (None, (64,)),  # SigLIP 2's fixed-resolution Hugging Face folders
    "hf-siglip": (None, (64, 16)),  # Hugging Face's SiglipTokenizer (SigLIP's folders)
}


@pytest.fixture(scope="module")
def sources(module_tmp):
    """layout -> (the source's tokenizer object, transformers', and its folder), built once."""
    import source_models as models
    import transformers

    root = module_tmp("tokenizers")
    built = {
        layout: (models.tokenizer_folder(root / layout, layout), root / layout)
        for layout in ("t5", "gemma", "xlmr", "nllb")
    }
    built["hf-gemma"] = built["gemma"]
    spm = models.train_sentencepiece(root / "hf-siglip-spm" / "spm.model", "t5")
    transformers.SiglipTokenizer(vocab_file=str(spm)).save_pretrained(root / "hf-siglip")
    built["hf-siglip"] = (transformers.AutoTokenizer.from_pretrained(root / "hf-siglip"), root / "hf-siglip")
    return built


def _pair(sources, module_tmp, layout: str, context_length: int):
    """(the source's tokenize(texts) -> ids, the served tokenizer, its library)."""
    from open_clip.tokenizer import HFTokenizer

    from mlflow_clip.export.tokenizer_files import write_tokenizer_files

    tokenizer, folder = sources[layout]
    clean, _ = FAMILIES[layout]
    out = module_tmp(f"served-{layout}-{context_length}")
    library, _ = write_tokenizer_files(tokenizer, out, context_length)
    served = load_tokenizer(out / tokenizer_file_name(library), library, clean or "", context_length)
    if clean is None:

        def source(texts):
            with warnings.catch_warnings():  # a text that ends with the end token: it warns, and adds none
                warnings.filterwarnings("ignore", message="This sequence already has", category=UserWarning)
                ids = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True)
            return np.asarray(ids["input_ids"])
    else:
        open_clip_tokenizer = HFTokenizer(str(folder), context_length=context_length, clean=clean)

        def source(texts):
            return open_clip_tokenizer(texts).numpy()

    return source, served, library


@pytest.mark.parametrize(
    "layout, context_length", [(layout, n) for layout, (_, lengths) in FAMILIES.items() for n in lengths]
)
def test_served_ids_equal_the_sources_on_every_script(sources, module_tmp, layout, context_length):
    source, served, library = _pair(sources, module_tmp, layout, context_length)
    assert library == (SENTENCEPIECE if layout == "hf-siglip" else TOKENIZERS)
    mismatched, cut = {}, 0
    for script, texts in corpus_by_script().items():
        texts = [t for t in texts if layout not in ("hf-siglip", "hf-gemma") or not _SURROGATE.search(t)]
        ours, lengths = served.tokenize(texts, context_length)
        theirs = source(texts)
        assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(texts), context_length)
        mismatched[script] = [texts[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]
        cut += sum(n > context_length for n in lengths)
    assert {script: texts[:3] for script, texts in mismatched.items() if texts} == {}
    assert cut >= 20, "too few texts reach the truncation"  # padded and truncated alike, both ways


def test_the_corpus_covers_ten_scripts_and_over_a_thousand_texts():
    by_script = corpus_by_script()
    assert set(SCRIPTS) <= set(by_script) and len(SCRIPTS) >= 10
    assert all(len(texts) >= 100 for texts in by_script.values()) and len(set(corpus())) >= 1000


def test_hugging_faces_siglip_tokenizer_refuses_what_its_source_cannot_encode(sources, module_tmp):
    _, served, _ = _pair(sources, module_tmp, "hf-siglip", 64)
    with pytest.raises(TextInputError, match="Text 1 contains a lone surrogate"):
        served.tokenize(["fine", "lone \ud83d surrogate"], 64)
    with pytest.raises(TextInputError, match="Text 0 is a int"):
        served.tokenize([3], 64)
    with pytest.raises(TextInputError, match="longer than the context length 64"):
        served(["word " * 100], 64, truncate=False)


def test_a_tokenizer_file_that_does_not_pad_and_truncate_is_refused(sources, module_tmp):
    _, served, _ = _pair(sources, module_tmp, "xlmr", 77)
    broken = module_tmp("broken") / "tokenizer.json"
    document = json.loads(served.path.read_text(encoding="utf-8"))
    broken.write_text(json.dumps({**document, "padding": None}), encoding="utf-8")
    with pytest.raises(ValueError, match="does not pad and truncate to one fixed length"):
        load_tokenizer(broken, TOKENIZERS, "whitespace", 77)
    with pytest.raises(ValueError, match="pads and truncates to 77 tokens, not 64"):
        served.tokenize(["a"], 64)


@pytest.mark.parametrize("layout", ["t5", "hf-siglip"])
def test_served_tokenizers_load_and_tokenize_without_torch(sources, module_tmp, layout, tmp_path):
    """A serving machine: torch, transformers and open_clip unimportable, only the model's files."""
    source, served, library = _pair(sources, module_tmp, layout, 64)
    texts = ["a photo of a cat.", "Фото кошки!", "猫の写真 👨‍👩‍👧‍👦", "it's " * 60, "a </s> b <unk>"]
    expected = source(texts).tolist()
    script = BLOCK_TORCH.replace('"clip"}', '"clip", "transformers", "open_clip"}') + textwrap.dedent(
        f"""
        import json
        from mlflow_clip.serving.text_tokenizers import load_tokenizer
        tokenizer = load_tokenizer({str(served.path)!r}, {library!r}, {FAMILIES[layout][0] or ""!r}, 64)
        ids = tokenizer(json.loads({json.dumps(texts)!r}), 64)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("IDS", json.dumps(ids.tolist()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.split("IDS ", 1)[1]) == expected
