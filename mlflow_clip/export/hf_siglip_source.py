"""Hugging Face `SiglipModel` folders (SigLIP, and SigLIP 2's fixed-resolution checkpoints).

Export world (torch, transformers). The folder's own model is exported as it is: its image tower
(`get_image_features`, the attention-pooled embedding) under the zero-shot head, and its text
tower (`get_text_features` on the ids, L2-normalized) as the text encoder, so parity compares the
export with the very model it came from, fed by `SiglipImageProcessorPil` (the processor whose
pixels the torch-free preprocessing reproduces bit for bit: SigLIP's resize of the whole image)
and the folder's tokenizer with `padding="max_length"` at the text tower's 64 positions, as
SigLIP was trained. The text tower reads the ids alone, without an attention mask: the padding
is part of what it was trained on (open_clip runs the same weights the same way).

    >>> loaded = load_hf_siglip(parse_model_source("hf:/models/siglip-base-patch16-224"), "out")  # doctest: +SKIP
    >>> loaded.resize_mode, loaded.details["tokenizer"]  # doctest: +SKIP
    ('squash', 'sentencepiece')
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_clip.export.checkpoints import LoadedClip
from mlflow_clip.export.hf_folder import siglip_image_settings
from mlflow_clip.export.hf_source import import_transformers, load_hf_folder
from mlflow_clip.export.open_clip_text_source import NormalizedText, SourceModel
from mlflow_clip.export.sources import ModelSource
from mlflow_clip.export.tokenizer_files import write_tokenizer_files
from mlflow_clip.serving.preprocess import SQUASH

_logger = logging.getLogger(__name__)


class _Features(nn.Module):
    """One of the model's towers, `method(**{argument: inputs})`, as its pooled features
    (transformers 5 returns a ModelOutput whose pooler_output they are)."""

    def __init__(self, hf_model: nn.Module, method: str, argument: str):
        super().__init__()
        self.hf_model = hf_model
        self._method, self._argument = method, argument

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = getattr(self.hf_model, self._method)(**{self._argument: inputs})
        return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_hf_siglip(source: ModelSource, work_dir: str | Path) -> LoadedClip:
    """The folder's SiglipModel in float32, its processor and tokenizer; the served tokenizer's
    files are written into `work_dir`."""
    folder = Path(source.folder)
    hf_model, processor, tokenizer = load_hf_folder(folder, "Siglip", "AutoTokenizer")
    settings = siglip_image_settings(folder, source.model)
    context_length = int(hf_model.config.text_config.max_position_embeddings)
    served, files = write_tokenizer_files(tokenizer, work_dir, context_length)
    model = SourceModel(
        hf_model,
        _Features(hf_model, "get_image_features", "pixel_values"),
        _Features(hf_model, "get_text_features", "input_ids"),
        hf_model.logit_scale,
        hf_model.logit_bias,
        context_length,
    ).eval()

    def preprocess(image: Any) -> torch.Tensor:
        return torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])

    def tokenize(texts, length: int) -> torch.Tensor:
        ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True)
        return torch.tensor(ids["input_ids"], dtype=torch.long)

    return LoadedClip(
        model=model,
        preprocess=preprocess,
        name=source.name,
        input_resolution=settings.input_resolution,
        mean=settings.mean,
        std=settings.std,
        interpolation=settings.interpolation,
        resize_mode=SQUASH,
        tokenize=tokenize,
        details={
            **source.run_params(),
            "tokenizer": served,
            "parity_reference": (
                f"transformers {import_transformers().__version__} SiglipModel from {folder.name}, "
                f"SiglipImageProcessorPil and {type(tokenizer).__name__} "
                f"(padding to {context_length}, no attention mask)"
            ),
        },
        logit_bias=float(hf_model.logit_bias.detach().reshape(-1)[0]),
        text_encoder=NormalizedText(model).eval(),
        text_pooling="full",
        text_clean="",
        tokenizer_files=tuple(files),
        context_length=context_length,
    )
