"""What a registered version says about itself: its tags and its weights' origin.

>>> version_tags(config, True, {"source": "open_clip", "architecture": "ViT-B-16-SigLIP"})["head"]  # doctest: +SKIP
'sigmoid'
"""

from __future__ import annotations

from pathlib import Path

from mlflow_clip.export.checkpoints import DEMO_MODEL_NAME
from mlflow_clip.export.compat import import_clip
from mlflow_clip.serving.contract import ClassifierConfig


def weights_source(model: str, details: dict[str, str]) -> str:
    """Where the weights came from, in a sentence of the model card."""
    if details.get("source") == "open_clip":
        folder = details.get("tokenizer_folder")
        tokenizer = f", tokenizer from `{Path(folder).name}`" if folder else ""
        return f"local open_clip checkpoint `{Path(details['checkpoint']).name}` ({details['activation']}{tokenizer})"
    if details.get("source") == "hf":
        kind = "SiglipModel" if details.get("tokenizer") in ("tokenizers", "sentencepiece") else "CLIPModel"
        return f"local Hugging Face {kind} folder `{Path(details['folder']).name}` ({details['activation']})"
    if model == DEMO_MODEL_NAME:
        return "the demo weights shipped with mlflow-clip, trained on drawn shapes"
    if model in import_clip().available_models():
        return "OpenAI's published checkpoint"
    return f"local checkpoint `{Path(model).name}`"


def version_tags(config: ClassifierConfig, has_text_encoder: bool, details: dict[str, str]) -> dict[str, str]:
    """The tags a registered version carries from its creation: where it came from (`source`,
    `architecture`, `activation`), what it is (`clip_model`, `head`, `tokenizer`, `precision`,
    ...) and that it passed its gates."""
    return {
        **{key: details[key] for key in ("source", "architecture", "activation") if details.get(key)},
        "clip_model": config.clip_model,
        "templates": config.templates,
        "num_classes": str(len(config.classes)),
        "parity_status": "passed",
        "precision": config.precision,
        "text_encoder": "true" if has_text_encoder else "false",
        "head": config.head,
        "tokenizer": config.tokenizer,
    }
