"""open_clip's architecture configs, read and sorted into what the export follows, torch-free.

`-P model=open_clip:<architecture>` names one of open_clip's own configs
(`open_clip/model_configs/*.json`); `open_clip:local-dir:<folder>` a folder laid out as open_clip's
`local-dir:` schema reads it (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`, the
weights, the tokenizer files: what the `timm/...` and `laion/...` repositories hold). Each config
falls in one text family, or is refused in one line:

- `clip`: CLIP's text transformer and byte-pair tokenizer (ViT-*, RN*, convnext_*, ...);
- `open_clip_text`: open_clip's own text transformer behind a Hugging Face tokenizer: SigLIP and
  SigLIP 2 (sigmoid head with a logit bias), and the `*-worldwide` models;
- `hf_text`: a Hugging Face transformer as the text tower (XLM-RoBERTa, RoBERTa, mT5, NLLB).

The last two need the tokenizer's files in a local folder (`-P tokenizer=<folder>`, as its
`save_pretrained` writes them), and `hf_text` the tower's `config.json` there too: nothing is
downloaded.

    >>> read_config("open_clip:ViT-B-16-SigLIP", "ViT-B-16-SigLIP").family  # doctest: +SKIP
    'open_clip_text'
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_clip.errors import ConfigError

CLIP_TEXT = "clip"
OPEN_CLIP_TEXT = "open_clip_text"
HF_TEXT = "hf_text"
LOCAL_DIR = "local-dir:"
LOCAL_CONFIG_FILE = "open_clip_config.json"
# What AutoTokenizer reads from a folder: a tokenizers pipeline, or a SentencePiece model.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# open_clip's HFTokenizer options the served tokenizer follows (its cleaning); others post-process
# the ids (strip_sep_token) and are refused.
FOLLOWED_TOKENIZER_KWARGS = {"clean"}
# Poolers of Hugging Face text towers that read only the tokens that are not padding (MaxPooler
# fills the tokens, not the padding, with -inf, so the padding decides its output).
MASKED_POOLERS = ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")
# Text settings that change what CLIP's text tower computes, with the value the export supports.
CLIP_TEXT_DEFAULTS: dict[str, Any] = {
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


@dataclass(frozen=True)
class OpenClipConfig:
    """An architecture's config, with the text family the export follows."""

    architecture: str  # the config's name, or the local folder's
    model_cfg: dict[str, Any]
    family: str  # CLIP_TEXT, OPEN_CLIP_TEXT or HF_TEXT
    local_dir: str = ""  # open_clip:local-dir:<folder>
    preprocess_cfg: dict[str, Any] | None = None  # a local folder's own preprocessing

    @property
    def text_cfg(self) -> dict[str, Any]:
        return self.model_cfg.get("text_cfg") or {}

    @property
    def sigmoid(self) -> bool:
        """Trained with SigLIP's sigmoid loss: a logit bias next to the logit scale."""
        return self.model_cfg.get("init_logit_bias") is not None


def open_clip_config_dir() -> Path | None:
    """open_clip's model_configs folder, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model_configs"


def open_clip_architectures() -> list[str]:
    folder = open_clip_config_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder else []


def read_local_config(model: str, folder: str) -> OpenClipConfig:
    """The config of an `open_clip:local-dir:<folder>`."""
    path = Path(folder).expanduser()
    config_path = path / LOCAL_CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"Received model={model!r}; {path.resolve()} has no {LOCAL_CONFIG_FILE}. Expected a folder laid out as "
            "open_clip's local-dir: schema reads it (open_clip_config.json, the weights, the tokenizer files)."
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = dict(document["model_cfg"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"Received model={model!r}; {LOCAL_CONFIG_FILE} has no readable model_cfg ({e}).") from e
    family = config_family(model, path.name, model_cfg)
    preprocess = document.get("preprocess_cfg")
    return OpenClipConfig(path.name, model_cfg, family, str(path.resolve()), preprocess if preprocess else None)


def config_family(model: str, architecture: str, config: dict[str, Any]) -> str:
    """CLIP_TEXT, OPEN_CLIP_TEXT or HF_TEXT; raises ConfigError naming what is not followed."""
    text = config.get("text_cfg") or {}
    reason, family = "", CLIP_TEXT
    if config.get("multimodal_cfg"):
        reason = "it is a CoCa model (a captioning decoder on top of CLIP)"
    elif text.get("tokenizer_mode"):
        reason = f"its tokenizer runs in mode {text['tokenizer_mode']!r}, which the served tokenizer does not follow"
    elif text.get("hf_tokenizer_name"):
        family = HF_TEXT if text.get("hf_model_name") else OPEN_CLIP_TEXT
        extra = sorted(set(text.get("tokenizer_kwargs") or {}) - FOLLOWED_TOKENIZER_KWARGS)
        pooler = text.get("hf_pooler_type", "mean_pooler")
        if extra:
            reason = f"its tokenizer post-processes the ids ({', '.join(extra)}), which the served tokenizer does not"
        elif family == HF_TEXT and pooler not in MASKED_POOLERS:
            reason = f"its text tower pools with {pooler!r}, which reads the padding"
    elif config.get("custom_text"):
        reason = (
            "it builds a custom text tower (CustomTextCLIP) with CLIP's tokenizer, which the export does not follow"
        )
    elif config.get("init_logit_bias") is not None:
        reason = "it pairs CLIP's text tower with a sigmoid head, which the export does not follow"
    else:
        changed = [k for k, default in CLIP_TEXT_DEFAULTS.items() if text.get(k, default) not in (default, {})]
        if changed:
            reason = f"its text tower sets {', '.join(sorted(changed))}, which the text-encoder export does not follow"
    if reason:
        raise ConfigError(
            f"Received model={model!r}; open_clip architecture {architecture!r} is not supported: {reason}. "
            "Supported: CLIP's text tower (ViT-*, RN*, convnext_*, ...), SigLIP and SigLIP 2, and Hugging Face "
            "text towers (xlm-roberta-*, nllb-clip-*, ...)."
        )
    return family


def check_tokenizer_folder(model: str, family: str, folder: str, default: str = "") -> str:
    """The absolute tokenizer folder a family needs ("" for CLIP's text, which needs none)."""
    if family == CLIP_TEXT:
        if folder:
            raise ConfigError(
                f"Received tokenizer={folder!r} with model={model!r}, whose tokenizer is CLIP's (shipped with "
                "mlflow-clip). Leave tokenizer out."
            )
        return ""
    folder = folder or default
    path = Path(folder).expanduser()
    what = "the tokenizer's files" + (" and the text tower's config.json" if family == HF_TEXT else "")
    if not folder or not path.is_dir():
        raise ConfigError(
            f"Received model={model!r} {'with tokenizer=' + repr(folder) if folder else 'without a tokenizer folder'}; "
            f"pass -P tokenizer=<local folder with {what}> (as save_pretrained writes them; nothing is downloaded)."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"Received tokenizer={folder!r}; the folder holds none of {', '.join(TOKENIZER_FILES)}. Save the "
            "tokenizer into it (tokenizer.save_pretrained(folder))."
        )
    if family == HF_TEXT and not (path / "config.json").is_file():
        raise ConfigError(
            f"Received tokenizer={folder!r}; the folder has no config.json, which builds the Hugging Face text tower. "
            "Save the text model's config into it too (AutoConfig.from_pretrained(name).save_pretrained(folder))."
        )
    return str(path.resolve())
