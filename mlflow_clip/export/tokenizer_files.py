"""The served tokenizer's files, written from the source's own tokenizer: `write_tokenizer_files`.

Export world (a transformers tokenizer object in, files out). A tokenizer that runs on Hugging
Face's `tokenizers` (transformers' `TokenizersBackend`: open_clip's `HFTokenizer` for SigLIP,
SigLIP 2 and the multilingual towers, Gemma's and T5's tokenizers in Hugging Face folders) is
written as its own `tokenizer.json`, with the truncation and padding the source's call applies
(`padding="max_length"`, `truncation=True` at the context length, on the source's sides, with its
pad token) written into it. Hugging Face's `SiglipTokenizer`, which runs in Python on a
SentencePiece model, is written as that model (`spiece.model`) and `sentencepiece.json`: its
special tokens (with the whitespace each strips around itself), end and pad ids, unknown token,
lower-casing and the context length. Anything else is refused: its ids could not be promised.

    >>> name, files = write_tokenizer_files(hf_tokenizer, "out", context_length=64)  # doctest: +SKIP
    >>> name, [f.name for f in files]  # doctest: +SKIP
    ('tokenizers', ['tokenizer.json'])
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlflow_clip.export.sources import SourceError
from mlflow_clip.serving.text_tokenizers import (
    SENTENCEPIECE,
    SENTENCEPIECE_MODEL_FILE,
    TOKENIZER_FILES,
    TOKENIZERS,
)


def write_tokenizer_files(tokenizer: Any, out_dir: str | Path, context_length: int) -> tuple[str, list[Path]]:
    """(the library that serves them, the files) for a transformers tokenizer, into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return TOKENIZERS, [_write_tokenizers_file(tokenizer, backend, out_dir, context_length)]
    if type(tokenizer).__name__ == "SiglipTokenizer":
        return SENTENCEPIECE, _write_siglip_sentencepiece(tokenizer, out_dir, context_length)
    raise SourceError(
        f"The source's tokenizer is a {type(tokenizer).__name__}, which neither tokenizers nor the served "
        "SentencePiece tokenizer reproduces. Save a tokenizer.json for it (a fast tokenizer) into the folder."
    )


def _write_tokenizers_file(tokenizer: Any, backend: Any, out_dir: Path, context_length: int) -> Path:
    from tokenizers import Tokenizer

    if tokenizer.pad_token_id is None:
        raise SourceError(f"The source's tokenizer ({type(tokenizer).__name__}) has no pad token to pad with.")
    served = Tokenizer.from_str(backend.to_str())
    served.no_truncation()
    served.no_padding()
    served.enable_truncation(max_length=context_length, direction=tokenizer.truncation_side)
    served.enable_padding(
        length=context_length,
        direction=tokenizer.padding_side,
        pad_id=int(tokenizer.pad_token_id),
        pad_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        pad_token=str(tokenizer.pad_token),
    )
    path = out_dir / TOKENIZER_FILES[TOKENIZERS]
    served.save(str(path))
    return path


def _write_siglip_sentencepiece(tokenizer: Any, out_dir: Path, context_length: int) -> list[Path]:
    model = out_dir / SENTENCEPIECE_MODEL_FILE
    shutil.copyfile(tokenizer.vocab_file, model)
    specials = {
        token.content: [index, token.lstrip, token.rstrip] for index, token in tokenizer.added_tokens_decoder.items()
    }
    for token in tokenizer.all_special_tokens:
        specials.setdefault(str(token), [tokenizer.convert_tokens_to_ids(token), False, False])
    settings = {
        "model_file": model.name,
        "context_length": int(context_length),
        "pad_id": int(tokenizer.pad_token_id),
        "eos_id": int(tokenizer.eos_token_id),
        "unk_token": str(tokenizer.unk_token),
        "lower": bool(getattr(tokenizer, "do_lower_case", True)),
        "special_tokens": [[token, *flags] for token, flags in specials.items()],
    }
    path = out_dir / TOKENIZER_FILES[SENTENCEPIECE]
    path.write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return [path, model]
