"""open_clip models from a local checkpoint, shaped like OpenAI's CLIP for the export.

Export world (torch, open_clip). The architecture is built from open_clip's own config with the
activation `ModelSource` chose (GELU, or QuickGELU for OpenAI-trained weights), the weights come
from the local file, and parity compares against open_clip's own preprocessing
(`image_transform_v2(model.visual.preprocess_cfg)`) and tokenizer (`get_tokenizer`).

    >>> loaded = load_open_clip(parse_model_source("open_clip:ViT-B-32", "weights.bin"))  # doctest: +SKIP
    >>> loaded.details["activation"]  # doctest: +SKIP
    'GELU'
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_clip.export.checkpoints import TRAINED_LOGIT_SCALE, CheckpointError, LoadedClip
from mlflow_clip.export.sources import QUICKGELU_SUFFIX, ModelSource, SourceError, import_source_library
from mlflow_clip.serving.preprocess import CENTER_CROP, RESAMPLE_FILTERS, SQUASH

_logger = logging.getLogger(__name__)

# open_clip's eval transform resizes with bicubic for "random" (a training-only choice).
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}


def import_open_clip():
    return import_source_library("open_clip", "open_clip models")


class OpenClipModel(nn.Module):
    """An open_clip `CLIP` seen through the attributes the export reads from OpenAI's CLIP
    (the same modules, shared, not copied); `encode_text` is open_clip's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.open_clip_model = model
        self.visual = model.visual
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.context_length = int(model.context_length)
        self.vocab_size = int(model.vocab_size)

    def build_attention_mask(self) -> torch.Tensor:
        return self.open_clip_model.attn_mask.detach().float().clone()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.open_clip_model.encode_image(image)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.open_clip_model.encode_text(tokens)


def load_open_clip(source: ModelSource) -> LoadedClip:
    """Build `source.architecture` with open_clip, load `source.checkpoint`, and check that the
    export can follow its text tower and the torch-free preprocessing can follow its transform."""
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    _logger.info("Building open_clip %s from %s", source.architecture, source.checkpoint)
    try:
        model = open_clip.create_model(
            source.architecture,
            pretrained=source.checkpoint,
            force_quick_gelu=source.force_quick_gelu,
            device="cpu",
            weights_only=True,
        )
    except Exception as e:
        raise CheckpointError(
            f"Could not load open_clip {source.architecture} from {source.checkpoint}: {type(e).__name__}: {e}. "
            "Expected an open_clip state dict for that architecture (the .bin, .pt or .safetensors "
            "open_clip saves)."
        ) from e
    model = model.float().eval()
    _check_text_tower(source, model)
    activation = built_activation(model)
    if activation != source.activation:
        raise CheckpointError(f"open_clip built {activation} where {source.activation} was asked for.")
    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    resolution, interpolation, _ = check_preprocess_cfg(source, cfg)
    tokenizer = open_clip.get_tokenizer(source.architecture)
    if type(tokenizer).__name__ != "SimpleTokenizer" or tokenizer.clean_fn.__name__ != "_clean_lower":
        raise SourceError(f"open_clip {source.architecture} does not use CLIP's tokenizer ({tokenizer!r}).")
    return LoadedClip(
        model=OpenClipModel(model).eval(),
        preprocess=image_transform_v2(cfg, is_train=False),
        name=source.name,
        input_resolution=resolution,
        mean=tuple(float(m) for m in cfg.mean),
        std=tuple(float(s) for s in cfg.std),
        interpolation=interpolation,
        tokenize=lambda texts, context_length: tokenizer(list(texts), context_length=context_length),
        details={
            **source.run_params(),
            # open_clip's SimpleTokenizer: CLIP's, with the special tokens spelled <start_of_text>.
            "tokenizer": "open_clip",
            "parity_reference": (
                f"open_clip {open_clip.__version__} {source.architecture} ({activation}) with weights "
                f"{Path(source.checkpoint).name}, open_clip's eval transform and {type(tokenizer).__name__}"
            ),
        },
    )


def built_activation(model: nn.Module) -> str:
    """QuickGELU or GELU: the activation the built model's MLPs use."""
    names = {type(m).__name__ for m in model.modules()}
    return "QuickGELU" if "QuickGELU" in names else "GELU"


# open_clip's resize modes the torch-free preprocessing reproduces, and their names in the contract.
_RESIZE_MODES = {"shortest": CENTER_CROP, "squash": SQUASH}


def check_preprocess_cfg(source: ModelSource, cfg: Any) -> tuple[int, str, str]:
    """(resolution, interpolation, resize mode) of open_clip's eval transform, when the torch-free
    preprocessing reproduces it: resize the short side and crop the centre (shortest), or resize
    both sides (squash, SigLIP's), to a square, RGB."""
    size = cfg.size if isinstance(cfg.size, int) else tuple(cfg.size)
    if not isinstance(size, int) and len(set(size)) != 1:
        reason = f"its input is not square ({size})"
    elif cfg.resize_mode not in _RESIZE_MODES:
        reason = f"it resizes with resize_mode={cfg.resize_mode!r}"
    elif _INTERPOLATIONS.get(cfg.interpolation) not in RESAMPLE_FILTERS:
        reason = f"it resizes with interpolation={cfg.interpolation!r}"
    elif cfg.mode != "RGB" or len(cfg.mean) != 3 or len(cfg.std) != 3:
        reason = f"its input is {cfg.mode} with {len(cfg.mean)} channels"
    else:
        resolution = size if isinstance(size, int) else size[0]
        return resolution, _INTERPOLATIONS[cfg.interpolation], _RESIZE_MODES[cfg.resize_mode]
    raise SourceError(
        f"open_clip {source.architecture}'s preprocessing is not supported: {reason}; the torch-free "
        "preprocessing reproduces resize_mode='shortest' (+ centre crop) and 'squash' to a square input "
        "(bicubic or bilinear)."
    )


def _check_text_tower(source: ModelSource, model: nn.Module) -> None:
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    reason = ""
    if type(model).__name__ != "CLIP" or blocks is None:
        reason = f"it builds {type(model).__name__}, not open_clip's CLIP"
    elif not isinstance(model.text_projection, nn.Parameter):
        reason = "its text projection is not a plain matrix"
    elif getattr(model, "text_pool_type", "argmax") != "argmax":
        reason = f"its text tower pools with {model.text_pool_type!r}"
    else:
        for block in blocks:
            if not isinstance(block.attn, nn.MultiheadAttention) or not all(
                isinstance(getattr(block, name, nn.Identity()), nn.Identity) for name in ("ls_1", "ls_2", "ln_attn")
            ):
                reason = "its text blocks add layer scale or attention norms"
                break
    if reason:
        raise SourceError(f"open_clip {source.architecture} is not supported: {reason}.")


def save_random_open_clip_checkpoint(
    architecture: str, path: str | os.PathLike, seed: int = 0, force_quick_gelu: bool = False
) -> Path:
    """An open_clip architecture with random weights and CLIP's trained logit scale (100), saved
    as the state dict open_clip writes; loadable as `model=open_clip:<architecture>, checkpoint=path`
    (`<architecture>-quickgelu` forces QuickGELU where open_clip has no such config)."""
    open_clip = import_open_clip()
    if architecture.endswith(QUICKGELU_SUFFIX) and architecture not in open_clip.list_models():
        architecture, force_quick_gelu = architecture[: -len(QUICKGELU_SUFFIX)], True
    torch.manual_seed(seed)
    model = open_clip.create_model(architecture, pretrained=None, force_quick_gelu=force_quick_gelu, device="cpu")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TRAINED_LOGIT_SCALE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
