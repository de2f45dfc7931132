"""open_clip models whose tokenizer is a Hugging Face one: SigLIP, SigLIP 2 and the multilingual towers.

Export world (torch, open_clip, transformers). The architecture is built by open_clip from its own
config (or a local-dir folder's), the weights come from the local checkpoint, and the tokenizer
from the local folder, with open_clip's own `HFTokenizer` and the options its config names (as
`open_clip.get_tokenizer` builds it); a Hugging Face text tower is built from the folder's
`config.json` (open_clip's `HFTextEncoder`, `AutoModel.from_config`). Nothing is downloaded.

The preprocessing is the one open_clip's published weights for the architecture use (the
pretrained tags' settings, all of which agree: SigLIP's squash with mean and std 0.5), or a
local-dir folder's own `preprocess_cfg`; parity compares against open_clip's eval transform for it.
The model is exported as it is (no conversion): its image tower, and `encode_text` followed by
L2 normalization as the text encoder.

    >>> loaded = load_open_clip_text(parse_model_source("open_clip:ViT-B-16-SigLIP", "w.bin", "tok/"))  # doctest: +SKIP
    >>> loaded.logit_bias is not None, loaded.resize_mode  # doctest: +SKIP
    (True, 'squash')
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_clip.export.checkpoints import CheckpointError, LoadedClip
from mlflow_clip.export.open_clip_configs import HF_TEXT, LOCAL_CONFIG_FILE, open_clip_config_dir
from mlflow_clip.export.open_clip_source import check_preprocess_cfg, import_open_clip
from mlflow_clip.export.sources import ModelSource, SourceError
from mlflow_clip.export.tokenizer_files import write_tokenizer_files

_logger = logging.getLogger(__name__)
DEFAULT_CONTEXT_LENGTH = 77  # open_clip's, for text configs that name none


class SourceModel(nn.Module):
    """A source's model (registered whole, as `source`) seen through what the export reads:
    `visual` (image -> features), `encode_text` (ids -> features), `logit_scale` (log),
    `logit_bias` (or None) and the tokenizer's `context_length`."""

    def __init__(self, source: nn.Module, visual: nn.Module, encode_text, logit_scale, logit_bias, context_length: int):
        super().__init__()
        self.source = source
        self.visual = visual
        self._encode_text = encode_text
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.context_length = int(context_length)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._encode_text(tokens)


