"""Where a model's weights come from, checked before torch loads: `ModelSource`.

Torch-free. `-P model=` takes OpenAI's CLIP names, `demo` or a local OpenAI checkpoint (the
`openai` source, unchanged), or `open_clip:<architecture>` with `-P checkpoint=<local file>`: any
architecture in open_clip's model configs whose text side is CLIP's (byte-pair tokenizer, causal
text transformer read at the end-of-text token), so that the torch-free tokenizer serves it; or
`hf:<folder>`, a Hugging Face `CLIPModel` folder (`export/hf_folder.py`).

    >>> source = parse_model_source("open_clip:ViT-B-32", "/models/open_clip_pytorch_model.bin")  # doctest: +SKIP
    >>> source.kind, source.architecture, source.activation  # doctest: +SKIP
    ('open_clip', 'ViT-B-32', 'GELU')

QuickGELU: open_clip builds an architecture with the activation its config names (GELU for
`ViT-B-32`); weights trained by OpenAI need QuickGELU. The choice is the architecture name:
`open_clip:ViT-B-32-quickgelu` (open_clip's own config) or, for an architecture without one, any
name with `-quickgelu` appended (built with `force_quick_gelu`). OpenAI's TorchScript archives are
refused here: `-P model=<path>` loads them with OpenAI's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.export.hf_folder import HfFolderError, check_hf_folder

OPENAI_SOURCE = "openai"
OPEN_CLIP_SOURCE = "open_clip"
HF_SOURCE = "hf"
SOURCE_PREFIXES = {OPEN_CLIP_SOURCE: "open_clip:", HF_SOURCE: "hf:"}
QUICKGELU_SUFFIX = "-quickgelu"
# open_clip's text towers are exported with batch-first attention, which the explicit attention
# written for opsets before 14 (graph.with_explicit_attention) does not cover.
MIN_SOURCE_OPSET = 14
# Text settings that change what CLIP's text tower computes, with the value the export supports.
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_kwargs": None,
    "vocab_size": 49408,
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}


class SourceError(MlflowClipError, ValueError):
    """A model spec, checkpoint or architecture is invalid; the message says what is accepted."""


@dataclass(frozen=True)
class ModelSource:
    """A checked `-P model=` / `-P checkpoint=` pair."""

    kind: str  # openai, open_clip or hf
    model: str  # the spec as given
    architecture: str = ""  # open_clip: the config name that is built; hf: e.g. ViT-B-32 (its dimensions)
    checkpoint: str = ""  # open_clip: the local weights file
    activation: str = ""  # GELU or QuickGELU
    force_quick_gelu: bool = False
    folder: str = ""  # hf: the CLIPModel folder

    @property
    def name(self) -> str:
        """The short name recorded with the export (`clip_model`)."""
        if self.kind == OPEN_CLIP_SOURCE:
            return f"{OPEN_CLIP_SOURCE}:{self.architecture}" + (QUICKGELU_SUFFIX if self.force_quick_gelu else "")
        if self.kind == HF_SOURCE:
            return f"{HF_SOURCE}:{Path(self.folder).name}"
        return self.model

    def run_params(self) -> dict[str, str]:
        params = {
            "source": self.kind,
            "architecture": self.architecture,
            "checkpoint": self.checkpoint,
            "activation": self.activation,
        }
        return {**params, "folder": self.folder} if self.folder else params


def parse_model_source(model: str, checkpoint: str | None = None) -> ModelSource:
    """Check `model` (and `checkpoint`) without importing torch; raises `SourceError`."""
    checkpoint = str(checkpoint or "")
    if model.startswith(SOURCE_PREFIXES[OPEN_CLIP_SOURCE]):
        return _open_clip_source(model, model[len(SOURCE_PREFIXES[OPEN_CLIP_SOURCE]) :], checkpoint)
    if model.startswith(SOURCE_PREFIXES[HF_SOURCE]):
        if checkpoint:
            raise SourceError(
                f"Received checkpoint={checkpoint!r} with model={model!r}; a Hugging Face folder holds its own "
                "weights. Leave checkpoint out."
            )
        try:
            folder, architecture, activation = check_hf_folder(model, model[len(SOURCE_PREFIXES[HF_SOURCE]) :])
        except HfFolderError as e:
            raise SourceError(str(e)) from None
        return ModelSource(HF_SOURCE, model, architecture=architecture, folder=folder, activation=activation)
    if ":" in model.split("/")[0] and not Path(model).expanduser().exists():
        raise SourceError(
            f"Received model={model!r}; expected an OpenAI CLIP name, 'demo', a local checkpoint path, or "
            "open_clip:<architecture> with -P checkpoint=<file>."
        )
    if checkpoint:
        raise SourceError(
            f"Received checkpoint={checkpoint!r} with model={model!r}; checkpoint goes with "
            "model=open_clip:<architecture>. For an OpenAI checkpoint pass its path as the model: -P model=<path>."
        )
    return ModelSource(OPENAI_SOURCE, model)


def import_source_library(module: str, what: str):
    """`module`, imported, or a SourceError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SourceError(f"{what} need {module}: pip install 'mlflow-clip[sources]'.") from e


