"""Where CLIP weights come from: OpenAI's named models, a local checkpoint, or the demo model.

>>> loaded = load_clip("demo")  # doctest: +SKIP
>>> loaded.input_resolution  # doctest: +SKIP
64
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mlflow_clip.errors import CheckpointError
from mlflow_clip.export.compat import import_clip, quiet_jit_load
from mlflow_clip.export.preflight import DEMO_MODEL_NAME, default_cache_dir
from mlflow_clip.package_data import demo_weights_path
from mlflow_clip.serving.preprocess import CENTER_CROP, CLIP_MEAN, CLIP_STD

_logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 15.0


@dataclass
class LoadedClip:
    model: torch.nn.Module  # clip.model.CLIP in float32, eval mode, on CPU
    preprocess: Callable  # CLIP's own torchvision preprocessing
    name: str  # a short name recorded with the export: RN50, ViT-B/32, demo, or the file name
    input_resolution: int
    # The source's own preprocessing settings (CLIP's unless another source says otherwise).
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = CENTER_CROP
    # The source's own tokenizer, (texts, context_length) -> ids [N, context_length]; None: clip.tokenize.
    tokenize: Callable | None = None
    # Where the weights come from and what parity compares against (run params and version tags).
    details: dict[str, str] = field(default_factory=dict)
    # The source's own PyTorch model, when `model` is a conversion of it (Hugging Face): parity
    # compares the export against this (`visual`, `encode_text`, `context_length`), not `model`.
    reference: torch.nn.Module | None = None
    # SigLIP's logit bias (None: CLIP's head has none).
    logit_bias: float | None = None
    # Sources whose text side is not CLIP's: the module exported as the text encoder (ids ->
    # L2-normalized embeddings; None: CLIP's text transformer, graph.TextTower), how serving may
    # shorten its ids (serving.text.TEXT_POOLINGS), the cleaning before the served tokenizer, the
    # served tokenizer's files (details["tokenizer"] names the library) and its context length.
    text_encoder: torch.nn.Module | None = None
    text_pooling: str = "argmax"
    text_clean: str = ""
    tokenizer_files: tuple[Path, ...] = ()
    context_length: int | None = None

    @property
    def reference_model(self) -> torch.nn.Module:
        return self.model if self.reference is None else self.reference


def load_clip(spec: str, download_root: str | os.PathLike | None = None) -> LoadedClip:
    """Load CLIP by name (`RN50`, `ViT-B/32`, ...), `demo`, or a local checkpoint path."""
    clip = import_clip()

    if spec == DEMO_MODEL_NAME:
        return _load_file(demo_weights_path(), DEMO_MODEL_NAME)
    if spec in clip.available_models():
        return _load_named(spec, Path(download_root or default_cache_dir()))
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(path, path.stem)
    raise CheckpointError(
        f"Received model={spec!r}; expected one of {clip.available_models()}, "
        f"'{DEMO_MODEL_NAME}', or the path of a local CLIP checkpoint (OpenAI's TorchScript .pt "
        "archive or a state dict). No file exists at that path."
    )


def _load_file(path: Path, name: str) -> LoadedClip:
    _logger.info("Loading CLIP weights from %s", path)
    try:
        model = _build_from_file(path)
    except Exception as e:
        raise CheckpointError(
            f"Could not load a CLIP model from {path}: {type(e).__name__}: {e}. Expected OpenAI's "
            "TorchScript archive (e.g. RN50.pt) or a state dict saved with torch.save(model.state_dict())."
        ) from e
    return _loaded(model, name)


def _build_from_file(path: Path) -> torch.nn.Module:
    """What `clip.load(path, jit=False)` does, reading the file afresh for the state-dict
    fallback (clip.load reuses the file handle that the failed TorchScript attempt consumed)."""
    clip = import_clip()

    try:
        with quiet_jit_load():
            state_dict = torch.jit.load(str(path), map_location="cpu").eval().state_dict()
    except RuntimeError:
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    return clip.model.build_model(dict(state_dict)).float().eval()


def _load_named(name: str, root: Path) -> LoadedClip:
    clip = import_clip()

    cached = root / os.path.basename(clip.clip._MODELS[name])
    if not cached.exists():
        _logger.info("Downloading CLIP %s to %s", name, root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        model, _ = clip.load(name, device="cpu", jit=False, download_root=str(root))
    except (OSError, RuntimeError) as e:
        if cached.exists() and "SHA256" not in str(e):
            raise
        raise CheckpointError(
            f"CLIP model {name!r} is not in the cache ({cached}) and could not be downloaded "
            f"({type(e).__name__}: {e}). On an offline machine, copy the checkpoint there, or pass "
            f"its path instead: -P model=/path/to/{cached.name}."
        ) from e
    finally:
        socket.setdefaulttimeout(previous)
    return _loaded(model.float().eval(), name)


def _loaded(model: torch.nn.Module, name: str) -> LoadedClip:
    clip = import_clip()

    resolution = int(model.visual.input_resolution)
    return LoadedClip(model=model, preprocess=clip.clip._transform(resolution), name=name, input_resolution=resolution)


# Published dimensions of CLIP's architectures, for building full-size models with random weights.
ARCHITECTURES: dict[str, dict] = {
    "RN50": dict(
        embed_dim=1024,
        image_resolution=224,
        vision_layers=(3, 4, 6, 3),
        vision_width=64,
        vision_patch_size=None,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "RN101": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=(3, 4, 23, 3),
        vision_width=64,
        vision_patch_size=None,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "RN50x4": dict(
        embed_dim=640,
        image_resolution=288,
        vision_layers=(4, 6, 10, 6),
        vision_width=80,
        vision_patch_size=None,
        transformer_width=640,
        transformer_heads=10,
        transformer_layers=12,
    ),
    "RN50x16": dict(
        embed_dim=768,
        image_resolution=384,
        vision_layers=(6, 8, 18, 8),
        vision_width=96,
        vision_patch_size=None,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
    "RN50x64": dict(
        embed_dim=1024,
        image_resolution=448,
        vision_layers=(3, 15, 36, 10),
        vision_width=128,
        vision_patch_size=None,
        transformer_width=1024,
        transformer_heads=16,
        transformer_layers=12,
    ),
    "ViT-B/32": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "ViT-B/16": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=16,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "ViT-L/14": dict(
        embed_dim=768,
        image_resolution=224,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
    "ViT-L/14@336px": dict(
        embed_dim=768,
        image_resolution=336,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
}
TRAINED_LOGIT_SCALE = 100.0


def build_random_clip(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A full-size CLIP with random weights and CLIP's trained logit scale (100)."""
    clip = import_clip()

    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"Received architecture={architecture!r}; expected one of {list(ARCHITECTURES)}.")
    torch.manual_seed(seed)
    model = clip.model.CLIP(context_length=77, vocab_size=49408, **ARCHITECTURES[architecture])
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(TRAINED_LOGIT_SCALE))))
    return model.eval()


def save_random_checkpoint(architecture: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random full-size CLIP as a plain state dict, loadable through `model=<path>`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_random_clip(architecture, seed).state_dict(), path)
    return path