class NormalizedText(nn.Module):
    """The text encoder exported for these models: the source's own `encode_text`, L2-normalized."""

    def __init__(self, model: SourceModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_text(tokens)
        return features / features.norm(dim=-1, keepdim=True)


def load_open_clip_text(source: ModelSource, work_dir: str | Path) -> LoadedClip:
    """Build `source` with open_clip, load its checkpoint, and its tokenizer from the folder; the
    served tokenizer's files are written into `work_dir`."""
    open_clip = import_open_clip()
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model_cfg = _model_cfg(source)
    text_cfg = dict(model_cfg["text_cfg"])
    model = _build(open_clip, source, text_cfg)
    context_length = int(text_cfg.get("context_length") or DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    try:
        tokenizer = HFTokenizer(source.tokenizer_folder, context_length=context_length, **kwargs)
    except Exception as e:
        raise CheckpointError(
            f"Could not load the tokenizer in {source.tokenizer_folder}: {type(e).__name__}: {e}. Expected the files "
            "a Hugging Face tokenizer's save_pretrained writes."
        ) from e
    cfg_source, preprocess = _preprocess_cfg(open_clip, source, model)
    cfg = PreprocessCfg(**preprocess)
    resolution, interpolation, resize_mode = check_preprocess_cfg(source, cfg)
    served, files = write_tokenizer_files(tokenizer.tokenizer, work_dir, context_length)
    wrapped = SourceModel(model, model.visual, model.encode_text, model.logit_scale, model.logit_bias, context_length)
    return LoadedClip(
        model=wrapped.eval(),
        preprocess=image_transform_v2(cfg, is_train=False),
        name=source.name,
        input_resolution=resolution,
        mean=tuple(float(m) for m in cfg.mean),
        std=tuple(float(s) for s in cfg.std),
        interpolation=interpolation,
        resize_mode=resize_mode,
        tokenize=lambda texts, length: tokenizer(list(texts), context_length=length),
        details={
            **source.run_params(),
            "tokenizer": served,
            "parity_reference": (
                f"open_clip {open_clip.__version__} {source.architecture} with weights {Path(source.checkpoint).name}, "
                f"open_clip's eval transform ({cfg_source}) and HFTokenizer ({type(tokenizer.tokenizer).__name__}, "
                f"clean={tokenizer.clean_fn.__name__.lstrip('_')})"
            ),
        },
        logit_bias=None if model.logit_bias is None else float(model.logit_bias.detach().reshape(-1)[0]),
        text_encoder=NormalizedText(wrapped).eval(),
        text_pooling=_text_pooling(source, model, tokenizer),
        text_clean=_clean_name(kwargs.get("clean", "whitespace")),
        tokenizer_files=tuple(files),
        context_length=context_length,
    )


def _model_cfg(source: ModelSource) -> dict[str, Any]:
    if source.folder:
        return json.loads((Path(source.folder) / LOCAL_CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    return json.loads((open_clip_config_dir() / f"{source.architecture}.json").read_text(encoding="utf-8"))


def _build(open_clip, source: ModelSource, text_cfg: dict[str, Any]) -> nn.Module:
    """The architecture with random weights, then the checkpoint, strictly (open_clip's own
    `load_checkpoint`); a Hugging Face text tower from the tokenizer folder's config.json."""
    if source.family == HF_TEXT:
        text_cfg = {**text_cfg, "hf_model_name": source.tokenizer_folder, "hf_model_pretrained": False}
    name = f"local-dir:{source.folder}" if source.folder else source.architecture
    _logger.info("Building open_clip %s from %s", source.architecture, source.checkpoint)
    try:
        with _quiet_random_init():
            model = open_clip.create_model(
                name, pretrained=None, load_weights=False, pretrained_text=False, device="cpu", text_cfg=text_cfg
            )
        open_clip.load_checkpoint(model, source.checkpoint, strict=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Could not load open_clip {source.architecture} from {source.checkpoint}: {type(e).__name__}: {e}. "
            "Expected an open_clip state dict for that architecture (the .bin, .pt or .safetensors open_clip saves)."
        ) from e
    return model.float().eval()


class _quiet_random_init:
    """open_clip warns (through the root logger) that the model it builds has random weights,
    and that a local folder's weights were not loaded: both are true, and the checkpoint is
    loaded next, strictly."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not ("Model initialized randomly" in message or "no CLIP weights found" in message)

    def __enter__(self):
        self._filter = self._Filter()
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)


def _preprocess_cfg(open_clip, source: ModelSource, model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(where it comes from, the preprocessing of open_clip's published weights for the
    architecture): a local folder's own, else the pretrained tags', which must agree."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = {**merge_preprocess_dict(PreprocessCfg(), {}), "size": model.visual.preprocess_cfg["size"]}
    if source.folder:
        return LOCAL_CONFIG_FILE, dict(model.visual.preprocess_cfg)
    tags = open_clip.list_pretrained_tags_by_model(source.architecture)
    settings = {
        tag: merge_preprocess_dict(base, open_clip.get_pretrained_cfg(source.architecture, tag)) for tag in tags
    }
    distinct = {json.dumps(value, sort_keys=True, default=str) for value in settings.values()}
    if len(distinct) > 1:
        raise SourceError(
            f"open_clip's pretrained weights for {source.architecture} ({', '.join(tags)}) preprocess differently; "
            "use open_clip:local-dir:<folder> with the weights' own open_clip_config.json."
        )
    if not settings:
        return "open_clip's defaults", base
    return f"as for its {'/'.join(tags)} weights", next(iter(settings.values()))


def _text_pooling(source: ModelSource, model: nn.Module, tokenizer) -> str:
    """masked for a Hugging Face tower that masks its padding out (padded on the right, with the
    pad id the tower masks), else full: every position of the context counts."""
    text = getattr(model, "text", None)
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    hf = tokenizer.tokenizer
    if source.family == HF_TEXT and pad is not None and pad == hf.pad_token_id and hf.padding_side == "right":
        return "masked"
    return "full"


def _clean_name(clean: str) -> str:
    if clean not in ("whitespace", "lower", "canonicalize"):
        raise SourceError(f"open_clip's HFTokenizer cleans with {clean!r}, which the served tokenizer does not follow.")
    return clean