def check_source_opset(source: ModelSource, opset: int) -> None:
    if source.kind != OPENAI_SOURCE and opset < MIN_SOURCE_OPSET:
        raise SourceError(
            f"Received opset={opset} with model={source.model!r}; {source.kind} models need opset "
            f"{MIN_SOURCE_OPSET} or newer."
        )


def open_clip_config_dir() -> Path | None:
    """open_clip's model_configs folder, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model_configs"


def open_clip_architectures() -> list[str]:
    folder = open_clip_config_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder else []


def _open_clip_source(model: str, architecture: str, checkpoint: str) -> ModelSource:
    folder = open_clip_config_dir()
    if folder is None:
        raise SourceError(
            f"Received model={model!r}, but open_clip is not installed; pip install 'mlflow-clip[sources]'."
        )
    force = False
    config_path = folder / f"{architecture}.json"
    if not config_path.is_file() and architecture.endswith(QUICKGELU_SUFFIX):
        force, architecture = True, architecture[: -len(QUICKGELU_SUFFIX)]
        config_path = folder / f"{architecture}.json"
    if not architecture or not config_path.is_file():
        raise SourceError(
            f"Received model={model!r}; {architecture!r} is not one of open_clip's "
            f"{len(open_clip_architectures())} architectures (e.g. ViT-B-32, ViT-B-32-quickgelu, RN50, "
            "ViT-L-14), optionally with -quickgelu appended."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    _check_open_clip_config(model, architecture, config)
    return ModelSource(
        OPEN_CLIP_SOURCE,
        model,
        architecture=architecture,
        checkpoint=_check_checkpoint_file(model, checkpoint),
        activation="QuickGELU" if force or config.get("quick_gelu") else "GELU",
        force_quick_gelu=force,
    )


def _check_open_clip_config(model: str, architecture: str, config: dict) -> None:
    """Refuse what the torch-free tokenizer, the text-tower export or the softmax head cannot serve."""
    text = config.get("text_cfg", {})
    reason = ""
    if text.get("hf_tokenizer_name") or "siglip" in architecture.lower():
        reason = "its tokenizer is not CLIP's byte-pair encoding (a Hugging Face or SigLIP tokenizer)"
    elif text.get("hf_model_name"):
        reason = f"its text tower is the Hugging Face model {text['hf_model_name']!r}, not CLIP's"
    elif config.get("multimodal_cfg"):
        reason = "it is a CoCa model (a captioning decoder on top of CLIP)"
    elif config.get("custom_text"):
        reason = "it builds a custom text tower (CustomTextCLIP), not CLIP's"
    elif config.get("init_logit_bias") is not None:
        reason = "it is trained with a sigmoid loss and a logit bias, not CLIP's softmax head"
    else:
        changed = [k for k, default in _TEXT_DEFAULTS.items() if text.get(k, default) not in (default, {})]
        if changed:
            reason = f"its text tower sets {', '.join(sorted(changed))}, which the text-encoder export does not follow"
    if reason:
        raise SourceError(
            f"Received model={model!r}; open_clip architecture {architecture!r} is not supported: {reason}. "
            "Supported: architectures with CLIP's text tower and tokenizer (ViT-*, RN*, convnext_*, ...)."
        )


def _check_checkpoint_file(model: str, checkpoint: str) -> str:
    if not checkpoint:
        raise SourceError(
            f"Received model={model!r} without a checkpoint; pass -P checkpoint=<local weights file> "
            "(open_clip's .bin, .pt or .safetensors; nothing is downloaded)."
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise SourceError(f"Received checkpoint={checkpoint!r}; no file exists there (looked in {path.resolve()}).")
    if _is_torchscript_archive(path):
        raise SourceError(
            f"Received checkpoint={checkpoint!r}: an OpenAI TorchScript archive. Pass it as -P model={checkpoint} "
            "(OpenAI's loader, QuickGELU), not as an open_clip checkpoint."
        )
    return str(path.resolve())


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
