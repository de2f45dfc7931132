"""A Hugging Face `CLIPModel` or `SiglipModel` folder, checked before torch loads: `check_hf_folder`.

Torch-free. `-P model=hf:<folder>` names a local folder written by the model's `save_pretrained`
and its processor's `save_pretrained`: `config.json`, the weights (`model.safetensors` or
`pytorch_model.bin`), the tokenizer files and the image processor's settings
(`processor_config.json` from transformers 5, or `preprocessor_config.json`). The family comes
from `config.json`'s `model_type`: `clip`, or `siglip` (SigLIP, and SigLIP 2's fixed-resolution
checkpoints). Refused, in one line naming the fix: a missing folder or file, another model type
(SigLIP 2's variable-resolution NaFlex, ...), an activation or layout the OpenAI-layout export
cannot follow (CLIP), and image settings the torch-free preprocessing cannot reproduce bit for bit.

    >>> check_hf_folder("hf:/models/clip-vit-base-patch32", "/models/clip-vit-base-patch32")  # doctest: +SKIP
    ('/models/clip-vit-base-patch32', 'ViT-B-32 (patch 32, 224 px, 12x768 vision, 12x512 text)', 'QuickGELU', 'clip')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_clip.errors import HfFolderError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
SIGLIP_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))
CLIP_FAMILY = "clip"
SIGLIP_FAMILY = "siglip"
# Hugging Face's resample codes (PIL's), for the two the torch-free preprocessing follows.
HF_RESAMPLE = {3: "bicubic", 2: "bilinear"}
_SIZE_NAMES = {384: "S", 512: "M", 768: "B", 1024: "L", 1280: "H"}


@dataclass(frozen=True)
class HfImageSettings:
    """What the contract records of the folder's image processor."""

    input_resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def check_hf_folder(model: str, folder: str) -> tuple[str, str, str, str]:
    """(the folder's absolute path, a short description of its architecture, its activation:
    QuickGELU or GELU, or the config's hidden_act for SigLIP; its family: clip or siglip);
    raises HfFolderError."""
    path = Path(folder).expanduser()
    if not folder or not path.is_dir():
        raise HfFolderError(
            f"Received model={model!r}; no folder exists at {path.resolve() if folder else '(empty)'}. Expected "
            "hf:<folder written by CLIPModel.save_pretrained and its processor's save_pretrained>."
        )
    config = read_json(path / "config.json", model)
    model_type = config.get("model_type")
    if model_type == SIGLIP_FAMILY:
        return check_siglip_folder(model, path, config)
    if model_type != "clip":
        reason = (
            "SigLIP 2's variable-resolution (NaFlex) towers take patches and masks, not a square image; its "
            "fixed-resolution checkpoints (model_type 'siglip') are supported"
            if model_type == "siglip2"
            else "CLIPModel and SiglipModel folders are supported"
        )
        raise HfFolderError(f"Received model={model!r}; its config.json has model_type={model_type!r}: {reason}.")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise HfFolderError(f"Received model={model!r}; the folder holds none of {', '.join(WEIGHT_FILES)}.")
    if not any(all((path / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise HfFolderError(
            f"Received model={model!r}; the folder has no tokenizer (tokenizer.json, or vocab.json and merges.txt). "
            "Save the CLIPProcessor or CLIPTokenizer into it too."
        )
    image_settings(path, model, config)
    activation = "GELU" if config["vision_config"].get("hidden_act") == "gelu" else "QuickGELU"
    return str(path.resolve()), describe_architecture(config, model), activation, CLIP_FAMILY


def check_siglip_folder(model: str, path: Path, config: dict[str, Any]) -> tuple[str, str, str, str]:
    """`check_hf_folder` for a SiglipModel folder: its own towers are exported as they are, so
    only the files and the image processor are checked."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise HfFolderError(f"Received model={model!r}; the folder holds none of {', '.join(WEIGHT_FILES)}.")
    if not any(all((path / name).is_file() for name in names) for names in SIGLIP_TOKENIZER_FILES):
        raise HfFolderError(
            f"Received model={model!r}; the folder has no tokenizer (tokenizer.json, or spiece.model). "
            "Save the SiglipProcessor or its tokenizer into it too."
        )
    siglip_image_settings(path, model, config)
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    width, patch = int(vision.get("hidden_size", 768)), int(vision.get("patch_size", 16))
    description = (
        f"SigLIP ViT-{_SIZE_NAMES.get(width, f'w{width}')}-{patch} (patch {patch}, {vision.get('image_size', 224)} px, "
        f"{vision.get('num_hidden_layers', 12)}x{width} vision, {text.get('num_hidden_layers', 12)}x"
        f"{text.get('hidden_size', 768)} text)"
    )
    return str(path.resolve()), description, str(vision.get("hidden_act", "gelu_pytorch_tanh")), SIGLIP_FAMILY


def read_json(path: Path, model: str) -> dict[str, Any]:
    if not path.is_file():
        raise HfFolderError(f"Received model={model!r}; the folder has no {path.name}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfFolderError(f"Received model={model!r}; {path.name} is not readable JSON ({e}).") from e


def describe_architecture(config: dict[str, Any], model: str) -> str:
    """e.g. 'ViT-B-32 (patch 32, 224 px, 12x768 vision, 12x512 text)', after checking that the
    OpenAI-layout export follows the towers: QuickGELU or GELU, 64-wide heads in the vision
    tower, MLPs 4x wide, LayerNorm eps 1e-5, CLIP's vocabulary size."""
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    reason = ""
    for name, tower in (("vision", vision), ("text", text)):
        width = int(tower.get("hidden_size", 0))
        if tower.get("hidden_act") not in ("quick_gelu", "gelu"):
            reason = f"its {name} tower uses hidden_act={tower.get('hidden_act')!r} (QuickGELU or GELU are followed)"
        elif int(tower.get("intermediate_size", 0)) != 4 * width:
            reason = f"its {name} MLP is not 4x the width ({tower.get('intermediate_size')} for {width})"
        elif float(tower.get("layer_norm_eps", 1e-5)) != 1e-5:
            reason = f"its {name} LayerNorm eps is {tower.get('layer_norm_eps')}, not 1e-5"
        if reason:
            break
    if not reason and int(vision.get("num_attention_heads", 0)) * 64 != int(vision.get("hidden_size", -1)):
        reason = "its vision heads are not 64 wide"
    if not reason and int(text.get("vocab_size", 49408)) != 49408:
        reason = f"its vocabulary has {text.get('vocab_size')} tokens, not CLIP's 49408"
    if reason:
        raise HfFolderError(f"Received model={model!r}; this CLIPModel is not supported: {reason}.")
    width, patch = int(vision["hidden_size"]), int(vision.get("patch_size", 32))
    size = _SIZE_NAMES.get(width, f"w{width}")
    return (
        f"ViT-{size}-{patch} (patch {patch}, {vision.get('image_size', 224)} px, "
        f"{vision.get('num_hidden_layers')}x{width} vision, "
        f"{text.get('num_hidden_layers')}x{text.get('hidden_size')} text)"
    )


def _processor_settings(folder: Path, model: str, processor: str) -> dict[str, Any]:
    found = next((folder / name for name in PROCESSOR_FILES if (folder / name).is_file()), None)
    if found is None:
        raise HfFolderError(
            f"Received model={model!r}; the folder has no image processor settings ({' or '.join(PROCESSOR_FILES)}). "
            f"Save the {processor} or its image processor into it too."
        )
    settings = read_json(found, model)
    return settings.get("image_processor", settings)


def siglip_image_settings(folder: Path, model: str, config: dict[str, Any] | None = None) -> HfImageSettings:
    """SiglipImageProcessor's settings, when the torch-free preprocessing reproduces them:
    convert to RGB, resize both sides to the model's square (bicubic or bilinear), no crop,
    scale by 1/255, normalize."""
    settings = _processor_settings(folder, model, "SiglipProcessor")
    vision = (config or read_json(folder / "config.json", model)).get("vision_config") or {}
    resolution = int(vision.get("image_size", 224))
    size = settings.get("size") or {}
    if not settings.get("do_resize", True) or settings.get("do_center_crop"):
        reason = "it does not resize the whole image to a square (it crops, or does not resize)"
    elif size != {"height": resolution, "width": resolution}:
        reason = f"it resizes to {size}, not the model's {resolution} px square"
    else:
        reason = _pixel_steps_reason(settings)
    if reason:
        raise HfFolderError(
            f"Received model={model!r}; its image processor is not supported: {reason}. The torch-free "
            "preprocessing reproduces SiglipImageProcessor's resize of the whole image to the model's square."
        )
    return _image_settings(settings, resolution, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def image_settings(folder: Path, model: str, config: dict[str, Any] | None = None) -> HfImageSettings:
    """The image processor's settings, when the torch-free preprocessing reproduces them:
    convert to RGB, resize the short side (bicubic or bilinear), crop the square centre, scale
    by 1/255, normalize."""
    settings = _processor_settings(folder, model, "CLIPProcessor")
    vision = (config or read_json(folder / "config.json", model)).get("vision_config") or {}
    size, crop = settings.get("size") or {}, settings.get("crop_size") or {}
    crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
    resolution = int(vision.get("image_size", 224))
    if not (settings.get("do_resize", True) and settings.get("do_center_crop", True)):
        reason = "it does not resize and centre-crop"
    elif set(size) != {"shortest_edge"}:
        reason = f"it resizes to {size} (the short side, shortest_edge, is followed)"
    elif not (int(size["shortest_edge"]) == crop.get("height") == crop.get("width") == resolution):
        reason = f"its resize ({size}) and crop ({crop}) are not the model's {resolution} px square"
    else:
        reason = _pixel_steps_reason(settings)
    if reason:
        raise HfFolderError(
            f"Received model={model!r}; its image processor is not supported: {reason}. The torch-free "
            "preprocessing reproduces CLIPImageProcessor's resize of the short side + centre crop of a square."
        )
    return _image_settings(
        settings, resolution, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )


def _pixel_steps_reason(settings: dict[str, Any]) -> str:
    """Why the steps after the resize (resample filter, 1/255 rescale, RGB normalization) cannot
    be followed, or "" when they can: the same for every Hugging Face image processor."""
    if settings.get("resample", 3) not in HF_RESAMPLE:
        return f"it resamples with PIL filter {settings.get('resample')} (bicubic 3 or bilinear 2 are followed)"
    if not settings.get("do_rescale", True) or abs(float(settings.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        return f"it rescales by {settings.get('rescale_factor')}, not 1/255"
    if not settings.get("do_normalize", True) or not settings.get("do_convert_rgb", True):
        return "it does not normalize RGB"
    return ""


def _image_settings(
    settings: dict[str, Any], resolution: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> HfImageSettings:
    """The settings a checked processor gives, its mean and std defaulting to the family's."""
    return HfImageSettings(
        resolution,
        tuple(float(m) for m in settings.get("image_mean", mean)),
        tuple(float(s) for s in settings.get("image_std", std)),
        HF_RESAMPLE[settings.get("resample", 3)],  # type: ignore[arg-type]
    )
