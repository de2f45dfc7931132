"""CLIP's own PyTorch pipeline as a classifier, to compare an exported model's accuracy with.

Export world (torch, clip). `mlflow_clip.evaluation` imports this only for `reference=...`.
The reference uses CLIP's `preprocess` and the PyTorch model, with the exported model's classes
and template texts (read from its config, never re-derived), and answers like
`ZeroShotClassifier.predict`, so both go through the same metrics.

    >>> reference = build_reference_classifier("demo", classifier.config)  # doctest: +SKIP
    >>> reference.predict([open("cat.jpg", "rb").read()], top_k=5)["label"][0]  # doctest: +SKIP
    'a cat'
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from mlflow_clip.export.checkpoints import LoadedClip
from mlflow_clip.export.graph import ZeroShotHead, encode_text_features
from mlflow_clip.export.loaders import load_source
from mlflow_clip.serving.contract import SOFTMAX_HEAD, ClassifierConfig
from mlflow_clip.serving.images import ImageInputError, decode_image
from mlflow_clip.serving.rows import InvalidInputError, coerce_rows, describe_bad_rows, format_predictions

_logger = logging.getLogger(__name__)


class ReferenceClassifier:
    """CLIP's visual tower + the zero-shot head in PyTorch, fed by CLIP's own `preprocess`.

    Images are decoded the way serving decodes them (upright, RGB, alpha on white), so the
    comparison measures preprocessing and runtime, not two decoding policies.
    """

    def __init__(
        self, loaded: LoadedClip, classes: Sequence[str], template_texts: Sequence[str], head: str = SOFTMAX_HEAD
    ):
        self.loaded = loaded
        self._classes = list(classes)
        model = loaded.reference_model  # the source's own model (Hugging Face's, not its conversion)
        text_features = encode_text_features(model, self._classes, list(template_texts), loaded.tokenize)
        logit_scale = float(model.logit_scale.detach().exp())
        self.head = ZeroShotHead(model.visual, text_features, logit_scale, loaded.logit_bias, head).eval()

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @torch.no_grad()
    def predict(self, images: Any, top_k: int = 0, on_error: str = "raise") -> pd.DataFrame:
        rows = coerce_rows(images)
        probabilities = np.full((len(rows), len(self._classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(rows)
        pixels, good = [], []
        for index, value in enumerate(rows):
            try:
                pixels.append(self.loaded.preprocess(decode_image(value)))
                good.append(index)
            except ImageInputError as e:
                errors[index] = e.reason
        bad = [(i, reason) for i, reason in enumerate(errors) if reason is not None]
        if bad and on_error == "raise":
            raise InvalidInputError(describe_bad_rows(bad), bad)
        if good:
            probabilities[good] = self.head(torch.stack(pixels)).float().numpy()
        return format_predictions(probabilities, errors, self._classes, top_k, on_error)


def build_reference_classifier(spec: str, config: ClassifierConfig) -> ReferenceClassifier:
    """Load CLIP `spec` (a model name, 'demo' or a checkpoint path) as the reference for a model
    exported with `config` (its classes and template texts)."""
    loaded = load_source(spec)
    if loaded.name != config.clip_model:
        _logger.warning(
            "The reference CLIP %r is not the model this classifier was exported from (%r); "
            "the comparison measures two different models.",
            loaded.name,
            config.clip_model,
        )
    return ReferenceClassifier(loaded, config.classes, config.template_texts, config.head)
