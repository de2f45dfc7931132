"""Where a model's weights come from, checked before torch loads: `ModelSource`.

Torch-free. `-P model=` takes OpenAI's CLIP names, `demo` or a local OpenAI checkpoint (the
`openai` source, unchanged); `open_clip:<architecture>` with `-P checkpoint=<local file>`, or
`open_clip:local-dir:<folder>`: open_clip's CLIP architectures, SigLIP and SigLIP 2, and its
multilingual Hugging Face text towers, those two with `-P tokenizer=<local folder>`
(`export/open_clip_configs.py`); or `hf:<folder>`, a Hugging Face `CLIPModel` or `SiglipModel`
folder (`export/hf_folder.py`).

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
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mlflow_clip.errors import SourceError
from mlflow_clip.export.hf_folder import HfFolderError, check_hf_folder
from mlflow_clip.export.open_clip_configs import (
    CLIP_TEXT,
    LOCAL_DIR,
    ConfigError,
    OpenClipConfig,
    check_tokenizer_folder,
    config_family,
    open_clip_architectures,
    open_clip_config_dir,
    read_local_config,
)

OPENAI_SOURCE = "openai"
OPEN_CLIP_SOURCE = "open_clip"
HF_SOURCE = "hf"
SOURCE_PREFIXES = {OPEN_CLIP_SOURCE: "open_clip:", HF_SOURCE: "hf:"}
QUICKGELU_SUFFIX = "-quickgelu"
# open_clip's text towers are exported with batch-first attention, which the explicit attention
# written for opsets before 14 (graph.with_explicit_attention) does not cover.
MIN_SOURCE_OPSET = 14


@dataclass(frozen=True)
class ModelSource:
    """A checked `-P model=` / `-P checkpoint=` / `-P tokenizer=` triple."""

    kind: str  # openai, open_clip or hf
    model: str  # the spec as given
    architecture: str = ""  # open_clip: the config name that is built; hf: e.g. ViT-B-32 (its dimensions)
    checkpoint: str = ""  # open_clip: the local weights file
    activation: str = ""  # GELU or QuickGELU
    force_quick_gelu: bool = False
    folder: str = ""  # hf: the CLIPModel or SiglipModel folder; open_clip: a local-dir folder
    family: str = CLIP_TEXT  # open_clip: its text family (open_clip_configs); hf: clip or siglip
    tokenizer_folder: str = ""  # the tokenizer's files (and a Hugging Face text tower's config)

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
        if self.folder:
            params["folder"] = self.folder
        if self.tokenizer_folder:
            params["tokenizer_folder"] = self.tokenizer_folder
        return params


def parse_model_source(model: str, checkpoint: str | None = None, tokenizer: str | None = None) -> ModelSource:
    """Check `model` (and `checkpoint`, `tokenizer`) without importing torch; raises `SourceError`."""
    checkpoint, tokenizer = str(checkpoint or ""), str(tokenizer or "")
    if model.startswith(SOURCE_PREFIXES[OPEN_CLIP_SOURCE]):
        try:
            return _open_clip_source(model, model[len(SOURCE_PREFIXES[OPEN_CLIP_SOURCE]) :], checkpoint, tokenizer)
        except ConfigError as e:
            raise SourceError(str(e)) from None
    if tokenizer:
        raise SourceError(
            f"Received tokenizer={tokenizer!r} with model={model!r}; tokenizer goes with open_clip models whose "
            "tokenizer is a Hugging Face one (SigLIP, xlm-roberta-*, ...). Leave it out."
        )
    if model.startswith(SOURCE_PREFIXES[HF_SOURCE]):
        if checkpoint:
            raise SourceError(
                f"Received checkpoint={checkpoint!r} with model={model!r}; a Hugging Face folder holds its own "
                "weights. Leave checkpoint out."
            )
        try:
            folder, architecture, activation, family = check_hf_folder(model, model[len(SOURCE_PREFIXES[HF_SOURCE]) :])
        except HfFolderError as e:
            raise SourceError(str(e)) from None
        return ModelSource(
            HF_SOURCE, model, architecture=architecture, folder=folder, activation=activation, family=family
        )
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


def _open_clip_source(model: str, architecture: str, checkpoint: str, tokenizer: str) -> ModelSource:
    if architecture.startswith(LOCAL_DIR):
        config = read_local_config(model, architecture[len(LOCAL_DIR) :])
        weights = checkpoint or _local_weights(model, Path(config.local_dir))
        return _checked_source(model, config, weights, tokenizer, force=False)
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
            "ViT-L-14, ViT-B-16-SigLIP, xlm-roberta-base-ViT-B-32), optionally with -quickgelu appended, "
            "or local-dir:<folder>."
        )
    model_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    config = OpenClipConfig(architecture, model_cfg, config_family(model, architecture, model_cfg))
    return _checked_source(model, config, checkpoint, tokenizer, force)


def _checked_source(model: str, config: OpenClipConfig, checkpoint: str, tokenizer: str, force: bool) -> ModelSource:
    if force and config.family != CLIP_TEXT:
        raise SourceError(
            f"Received model={model!r}; -quickgelu forces QuickGELU into CLIP's towers, and {config.architecture!r} "
            "has other towers (its activations are its config's). Leave -quickgelu out."
        )
    tokenizer_folder = check_tokenizer_folder(model, config.family, tokenizer, config.local_dir)
    return ModelSource(
        OPEN_CLIP_SOURCE,
        model,
        architecture=config.architecture,
        checkpoint=_check_checkpoint_file(model, checkpoint),
        activation="QuickGELU" if force or config.model_cfg.get("quick_gelu") else "GELU",
        force_quick_gelu=force,
        folder=config.local_dir,
        family=config.family,
        tokenizer_folder=tokenizer_folder,
    )


def _local_weights(model: str, folder: Path) -> str:
    """The weights file open_clip's local-dir: schema would load from `folder`."""
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return str(folder / name)
    raise SourceError(
        f"Received model={model!r}; the folder has no open_clip_model.safetensors or open_clip_pytorch_model.bin. "
        "Put the weights there, or pass -P checkpoint=<file>."
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
