"""The text side of an export: the head, the source's prompts checked, the text encoder exported.

Export world. CLIP's text transformer is exported as `graph.TextTower`; a source whose text side is
not CLIP's (SigLIP, the multilingual towers, Hugging Face SigLIP folders) brings its own encoder
module (`LoadedClip.text_encoder`), traced on its own tokenizer's ids.

    >>> choose_head(None, loaded)  # doctest: +SKIP
    'sigmoid'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from mlflow_clip.export.checkpoints import LoadedClip
from mlflow_clip.export.graph import export_text_encoder, export_text_module, simplify_onnx
from mlflow_clip.export.spec import SpecError, check_prompt_lengths
from mlflow_clip.package_data import default_vocab_path
from mlflow_clip.serving.contract import SIGMOID_HEAD, SOFTMAX_HEAD
from mlflow_clip.serving.text_tokenizers import load_tokenizer, tokenizer_file_name

_logger = logging.getLogger(__name__)


def choose_head(head: str | None, loaded: LoadedClip) -> str:
    """The head asked for, or the source's own: sigmoid where it was trained with a logit bias
    (SigLIP), else softmax. A sigmoid head needs that bias."""
    if not head:
        return SIGMOID_HEAD if loaded.logit_bias is not None else SOFTMAX_HEAD
    if head == SIGMOID_HEAD and loaded.logit_bias is None:
        raise SpecError(
            f"Received head=sigmoid with model={loaded.name!r}, which was trained with a softmax over its classes "
            "(no logit bias): its sigmoid scores would mean nothing. Leave head out (softmax)."
        )
    return head


def check_source_prompt_lengths(loaded: LoadedClip, classes: Sequence[str], template_texts: Sequence[str]) -> None:
    """`spec.check_prompt_lengths` with the source's served tokenizer (known once it is loaded)."""
    name = loaded.details["tokenizer"]
    folder = loaded.tokenizer_files[0].parent
    served = load_tokenizer(folder / tokenizer_file_name(name), name, loaded.text_clean, loaded.context_length)
    check_prompt_lengths(classes, template_texts, int(loaded.context_length or 0), tokenizer=served)


def export_source_text_encoder(loaded: LoadedClip, path: Path, opset: int) -> Path:
    """The text encoder of `loaded`, exported and simplified: CLIP's text transformer, or the
    source's own encoder (traced on its tokenizer's ids)."""
    print("[mlflow-clip] exporting the text encoder", flush=True)
    if loaded.text_encoder is None:  # CLIP's text transformer
        export_text_encoder(loaded.model, path, opset)
    else:
        example = loaded.tokenize(["a photo of a cat.", "a"], loaded.context_length)
        export_text_module(loaded.text_encoder, path, example, opset, full_context=loaded.text_pooling == "full")
    simplified, note = simplify_onnx(path)
    if not simplified:
        _logger.warning("Keeping the unsimplified text encoder: %s", note)
    return path


def served_vocab_path(loaded: LoadedClip, tokenizer: str) -> Path:
    """The file the served tokenizer reads: CLIP's vocabulary, or the exported tokenizer file."""
    if not loaded.tokenizer_files:
        return default_vocab_path()
    return loaded.tokenizer_files[0].parent / tokenizer_file_name(tokenizer)
